"""Adversarial probes, each a case a careful user found (issue #14): no silent data loss, no silently wrong
result, a clear error instead of a traceback. Each test fails without its fix."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, SYSTEMS, random_model, shared_file
from schnet_md.cli import main
from schnet_md.modelfile import ModelFileError, load_model, save_model
from schnet_md.structures import read_structure


def cli(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def ethanol_npz():
    return shared_file("rmd17/rmd17_ethanol_train_01.npz")


TINY = ["--max-frames", "30", "--features", "8", "--interactions", "1", "--batch-size", "10", "--labels", "old"]


# ---- training: nothing overwritten, resume means the recorded run, settings validated -----------------------

def test_train_refuses_to_overwrite_a_finished_run(tmp_path, capsys, ethanol_npz):
    out = tmp_path / "run"
    assert cli(capsys, "train", "--data", ethanol_npz, *TINY, "--epochs", "1", "--out", out)[0] == 0
    before = (out / "model.pt").read_bytes()
    code, _, err = cli(capsys, "train", "--data", ethanol_npz, *TINY, "--epochs", "1", "--out", out)
    assert code == 1 and "already holds a run (training: config.json)" in err and "--resume" in err and "--overwrite" in err
    assert (out / "model.pt").read_bytes() == before
    assert cli(capsys, "train", "--data", ethanol_npz, *TINY, "--epochs", "1", "--seed", "5", "--out", out,
               "--overwrite")[0] == 0


def test_resume_refuses_changed_meaning_and_keeps_config(tmp_path, capsys, ethanol_npz):
    out = tmp_path / "run"
    assert cli(capsys, "train", "--data", ethanol_npz, *TINY, "--epochs", "1", "--out", out)[0] == 0
    config_before = (out / "config.json").read_text()
    for change in (["--seed", "7"], ["--lr", "0.1"], ["--max-frames", "20"], ["--features", "16"]):
        code, _, err = cli(capsys, "train", "--resume", "--out", out, "--epochs", "2", *change)
        assert code == 1 and "differ from it" in err, change
        assert (out / "config.json").read_text() == config_before, f"{change} rewrote config.json"
    code, _, err = cli(capsys, "train", "--resume", "--out", out, "--epochs", "2", "--data",
                       str(shared_file("rmd17/rmd17_ethanol_test_01.npz")))
    assert code == 1 and "data.path" in err
    # a resume that cannot start (no checkpoint) leaves config.json alone too
    (out / "checkpoint.pt").rename(out / "moved.pt")
    assert cli(capsys, "train", "--resume", "--out", out, "--epochs", "2")[0] == 1
    assert (out / "config.json").read_text() == config_before
    (out / "moved.pt").rename(out / "checkpoint.pt")
    assert cli(capsys, "train", "--resume", "--out", out, "--epochs", "2")[0] == 0
    assert json.loads((out / "config.json").read_text())["training"]["epochs"] == 2


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "epochs must be at least 1"),
    (["--epochs", "-3"], "epochs must be at least 1"),
    (["--validation-fraction", "1.0"], "validation_fraction"),
    (["--batch-size", "0"], "batch_size must be at least 1"),
    (["--batch-size", "-4"], "batch_size must be at least 1"),
    (["--rho", "-1"], "rho"),
    (["--lr", "-0.001"], "learning_rate must be >= 0"),
])
def test_train_settings_are_validated(tmp_path, capsys, ethanol_npz, flags, message):
    code, out, err = cli(capsys, "train", "--data", ethanol_npz, *TINY, *flags, "--out", tmp_path / "run")
    assert code == 1 and message in err
    assert "model written" not in out and not (tmp_path / "run" / "model.pt").exists()


def test_a_one_frame_data_set_is_refused(tmp_path, capsys, ethanol_npz):
    code, _, err = cli(capsys, "train", "--data", ethanol_npz, *TINY[2:], "--max-frames", "1", "--out", tmp_path)
    assert code == 1 and "at least one of each" in err


def test_diverged_training_is_an_error_that_keeps_the_last_good_model(tmp_path, ethanol_npz):
    from schnet_md.data import read_rmd17
    from schnet_md.model import config_from_preset
    from schnet_md.train import TrainingError, TrainSettings, train

    data = read_rmd17(ethanol_npz).subset(range(30))
    config = config_from_preset("schnet2017", data.elements, n_features=8, n_interactions=1)
    train(data, config, tmp_path, TrainSettings(epochs=1, batch_size=10), log=lambda _: None)
    good = (tmp_path / "model.pt").read_bytes()
    data.forces[:] = np.nan                     # whatever makes the loss non-finite (here: the labels)
    with pytest.raises(TrainingError, match=r"diverged.*keeps the model of epoch 1"):
        train(data, config, tmp_path, TrainSettings(epochs=3, batch_size=10), resume=True, log=lambda _: None)
    assert (tmp_path / "model.pt").read_bytes() == good


def test_config_file_with_wrong_types_or_unknown_keys(tmp_path, capsys, ethanol_npz):
    bad_type = tmp_path / "a.toml"
    bad_type.write_text(f'[data]\npath = "{ethanol_npz}"\n[training]\nepochs = "ten"\n')
    code, _, err = cli(capsys, "train", "--config", bad_type, "--out", tmp_path / "a")
    assert code == 1 and "epochs must be a whole number" in err
    bad_key = tmp_path / "b.toml"
    bad_key.write_text(f'[data]\npath = "{ethanol_npz}"\n[model]\nfeatures = 16\n')
    code, _, err = cli(capsys, "train", "--config", bad_key, "--out", tmp_path / "b")
    assert code == 1 and "unknown [model] key(s) features" in err


def test_damaged_training_checkpoint_is_a_clear_error(tmp_path, capsys, ethanol_npz):
    out = tmp_path / "run"
    assert cli(capsys, "train", "--data", ethanol_npz, *TINY, "--epochs", "1", "--out", out)[0] == 0
    data = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    code, _, err = cli(capsys, "train", "--resume", "--out", out, "--epochs", "2")
    assert code == 1 and "damaged" in err


def test_truncated_npz_is_a_clear_error(tmp_path, capsys, ethanol_npz):
    cut = tmp_path / "cut.npz"
    cut.write_bytes(ethanol_npz.read_bytes()[:5000])
    code, _, err = cli(capsys, "train", "--data", cut, *TINY, "--out", tmp_path / "run")
    assert code == 1 and "error" in err and "Traceback" not in err


# ---- model files and exports ---------------------------------------------------------------------------------

def test_flipped_bytes_in_the_weights_are_refused(tmp_path):
    path = save_model(random_model(elements=(1, 6, 8), dtype=torch.float32), tmp_path / "model.pt")
    data = bytearray(path.read_bytes())
    payload = torch.load(path, weights_only=True)
    weight = payload["state_dict"]["interactions.0.dense1.weight"].numpy().tobytes()
    at = bytes(data).find(weight[:64])
    assert at > 0
    for k in range(3):
        data[at + 17 * k + 5] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="damaged: its config, metadata or weights do not match the checksum"):
        load_model(path)


def test_every_shipped_model_carries_a_checksum_and_its_labels():
    from schnet_md.modelfile import shipped_models, trained_labels

    for name, path in shipped_models().items():
        payload = torch.load(path, weights_only=True)
        assert payload["format_version"] == 3 and payload.get("sha256"), name   # config and metadata covered too
        assert trained_labels(load_model(name)[1]) in ("rMD17", "GFN2-xTB"), name


def test_export_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "force.pt"
    out.write_text("my results")
    code, _, err = cli(capsys, "export", "ethanol", "--structure", SYSTEMS / "ethanol" / "ethanol.pdb", "--out", out)
    assert code == 1 and "--overwrite" in err and out.read_text() == "my results"
    assert cli(capsys, "export", "ethanol", "--structure", SYSTEMS / "ethanol" / "ethanol.pdb", "--out", out,
               "--overwrite")[0] == 0


def test_export_warns_when_one_force_covers_two_molecules(tmp_path):
    from schnet_md.export import create_torch_force
    from schnet_md.structures import molecule_topology

    s = read_structure(SYSTEMS / "ethanol" / "ethanol.pdb")
    r = s.positions_nm * 10
    two = molecule_topology(list(s.atomic_numbers) * 2, np.vstack([r, r + [8.0, 0, 0]]))
    with pytest.warns(UserWarning, match="2 separate molecules"):
        create_torch_force("ethanol", two)


def test_atoms_example_in_export_help_parses():
    from schnet_md.cli import build_parser
    from schnet_md.structures import select_atoms

    help_text = build_parser()._subparsers._group_actions[0].choices["export"].format_help()
    example = help_text.split("'index", 1)[1].split("'", 1)[0]
    s = read_structure(SYSTEMS / "ethanol" / "ethanol.pdb")
    assert len(select_atoms(s, "index" + example)) > 0


# ---- structures ------------------------------------------------------------------------------------------------

def strip_conect(tmp_path, name="ethanol"):
    text = (SYSTEMS / name / f"{name}.pdb").read_text()
    path = tmp_path / f"{name}-no-conect.pdb"
    path.write_text("".join(line for line in text.splitlines(keepends=True) if not line.startswith("CONECT")))
    return path


def test_pdb_without_conect_gets_bonds_from_geometry(tmp_path):
    s = read_structure(strip_conect(tmp_path))
    assert len(list(s.topology.bonds())) == 8           # C-C, C-O, O-H, 5 C-H
    assert len(list(read_structure(strip_conect(tmp_path, "aspirin")).topology.bonds())) == 21


def test_molecule_wrapped_across_the_box_keeps_its_bonds(tmp_path):
    from schnet_md.simulate import BlowUpGuard

    s = read_structure(SYSTEMS / "ethanol" / "ethanol.pdb")
    box = 1.5
    wrapped = (s.positions_nm - s.positions_nm[0]) % box           # atom 0 at the corner: the molecule is split
    lines = [f"{s.n_atoms}", f'Lattice="{box * 10} 0 0 0 {box * 10} 0 0 0 {box * 10}"']
    lines += [f"{a.element.symbol} {x * 10:.6f} {y * 10:.6f} {z * 10:.6f}" for a, (x, y, z) in
              zip(s.topology.atoms(), wrapped)]
    (tmp_path / "wrapped.xyz").write_text("\n".join(lines) + "\n")
    w = read_structure(tmp_path / "wrapped.xyz")
    assert len(list(w.topology.bonds())) == 8
    BlowUpGuard(w.topology).check(0, w.positions_nm, w.box_nm)     # no false "new bond"


@pytest.mark.parametrize("case", ["overlap", "overlap_xyz", "far", "cut_pdb", "xyz_count", "empty_pdb"])
def test_broken_structures_are_refused(tmp_path, case):
    pdb = (SYSTEMS / "ethanol" / "ethanol.pdb").read_text()
    if case == "overlap":
        lines = pdb.splitlines()
        atom = next(line for line in lines if line.startswith(("ATOM", "HETATM")))
        path = tmp_path / "x.pdb"
        path.write_text("\n".join(lines[:2] + [atom] + lines[2:]) + "\n")
        match = "duplicated atom"                       # OpenMM's reader alone would drop it with a warning
    elif case == "overlap_xyz":
        path = tmp_path / "x.xyz"
        path.write_text("3\n\nC 0 0 0\nO 1.2 0 0\nH 0.1 0 0\n")
        match = "atoms 1 and 3 overlap"
    elif case == "far":
        path = tmp_path / "x.xyz"
        path.write_text("2\n\nC 0 0 0\nO 1e6 0 0\n")
        match = "from the origin"
    elif case == "cut_pdb":
        path = tmp_path / "x.pdb"
        last_atom = pdb.rfind("HETATM") if "HETATM" in pdb else pdb.rfind("ATOM")
        path.write_text(pdb[:last_atom + 40])
        match = "cut short"
    elif case == "xyz_count":
        path = tmp_path / "x.xyz"
        path.write_text("2\n\nC 0 0 0\nO 1.2 0 0\nH 2.2 0 0\n")
        match = "the count line says 2 atoms"
    else:
        path = tmp_path / "x.pdb"
        path.write_text("")
        match = "no atoms|cannot read"
    with pytest.raises(ValueError, match=match):
        read_structure(path)


# ---- simulation: seeds, minimisation, resume ------------------------------------------------------------------

def simulate(capsys, *args):
    return cli(capsys, "simulate", *args)


def test_seed_zero_records_the_seed_used_and_reproduces(tmp_path, capsys):
    structure = SYSTEMS / "ethanol" / "ethanol.pdb"
    assert simulate(capsys, structure, "--model", "ethanol", "--out", tmp_path / "a", "--steps", "40",
                    "--platform", "Reference")[0] == 0
    seed = json.loads((tmp_path / "a" / "run.json").read_text())["settings"]["seed"]
    assert seed != 0
    assert simulate(capsys, structure, "--model", "ethanol", "--out", tmp_path / "b", "--steps", "40",
                    "--platform", "Reference", "--seed", seed)[0] == 0
    assert (tmp_path / "a" / "state.csv").read_text().splitlines()[-1].split(",")[:6] == \
        (tmp_path / "b" / "state.csv").read_text().splitlines()[-1].split(",")[:6]
    code, _, err = simulate(capsys, structure, "--model", "ethanol", "--out", tmp_path / "c", "--seed", 2 ** 40)
    assert code == 1 and "seed must lie in" in err


def test_ethanol_without_conect_is_not_a_false_blow_up(tmp_path, capsys):
    code, out, err = simulate(capsys, strip_conect(tmp_path), "--model", "ethanol", "--out", tmp_path / "run",
                              "--steps", "60", "--report-interval", "10", "--platform", "Reference")
    assert code == 0, err


def test_minimisation_that_breaks_the_molecule_stops_before_step_zero(tmp_path):
    from schnet_md.simulate import SimulationError, SimulationSettings, run_simulation

    # a random-weight model has spurious minima: minimisation tears the molecule apart
    model = random_model(elements=(1, 6, 8), dtype=torch.float32, seed=3)
    with torch.no_grad():
        model.readout.scale.fill_(-300.0)        # deep attraction everywhere: atoms collapse or fly
    path = save_model(model, tmp_path / "bad.pt")
    with pytest.raises(SimulationError, match="minimisation broke the molecule") as err:
        run_simulation(SYSTEMS / "ethanol" / "ethanol.pdb", path, tmp_path / "run",
                       SimulationSettings(steps=10, minimize=True, platform="Reference"), progress=False)
    assert "input.pdb" in str(err.value)
    assert (tmp_path / "run" / "input.pdb").is_file() and not (tmp_path / "run" / "checkpoint.chk").exists()


def test_resume_checks(tmp_path, capsys):
    structure = SYSTEMS / "ethanol" / "ethanol.pdb"
    out = tmp_path / "run"
    # a run that wrote no frame can be resumed
    assert simulate(capsys, structure, "--model", "ethanol", "--out", out, "--steps", "0",
                    "--platform", "Reference")[0] == 0
    assert simulate(capsys, "--resume", out, "--steps", "20")[0] == 0
    code, _, err = simulate(capsys, "--resume", out, "--steps", "-10")
    assert code == 1 and "--steps must be at least 1" in err
    code, _, err = simulate(capsys, SYSTEMS / "aspirin" / "aspirin.pdb", "--model", "ethanol", "--resume", out)
    assert code == 1 and "cannot switch" in err
    code, _, err = simulate(capsys, structure, "--model", "aspirin", "--resume", out)
    assert code == 1 and "cannot switch" in err


def test_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    structure = SYSTEMS / "ethanol" / "ethanol.pdb"
    out = tmp_path / "run"
    assert simulate(capsys, structure, "--model", "ethanol", "--out", out, "--steps", "40", "--report-interval", "10",
                    "--checkpoint-interval", "20", "--platform", "Reference")[0] == 0
    checkpoint = out / "checkpoint.chk"
    checkpoint.write_bytes(checkpoint.read_bytes()[:-100])        # cut short
    code, _, err = simulate(capsys, "--resume", out, "--steps", "20")
    assert code == 0, err
    assert "does not match the size and checksum" in err and "previous checkpoint" in err


def test_checkpoint_from_another_platform_names_it(tmp_path, capsys):
    structure = SYSTEMS / "ethanol" / "ethanol.pdb"
    out = tmp_path / "run"
    assert simulate(capsys, structure, "--model", "ethanol", "--out", out, "--steps", "20",
                    "--platform", "Reference")[0] == 0
    code, _, err = simulate(capsys, "--resume", out, "--steps", "20", "--platform", "CPU")
    assert code == 1 and "--platform Reference" in err


def test_progress_lines_when_output_is_not_a_terminal(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "schnet_md.cli", "simulate", str(SYSTEMS / "ethanol" / "ethanol.pdb"),
                           "--model", "ethanol", "--out", str(tmp_path / "run"), "--steps", "100", "--threads", "1",
                           "--platform", "Reference"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "MD: step 100 (100/100 this run, 100%)" in proc.stderr


# ---- analysis and comparison ------------------------------------------------------------------------------------

def test_compare_refuses_two_different_isomers(tmp_path, capsys):
    shared_file("iso17x/iso17x.npz")
    code, _, err = cli(capsys, "compare", "iso17x:1", "iso17x:2", "--out", tmp_path)
    assert code == 1 and "different molecules" in err


def test_compare_labels_and_iso17x_names_are_checked(tmp_path, capsys):
    code, _, err = cli(capsys, "compare", "iso17x:abc", "iso17x:1", "--out", tmp_path)
    assert code == 1 and "isomer number" in err
    code, _, err = cli(capsys, "compare", "iso17x:1", "iso17x:1", "--labels", "only-one", "--out", tmp_path)
    assert code == 1 and "--labels names 1" in err


def test_analyze_bare_dcd_needs_a_time_step(tmp_path, capsys):
    run = tmp_path / "run"
    assert simulate(capsys, SYSTEMS / "ethanol" / "ethanol.pdb", "--model", "ethanol", "--out", run, "--steps", "40",
                    "--platform", "Reference")[0] == 0
    bare = tmp_path / "bare.dcd"
    bare.write_bytes((run / "trajectory.dcd").read_bytes())
    code, _, err = cli(capsys, "analyze", bare, "--top", run / "topology.pdb", "--out", tmp_path / "a")
    assert code == 1 and "--timestep" in err
    assert cli(capsys, "analyze", bare, "--top", run / "topology.pdb", "--timestep", "0.005",
               "--out", tmp_path / "b")[0] == 0
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["time_ps"] == pytest.approx([0.0, 0.015])


def test_alanine_dipeptide_analysis_has_phi_psi_and_no_amide_rotors(tmp_path):
    import mdtraj

    from schnet_md.analysis.analyze import analyze
    from schnet_md.analysis.load import LoadedTrajectory

    traj = mdtraj.load(str(SYSTEMS / "alanine-dipeptide" / "alanine-dipeptide.pdb"))
    summary = analyze(LoadedTrajectory(traj, "ala2"))
    assert len(summary["backbone"]) == 1 and np.isfinite(summary["backbone"][0]["phi_deg"]).all()
    assert [d["name"] for d in summary["dihedrals"]] == ["C-N-CA-CB", "N-CA-C-O"]   # N-CA and CA-C only
    from schnet_md.analysis.dihedrals import rotatable_dihedrals

    quads, _ = rotatable_dihedrals(traj.topology, traj.xyz[0])
    amide_bonds = {(4, 6), (14, 16)}                      # ACE C - ALA N, ALA C - NME N
    assert not any(tuple(sorted(q[1:3])) in amide_bonds for q in quads.tolist())


# ---- other clear errors ---------------------------------------------------------------------------------------

def test_bench_inputs(tmp_path, capsys, monkeypatch):
    code, _, err = cli(capsys, "bench", "water:-5")
    assert code == 1 and "water:N" in err
    monkeypatch.chdir(tmp_path)                          # not the repository root
    code, _, err = cli(capsys, "bench", "nothing-here")
    assert code == 1 and "ready-to-run systems" in err


def test_unwritable_output_folder_is_a_clear_error(tmp_path, capsys):
    """OSError (read-only, full or impossible folders) is one line, not a traceback; a file in the way stands in
    for a read-only folder, which root (CI) could write anyway."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, _, err = simulate(capsys, SYSTEMS / "ethanol" / "ethanol.pdb", "--model", "ethanol", "--out", blocker / "x")
    assert code == 1 and "schnet-md simulate: error:" in err and "Traceback" not in err
