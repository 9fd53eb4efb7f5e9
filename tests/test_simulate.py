"""The MD runner: outputs mdtraj reads, checkpoints, and resuming without lost or duplicated frames."""

from __future__ import annotations

import csv
import json
import shutil

import mdtraj
import numpy as np
import pytest
import torch

from conftest import SYSTEMS, random_model
from schnet_md.cli import main
from schnet_md.modelfile import save_model
from schnet_md.simulate import SimulationSettings, resume_simulation, run_simulation

ETHANOL = SYSTEMS / "ethanol" / "ethanol.pdb"


@pytest.fixture
def model_file(tmp_path):
    model = random_model(elements=(1, 6, 8), dtype=torch.float32)
    with torch.no_grad():   # a gentle random potential: stays bound for a few dozen steps
        model.readout.scale.fill_(0.1)
    return save_model(model, tmp_path / "model.pt")


def rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def settings(**kw):
    base = dict(steps=40, timestep_fs=0.25, temperature_k=100.0, report_interval=10, checkpoint_interval=20,
                platform="Reference", seed=1)
    base.update(kw)
    return SimulationSettings(**base)


def test_run_writes_what_mdtraj_reads(tmp_path, model_file):
    result = run_simulation(ETHANOL, model_file, tmp_path / "run", settings(), progress=False)
    assert result.n_frames == 4 and result.steps_done == 40 and result.platform == "Reference"
    traj = mdtraj.load(str(result.trajectory), top=str(tmp_path / "run" / "topology.pdb"))
    assert traj.n_frames == 4 and traj.n_atoms == 9
    assert traj.topology.n_bonds == 8
    table = rows(result.state_csv)
    assert [int(r["step"]) for r in table] == [10, 20, 30, 40]
    assert [float(r["time_ps"]) for r in table] == pytest.approx([0.0025, 0.005, 0.0075, 0.01])
    for r in table:
        assert float(r["total_kj_mol"]) == pytest.approx(float(r["potential_kj_mol"]) + float(r["kinetic_kj_mol"]))
    for name in ("checkpoint.chk", "final.chk", "force.pt", "run.json"):
        assert (tmp_path / "run" / name).is_file()
    with pytest.raises(ValueError, match="already holds a run"):
        run_simulation(ETHANOL, model_file, tmp_path / "run", settings(), progress=False)


def test_resume_continues_the_same_trajectory(tmp_path, model_file):
    out = tmp_path / "run"
    run_simulation(ETHANOL, model_file, out, settings(steps=20), progress=False)
    checkpoint_at_20 = tmp_path / "ck20.chk"
    shutil.copy(out / "checkpoint.chk", checkpoint_at_20)
    resume_simulation(out, steps=20, progress=False)
    assert len(mdtraj.load(str(out / "trajectory.dcd"), top=str(out / "topology.pdb"))) == 4
    first_pass = mdtraj.load(str(out / "trajectory.dcd"), top=str(out / "topology.pdb")).xyz

    # A run killed after writing frames 30 and 40 but before its step-40 checkpoint: resuming from the
    # step-20 checkpoint must drop those frames and rows, then write them again, once.
    shutil.copy(checkpoint_at_20, out / "checkpoint.chk")
    result = resume_simulation(out, steps=40, progress=False)
    assert result.steps_done == 60 and result.n_frames == 6
    traj = mdtraj.load(str(out / "trajectory.dcd"), top=str(out / "topology.pdb"))
    assert traj.n_frames == 6
    np.testing.assert_allclose(traj.xyz[:2], first_pass[:2])   # frames before the checkpoint kept as they were
    steps = [int(r["step"]) for r in rows(out / "state.csv")]
    assert steps == [10, 20, 30, 40, 50, 60]
    times = np.array([float(r["time_ps"]) for r in rows(out / "state.csv")])
    np.testing.assert_allclose(np.diff(times), 0.0025, atol=1e-9)


