"""Bad input gets a clear error, never a silently wrong energy."""

from __future__ import annotations

import os

import numpy as np
import openmm
import pytest
import torch

from conftest import SYSTEMS, random_model
from schnet_md.export import create_torch_force, export_model, load_exported
from schnet_md.modelfile import ModelFileError, load_model, save_model
from schnet_md.structures import molecule_topology, read_structure


def hco_model():
    return random_model(elements=(1, 6, 8), dtype=torch.float32)


def test_unknown_element_is_named(ethanol):
    z, r = ethanol
    model = hco_model()
    z_with_n = z.clone()
    z_with_n[2] = 7
    with pytest.raises(ValueError, match=r"element N \(atomic number 7\) is not one this model was trained on "
                                         r"\(H, C, O\)"):
        model(z_with_n, r.float())
    with pytest.raises(ValueError, match="element N"):
        create_torch_force(model, z_with_n.tolist())


def test_nan_coordinates(ethanol):
    z, r = ethanol
    model = hco_model()
    bad = r.float().clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model(z, bad)
    system = openmm.System()
    for _ in z:
        system.addParticle(12.0)
    system.addForce(create_torch_force(model, z.tolist()))
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(bad.numpy() / 10)
    with pytest.raises(Exception, match="NaN"):
        context.getState(getEnergy=True)


def test_particle_count_must_match_the_export(ethanol):
    z, r = ethanol
    force = create_torch_force(hco_model(), z.tolist())
    system = openmm.System()
    for _ in range(len(z) + 1):
        system.addParticle(12.0)
    system.addForce(force)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(np.zeros((len(z) + 1, 3)) + np.arange(len(z) + 1)[:, None] * 0.2)
    with pytest.raises(Exception, match="exported for a system of 9 particles"):
        context.getState(getEnergy=True)
    with pytest.raises(ValueError, match="positions must have shape"):
        hco_model()(z, r[:5].float())


def test_cutoff_too_large_for_the_box():
    model = random_model("schnet2018", elements=(1, 8), n_features=16, n_interactions=1, dtype=torch.float32)
    box_nm = np.diag([0.9, 1.2, 1.2])   # cutoff 5 Å > 4.5 Å = half of 0.9 nm
    top = molecule_topology([8, 1, 1], box_nm=box_nm)
    system = openmm.System()
    for _ in range(3):
        system.addParticle(12.0)
    system.setDefaultPeriodicBoxVectors(*[openmm.Vec3(*v) for v in box_nm])
    system.addForce(create_torch_force(model, top))
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions([[0, 0, 0], [0.1, 0, 0], [0, 0.1, 0]])
    with pytest.raises(Exception, match=r"cutoff \(5\.0? Angstrom\) is larger than half the smallest box height"):
        context.getState(getEnergy=True)


def test_missing_truncated_and_corrupt_model_files(tmp_path):
    with pytest.raises(ModelFileError, match="neither a file nor a shipped model"):
        load_model(tmp_path / "nope.pt")
    good = save_model(hco_model(), tmp_path / "model.pt")
    load_model(good)
    data = good.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="damaged or truncated"):
        load_model(tmp_path / "truncated.pt")
    # random bytes make the unpickler fail in many ways (IndexError, KeyError, ...): each must be a clear error
    rng = np.random.default_rng(0)
    for k in range(40):
        (tmp_path / "garbage.pt").write_bytes(rng.integers(0, 256, size=int(rng.integers(1, 3000)), dtype=np.uint8)
                                              .tobytes())
        with pytest.raises(ModelFileError):
            load_model(tmp_path / "garbage.pt")
    (tmp_path / "garbage.pt").write_bytes(os.urandom(2000))
    with pytest.raises(ModelFileError):
        load_model(tmp_path / "garbage.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(ModelFileError, match="not a schnet-md model file"):
        load_model(tmp_path / "foreign.pt")


def test_truncated_exported_force_file(tmp_path):
    structure = read_structure(SYSTEMS / "ethanol" / "ethanol.pdb")
    path = export_model(hco_model(), structure, tmp_path / "force.pt")
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelFileError, match="not a readable TorchScript force file"):
        load_exported(tmp_path / "cut.pt")


