"""What a model file or an exported module holds is what gets computed (issue #28): one checksum over
everything that determines a number, a label set that travels with the model, and exports that know their
atoms. Each test fails without its change."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from conftest import SYSTEMS, random_model, shared_file
from schnet_md.modelfile import ModelFileError, load_model, save_model, tensors_sha256


def small_model():
    return random_model(elements=(1, 6, 8), dtype=torch.float32, n_features=8, n_interactions=1)


# ---- the model file: one checksum over config, metadata and weights ------------------------------------------

def test_a_changed_config_or_metadata_is_refused(tmp_path):
    """gamma 10 -> 30 in the config JSON changes every energy; the energy unit in the metadata changes what the
    numbers mean. The weights checksum of format 2 let both through."""
    path = save_model(small_model(), tmp_path / "model.pt", {"units": {"length": "Angstrom", "energy": "kcal/mol"}})
    data = path.read_bytes()
    for old, new in ((b'"gamma": 10.0', b'"gamma": 30.0'), (b'"energy": "kcal/mol"', b'"energy": "kcal/MOL"')):
        assert data.count(old) == 1
        changed = tmp_path / "changed.pt"
        changed.write_bytes(data.replace(old, new))
        with pytest.raises(ModelFileError, match="changed.pt is damaged: its config, metadata or weights do not match "
                                                 "the checksum"):
            load_model(changed)
    load_model(path)


def _older_file(path, version, model, metadata):
    payload = {"format": "schnet-md/model", "format_version": version, "config": json.dumps(model.config.to_dict()),
               "metadata": json.dumps(metadata), "state_dict": model.state_dict()}
    if version == 2:
        payload["tensors_sha256"] = tensors_sha256(payload["state_dict"])
    torch.save(payload, path)
    return path


@pytest.mark.parametrize("version", [1, 2])
def test_older_formats_load_with_a_one_line_warning(tmp_path, caplog, version):
    model = small_model()
    path = _older_file(tmp_path / f"v{version}.pt", version, model, {"preset": "custom"})
    with caplog.at_level(logging.WARNING, logger="schnet_md.modelfile"):
        loaded, metadata = load_model(path)
        load_model(path)                                       # said once per file, not at every load
    assert metadata == {"preset": "custom"}
    assert torch.equal(loaded.readout.reference_energies, model.readout.reference_energies)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert f"v{version}.pt is a model file of format {version}" in lines[0] and "not its config" in lines[0]


def test_saving_again_gives_the_current_format_with_the_same_numbers(tmp_path, ethanol):
    z, r = ethanol
    model = small_model()
    old = _older_file(tmp_path / "old.pt", 2, model, {"preset": "custom"})
    loaded, metadata = load_model(old)
    new = save_model(loaded, tmp_path / "new.pt", metadata)
    assert torch.load(new, weights_only=True)["format_version"] == 3
    again, _ = load_model(new)
    assert torch.equal(again(z, r.float()), model(z, r.float()))


# ---- exported modules: their metadata checked against a checksum inside the module ---------------------------

def _replaced(path, old: bytes, new: bytes, out):
    """A copy of `path` with one byte string replaced by another of the same length (zip entries of TorchScript
    files are stored uncompressed, and torch reads them without checking the zip's CRC)."""
    data = path.read_bytes()
    assert data.count(old) == 1 and len(old) == len(new)
    out.write_bytes(data.replace(old, new))
    return out


def test_an_edited_or_damaged_export_is_refused(tmp_path):
    from schnet_md.export import export_model, load_exported
    from schnet_md.structures import read_structure

    structure = read_structure(SYSTEMS / "ethanol" / "ethanol.pdb")
    path = export_model(small_model(), structure, tmp_path / "force.pt")
    module, metadata = load_exported(path)
    assert metadata["atomic_numbers"][:3] == [6, 6, 8]
    # metadata that no longer describes the module: C C O said to be C O C
    edited = _replaced(path, b'"atomic_numbers": [6, 6, 8', b'"atomic_numbers": [6, 8, 6', tmp_path / "edited.pt")
    with pytest.raises(ModelFileError, match=r"edited.pt is damaged: its metadata \(schnet_md.json\) does not match "
                                             "the checksum inside the module"):
        load_exported(edited)
    # a flipped byte in the weights (the zip's own CRC is not checked by torch)
    weight = module.state_dict()["model.interactions.0.dense1.weight"].numpy().tobytes()[:32]
    flipped = bytearray(weight)
    flipped[5] ^= 0x40
    damaged = _replaced(path, weight, bytes(flipped), tmp_path / "damaged.pt")
    with pytest.raises(ModelFileError, match=r"damaged.pt is damaged: its contents \(weights, code or settings"):
        load_exported(damaged)
    # a number kept as a module attribute, outside the metadata and the tensors: the kcal/mol -> kJ/mol factor
    import struct

    factor = struct.pack(">d", module.kj_per_model_energy)        # as pickle stores a float
    unit = _replaced(path, factor, struct.pack(">d", 4.188), tmp_path / "unit.pt")
    with pytest.raises(ModelFileError, match=r"unit.pt is damaged: its contents \(weights, code or settings such as "
                                             "unit factors\) do not match"):
        load_exported(unit)


def test_exports_written_before_the_checksum_still_load(tmp_path, caplog):
    """A run folder's force.pt from before format 2 must still resume: loaded, with a one-line warning."""
    from schnet_md.export import METADATA_FILE, build_module, load_exported

    module, metadata = build_module(small_model(), [8, 1, 1])
    torch.jit.save(module, str(tmp_path / "old.pt"),
                   _extra_files={METADATA_FILE: json.dumps(dict(metadata, format_version=1))})
    with caplog.at_level(logging.WARNING, logger="schnet_md.modelfile"):
        _, loaded = load_exported(tmp_path / "old.pt")
    assert loaded["atomic_numbers"] == [8, 1, 1]
    assert len(caplog.records) == 1 and "exported before exports carried a checksum" in caplog.records[0].getMessage()


# ---- an exported force knows its atoms --------------------------------------------------------------------

def _energy(force, n_particles, positions_nm):
    import openmm

    system = openmm.System()
    for _ in range(n_particles):
        system.addParticle(12.0)
    system.addForce(force)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(positions_nm)
    return context.getState(getEnergy=True).getPotentialEnergy()._value


ETHANOL_ORDER = "9 particles: C2 H6 O1 in this order: C C O H H H H H H"


def test_create_torch_force_checks_an_exported_force_against_the_topology(tmp_path):
    from schnet_md.export import create_torch_force, export_model
    from schnet_md.structures import molecule_topology, read_structure

    structure = read_structure(SYSTEMS / "ethanol" / "ethanol.pdb")
    model = small_model()
    path = export_model(model, structure, tmp_path / "force.pt")
    e = _energy(create_torch_force(path, structure.topology), 9, structure.positions_nm)
    assert e == pytest.approx(_energy(create_torch_force(model, structure.topology), 9, structure.positions_nm),
                              rel=1e-6)
    # the same molecule with its oxygen first
    order = [2, 0, 1, 3, 4, 5, 6, 7, 8]
    swapped = molecule_topology(structure.atomic_numbers[order], structure.positions_nm[order] * 10)
    with pytest.raises(ValueError, match=rf"force.pt does not fit this system: atom 0 \(MOL1:O1\) is O here but C in "
                                         rf"the force, which expects {ETHANOL_ORDER}; export it again"):
        create_torch_force(path, swapped)
    with pytest.raises(ValueError, match="particle 0 is O here but C in the force"):
        create_torch_force(path, structure.atomic_numbers[order].tolist())
    with pytest.raises(ValueError, match=f"was exported for {ETHANOL_ORDER}, but the system has 8 particles"):
        create_torch_force(path, structure.atomic_numbers[:8].tolist())
    with pytest.raises(ValueError, match="acts on other particles than the 3 selected"):
        create_torch_force(path, structure.topology, atoms=[0, 1, 2])
    with pytest.raises(ValueError, match="is an exported force, so tabulate cannot change here"):
        create_torch_force(path, structure.topology, tabulate=True)


def test_export_prints_the_atoms_the_file_expects(tmp_path, capsys):
    from schnet_md.cli import main

    model = save_model(small_model(), tmp_path / "model.pt")
    assert main(["export", str(model), "--structure", str(SYSTEMS / "ethanol" / "ethanol.pdb"),
                 "--out", str(tmp_path / "force.pt")]) == 0
    assert f"it expects {ETHANOL_ORDER}" in capsys.readouterr().out
    assert main(["export", str(model), "--structure", str(SYSTEMS / "ethanol" / "ethanol.pdb"), "--atoms", "index 3 to 8",
                 "--out", str(tmp_path / "part.pt")]) == 0
    assert "it expects 9 particles, the model's atoms at particles 3-8: H6 in this order: H H H H H H" in \
        capsys.readouterr().out


def test_resume_refuses_a_topology_that_no_longer_fits_the_force(tmp_path):
    from schnet_md.simulate import SimulationSettings, resume_simulation, run_simulation
    from schnet_md.structures import molecule_topology, read_structure, write_pdb

    out = tmp_path / "md"
    run_simulation(SYSTEMS / "ethanol" / "ethanol.pdb", save_model(small_model(), tmp_path / "model.pt"), out,
                   SimulationSettings(steps=4, report_interval=2, platform="Reference"), progress=False)
    s = read_structure(out / "topology.pdb")
    order = [2, 0, 1, 3, 4, 5, 6, 7, 8]
    write_pdb(molecule_topology(s.atomic_numbers[order], s.positions_nm[order] * 10), s.positions_nm[order],
              out / "topology.pdb")
    with pytest.raises(ValueError, match=r"topology.pdb is not the file this run started with"):
        resume_simulation(out, steps=2, progress=False)
    info = json.loads((out / "run.json").read_text())
    del info["run_files"]                   # a run recorded before run files were: the atoms are still checked
    (out / "run.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"force.pt does not fit this system: atom 0 \(MOL1:O1\) is O here but C"):
        resume_simulation(out, steps=2, progress=False)


# ---- labels travel with the model ---------------------------------------------------------------------------

TINY = ["--max-frames", "20", "--epochs", "1", "--features", "8", "--interactions", "1", "--batch-size", "10"]


@pytest.fixture(scope="module")
def md17_model(tmp_path_factory):
    """A tiny model trained one epoch on 20 frames of ethanol's original MD17 labels (`train --labels old`)."""
    from schnet_md.cli import main

    out = tmp_path_factory.mktemp("md17")
    assert main(["train", "--data", str(shared_file("rmd17/rmd17_ethanol_train_01.npz")), "--labels", "old", *TINY,
                 "--out", str(out)]) == 0
    return out / "model.pt"


def test_the_model_records_its_labels_and_evaluate_uses_them(md17_model, tmp_path, capsys):
    """The README's `train --labels old` then `evaluate` compared MD17 predictions with rMD17 labels, ~120 kcal/mol
    apart, without a word. Now evaluate reads the labels the model was trained on, and refuses others unless
    told."""
    from schnet_md.cli import main
    from schnet_md.data import read_rmd17
    from schnet_md.evaluate import evaluate

    test = str(shared_file("rmd17/rmd17_ethanol_test_01.npz"))
    labels = load_model(md17_model)[1]["labels"]
    assert labels["set"] == "MD17" and "FHI-aims" in labels["energy_zero"]
    capsys.readouterr()
    assert main(["evaluate", str(md17_model), "--data", test, "--json", str(tmp_path / "own.json")]) == 0
    own = json.loads((tmp_path / "own.json").read_text())
    assert own["labels"] == "MD17" and "(old labels)" in own["data"]
    assert capsys.readouterr().err == ""
    assert main(["evaluate", str(md17_model), "--data", test, "--labels", "new"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was trained on MD17 labels" in err and "holds rMD17 labels" in err \
        and "--allow-label-mismatch" in err
    assert main(["evaluate", str(md17_model), "--data", test, "--labels", "new", "--allow-label-mismatch",
                 "--json", str(tmp_path / "other.json")]) == 0
    assert "warning: " in capsys.readouterr().err
    other = json.loads((tmp_path / "other.json").read_text())
    # what each command compared the model with: MD17's labels by default, rMD17's only when told
    model = load_model(md17_model)[0]
    for metrics, labels in ((own, "old"), (other, "new")):
        direct = evaluate(model, read_rmd17(test, labels))
        assert metrics["energy_mae_kcal_mol"] == pytest.approx(direct["energy_mae_kcal_mol"], rel=1e-12)
    assert abs(own["energy_mae_kcal_mol"] - other["energy_mae_kcal_mol"]) > 10


def test_init_across_label_sets_says_what_it_does(md17_model, tmp_path, capsys):
    from schnet_md.cli import main

    capsys.readouterr()
    assert main(["train", "--init", str(md17_model), "--data", str(shared_file("rmd17/rmd17_ethanol_train_02.npz")),
                 *TINY, "--out", str(tmp_path / "tuned")]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("--init")]
    assert len(lines) == 1 and "was trained on MD17 labels" in lines[0] and "holds rMD17 labels" in lines[0] \
        and "energies will shift" in lines[0]
    assert load_model(tmp_path / "tuned" / "model.pt")[1]["labels"]["set"] == "rMD17"


def test_models_and_files_without_a_label_record_get_a_note(tmp_path, capsys):
    from schnet_md.cli import main
    from schnet_md.data import read_rmd17
    from schnet_md.reference import write_rmd17

    test = shared_file("rmd17/rmd17_ethanol_test_01.npz")
    older = save_model(small_model(), tmp_path / "older.pt", {"preset": "custom"})   # no "labels": as before
    capsys.readouterr()
    assert main(["evaluate", str(older), "--data", str(test)]) == 0
    err = capsys.readouterr().err
    assert err.startswith("note: ") and "does not record the labels it was trained on" in err
    # schnet-md's own label files name their method; one written before that does not say
    frames = read_rmd17(test).subset(range(3))
    z, r = frames.atomic_numbers[:9], frames.positions.reshape(3, 9, 3)
    args = (z, r, frames.energies, frames.forces.reshape(3, 9, 3), np.arange(3))
    write_rmd17(tmp_path / "xtb.npz", *args, method="GFN2-xTB")
    write_rmd17(tmp_path / "unnamed.npz", *args)
    assert read_rmd17(tmp_path / "xtb.npz").label_set == "GFN2-xTB"
    assert read_rmd17(tmp_path / "unnamed.npz").label_set == ""
    assert read_rmd17(test, "new").label_set == "rMD17" and read_rmd17(test, "old").label_set == "MD17"


def test_refine_refuses_data_with_other_labels_than_the_model(md17_model, tmp_path):
    """Fine-tuning an MD17-label model on rMD17 labels would learn the ~120 kcal/mol between their zeros."""
    from schnet_md.data import read_rmd17
    from schnet_md.refine import refine

    data = read_rmd17(shared_file("rmd17/rmd17_ethanol_train_02.npz"), "new")
    with pytest.raises(ValueError, match="was trained on MD17 labels.*holds rMD17 labels"):
        refine(md17_model, [SYSTEMS / "ethanol" / "ethanol.pdb"], data.subset(range(20)), tmp_path / "refine")
    assert not (tmp_path / "refine").exists()                 # refused before anything was written