def test_resume_finishes_a_killed_run_and_extends_a_finished_one_only_when_asked(tmp_path, model_file, monkeypatch):
    import json

    import schnet_md.simulate as simulate

    real_report = simulate.AtomicCheckpointReporter.report

    def killed_after_the_first_checkpoint(self, simulation, state):
        real_report(self, simulation, state)
        if simulation.currentStep == 20:
            raise KeyboardInterrupt      # the batch system's kill, right after the step-20 checkpoint

    out = tmp_path / "run"
    monkeypatch.setattr(simulate.AtomicCheckpointReporter, "report", killed_after_the_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        run_simulation(ETHANOL, model_file, out, settings(steps=60), progress=False)
    monkeypatch.undo()
    assert json.loads((out / "run.json").read_text())["steps_done"] == 20     # where a resume starts
    result = resume_simulation(out, progress=False)          # the 40 steps the run still owed, not 60 more
    assert result.steps_done == 60 and [int(r["step"]) for r in rows(out / "state.csv")] == [10, 20, 30, 40, 50, 60]
    with pytest.raises(ValueError, match="already ran its 60 steps"):
        resume_simulation(out, progress=False)
    assert resume_simulation(out, steps=20, progress=False).steps_done == 80
    assert json.loads((out / "run.json").read_text())["target_step"] == 80
    assert resume_simulation(out, to_step=100, progress=False).steps_done == 100    # a length, not a count
    with pytest.raises(ValueError, match="not both"):
        resume_simulation(out, steps=10, to_step=120, progress=False)


def test_cli_simulate_and_resume(tmp_path, model_file, capsys):
    out = tmp_path / "cli"
    assert main(["simulate", str(ETHANOL), "--model", str(model_file), "--out", str(out), "--steps", "20",
                 "--timestep", "0.25", "--temperature", "100", "--report-interval", "5",
                 "--platform", "Reference"]) == 0
    assert "ns/day" in capsys.readouterr().out
    assert main(["simulate", "--resume", str(out), "--steps", "10"]) == 0
    assert [int(r["step"]) for r in rows(out / "state.csv")] == [5, 10, 15, 20, 25, 30]
    assert main(["simulate", "--resume", str(tmp_path / "nothing-here")]) == 1
    assert "holds no run to resume" in capsys.readouterr().err


def test_cli_simulate_with_tabulated_filters(tmp_path, model_file, capsys):
    from schnet_md.export import load_exported

    out = tmp_path / "tabulated"
    assert main(["simulate", str(ETHANOL), "--model", str(model_file), "--out", str(out), "--steps", "10",
                 "--report-interval", "5", "--platform", "Reference", "--tabulate"]) == 0
    assert json.loads((out / "run.json").read_text())["settings"]["tabulate"] is True
    assert load_exported(out / "force.pt")[1]["filters"]["kind"] == "tabulated"
    assert len(rows(out / "state.csv")) == 2
    assert main(["simulate", "--resume", str(out), "--steps", "10", "--tabulate"]) == 1
    assert "applies to new runs" in capsys.readouterr().err


def test_cli_export_writes_a_torchforce_file(tmp_path, model_file, capsys):
    out = tmp_path / "force.pt"
    assert main(["export", str(model_file), "--structure", str(ETHANOL), "--out", str(out)]) == 0
    assert out.is_file() and "9 of 9 particles" in capsys.readouterr().out
    assert main(["export", str(model_file), "--structure", str(ETHANOL), "--atoms", "element O",
                 "--out", str(tmp_path / "o.pt")]) == 0
    assert "1 of 9 particles" in capsys.readouterr().out
    assert main(["export", str(model_file), "--structure", str(ETHANOL), "--atoms", "resname XYZ",
                 "--out", str(tmp_path / "none.pt")]) == 1
    assert "matches no atom" in capsys.readouterr().err


def test_blow_up_stops_the_run_and_keeps_frames_and_checkpoint(tmp_path):
    from schnet_md.simulate import SimulationError

    out = tmp_path / "blow"
    with pytest.raises(SimulationError, match=r"blow-up at step \d+: \d+ bond\(s\) broken") as info:
        run_simulation(ETHANOL, "ethanol", out, settings(steps=400, timestep_fs=20.0, temperature_k=300.0,
                                                         report_interval=5, checkpoint_interval=10),
                       progress=False)
    assert "Frames written so far are kept" in str(info.value)
    traj = mdtraj.load(str(out / "trajectory.dcd"), top=str(out / "topology.pdb"))
    assert traj.n_frames >= 1
    assert len(rows(out / "state.csv")) == traj.n_frames
    # the checkpoint on disk predates the blow-up: it holds intact bonds
    import openmm
    from schnet_md.simulate import BlowUpGuard, build_system, load_checkpoint, make_simulation
    from schnet_md.structures import read_structure

    structure = read_structure(out / "topology.pdb")
    simulation, _ = make_simulation(structure.topology, build_system(structure.topology, out / "force.pt"),
                                    settings())
    load_checkpoint(simulation, out / "checkpoint.chk")
    positions = simulation.context.getState(getPositions=True).getPositions(asNumpy=True)
    BlowUpGuard(structure.topology).check(simulation.currentStep, positions.value_in_unit(openmm.unit.nanometer), None)


def test_guard_detects_broken_and_formed_bonds_and_respects_periodic_images():
    from schnet_md.simulate import BlowUpGuard, SimulationError
    from schnet_md.structures import read_structure

    s = read_structure(ETHANOL)
    guard = BlowUpGuard(s.topology)
    guard.check(0, s.positions_nm, None)
    stretched = s.positions_nm.copy()
    stretched[8] += [0.3, 0, 0]            # the hydroxyl H leaves its O
    with pytest.raises(SimulationError, match="bond"):
        guard.check(1, stretched, None)
    pushed = s.positions_nm.copy()
    towards_c = (pushed[1] - pushed[7]) / np.linalg.norm(pushed[1] - pushed[7])
    pushed[6] = pushed[7] + 0.04 * towards_c   # two hydrogens of C2 0.4 Å apart, both still bonded to C2
    with pytest.raises(SimulationError, match="new bond"):
        guard.check(2, pushed, None)
    # a molecule split across a periodic boundary is intact through the minimum image
    box = np.diag([1.0, 1.0, 1.0])
    wrapped = s.positions_nm + 0.95
    wrapped -= np.floor(wrapped)
    guard.check(3, wrapped, box)
    nan = s.positions_nm.copy()
    nan[0, 0] = np.nan
    with pytest.raises(SimulationError, match="not finite"):
        guard.check(4, nan, None)


def test_torchscript_errors_reach_the_user_without_the_interpreter_traceback():
    from schnet_md.export import torchscript_message

    text = ("The following operation failed in the TorchScript interpreter.\nTraceback ...\n"
            "builtins.ValueError: SchNet force: positions contain NaN or infinite values\n")
    assert torchscript_message(text) == "SchNet force: positions contain NaN or infinite values"
    assert torchscript_message("plain message ") == "plain message"