class _Payload:
    """Unpickling this object would create a file: the marker shows whether code ran."""
    marker = None

    def __reduce__(self):
        return (open, (str(_Payload.marker), "w"))


def test_model_file_with_pickled_object_is_refused_without_running_it(tmp_path):
    _Payload.marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "schnet-md/model", "format_version": 1, "config": "{}", "metadata": "{}",
                "state_dict": {}, "extra": _Payload()}, evil)
    assert not _Payload.marker.exists()
    with pytest.raises(ModelFileError, match="refused by the weights-only loader") as refused:
        load_model(evil)
    assert not _Payload.marker.exists(), "loading the model file executed code"
    assert "weights_only" not in str(refused.value)     # never torch's advice to load it with code execution on


def test_files_that_are_not_model_files_say_what_they_are(tmp_path, capsys):
    """An exported force, a structure or a data file given where a model file belongs: one line that says what
    the file is and what was expected, never torch's advice to load with weights_only=False."""
    from schnet_md.cli import main
    from schnet_md.lammps import export_lammps

    structure = read_structure(SYSTEMS / "ethanol" / "ethanol.pdb")
    np.savez(tmp_path / "frames.npz", coords=np.zeros((2, 3, 3)))
    (tmp_path / "mol.xyz").write_text("1\n\nH 0 0 0\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    cases = {
        export_model(hco_model(), structure, tmp_path / "force.pt"): "an exported OpenMM force",
        export_lammps(hco_model(), tmp_path / "lammps.pt"): "an exported LAMMPS module",
        SYSTEMS / "ethanol" / "ethanol.pdb": "a PDB structure file",
        tmp_path / "frames.npz": "a NumPy .npz archive",
        tmp_path / "mol.xyz": "an XYZ structure file",
        tmp_path / "empty.pt": "an empty file",
    }
    for path, what in cases.items():
        with pytest.raises(ModelFileError) as refused:
            load_model(path)
        message = str(refused.value)
        assert message.startswith(f"{path} is {what}") and "not a schnet-md model file" in message, message
        assert "weights_only" not in message and "\n" not in message
    code = main(["export", str(tmp_path / "force.pt"), "--structure", str(SYSTEMS / "ethanol" / "ethanol.pdb"),
                 "--out", str(tmp_path / "again.pt")])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "is an exported OpenMM force" in err and "Traceback" not in err
    run = save_model(hco_model(), tmp_path / "run" / "model.pt").parent
    with pytest.raises(ModelFileError, match=f"{run} is a folder, not a model file; did you mean {run}/model.pt"):
        load_model(run)


def test_a_model_file_under_a_non_ascii_path(tmp_path):
    """save, load, export and simulate with a model file at ü/模型.pt"""
    from schnet_md.simulate import SimulationSettings, run_simulation

    path = save_model(hco_model(), tmp_path / "ü" / "模型.pt")
    model, _ = load_model(path)
    structure = read_structure(SYSTEMS / "ethanol" / "ethanol.pdb")
    force = export_model(path, structure, tmp_path / "ü" / "力.pt")
    assert load_exported(force)[1]["atomic_numbers"] == structure.atomic_numbers.tolist()
    result = run_simulation(SYSTEMS / "ethanol" / "ethanol.pdb", path, tmp_path / "ü" / "运行",
                            SimulationSettings(steps=10, report_interval=5, platform="Reference"), progress=False)
    assert result.n_frames == 2 and result.steps_done == 10


def test_bad_structure_files(tmp_path):
    (tmp_path / "x.xyz").write_text("2\n\nXx 0 0 0\nH 0 0 0.7\n")
    with pytest.raises(ValueError, match="unknown element symbol 'Xx'"):
        read_structure(tmp_path / "x.xyz")
    (tmp_path / "nan.xyz").write_text("2\n\nH 0 0 nan\nH 0 0 0.7\n")
    with pytest.raises(ValueError, match="NaN"):
        read_structure(tmp_path / "nan.xyz")
    (tmp_path / "short.xyz").write_text("3\n\nH 0 0 0\nH 0 0 0.7\n")
    with pytest.raises(ValueError, match="not a valid XYZ"):
        read_structure(tmp_path / "short.xyz")
    with pytest.raises(FileNotFoundError):
        read_structure(tmp_path / "missing.pdb")
