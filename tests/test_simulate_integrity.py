"""A simulate run folder belongs to one run: a second writer is refused while the first runs, a resume
continues only that run's own checkpoint and files, a kill between any two renames of a checkpoint commit
still resumes, and a user's own files are not overwritten unasked. Real processes where it matters."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time

import mdtraj
import pytest
import torch

from conftest import SYSTEMS, random_model
from schnet_md import runs
from schnet_md.modelfile import save_model
from schnet_md.simulate import CheckpointError, SimulationSettings, resume_simulation, run_simulation

ETHANOL = SYSTEMS / "ethanol" / "ethanol.pdb"
SCHNET_MD = [sys.executable, "-m", "schnet_md.cli"]


@pytest.fixture
def model_file(tmp_path):
    model = random_model(elements=(1, 6, 8), dtype=torch.float32)
    with torch.no_grad():   # a gentle random potential: stays bound for a few hundred steps
        model.readout.scale.fill_(0.1)
    return save_model(model, tmp_path / "model.pt")


def settings(**changes):
    base = dict(steps=40, timestep_fs=0.25, temperature_k=100.0, report_interval=10, checkpoint_interval=20,
                platform="Reference", seed=5)
    return SimulationSettings(**(base | changes))


def steps_in(state_csv):
    with open(state_csv, newline="") as fh:
        return [int(row["step"]) for row in csv.DictReader(fh)]


def test_a_second_simulate_and_a_resume_of_a_running_one_are_refused(tmp_path, model_file):
    out = tmp_path / "run"
    first = subprocess.Popen(SCHNET_MD + ["simulate", str(ETHANOL), "--model", str(model_file), "--out", str(out),
                                          "--steps", "1000000", "--platform", "Reference", "--timestep", "0.1",
                                          "--temperature", "1", "--report-interval", "100", "--seed", "3",
                                          "--checkpoint-interval", "500"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "run.json").exists():
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.2)
        for second in (["simulate", str(ETHANOL), "--model", str(model_file), "--out", str(out), "--steps", "10",
                        "--platform", "Reference"],
                       ["simulate", str(ETHANOL), "--model", str(model_file), "--out", str(out), "--steps", "10",
                        "--platform", "Reference", "--overwrite"],
                       ["simulate", "--resume", str(out)]):
            refused = subprocess.run(SCHNET_MD + second, capture_output=True, text=True, timeout=120)
            assert first.poll() is None, first.communicate()[1][-1000:]      # (the holder must still run)
            assert refused.returncode != 0
            assert f"in use by PID {first.pid}" in refused.stderr and "Traceback" not in refused.stderr
        assert first.poll() is None          # the refusals left the running job alone
    finally:
        first.kill()                         # preempted: kill -9 frees the folder, and a resume continues it
        first.wait()
    done = resume_simulation(out, steps=100, progress=False, log=lambda _m: None).steps_done
    assert steps_in(out / "state.csv") == list(range(100, done + 1, 100))       # one writer: rows in order, once
    assert len(mdtraj.load(str(out / "trajectory.dcd"), top=str(out / "topology.pdb"))) == done // 100


def test_sigterm_checkpoints_where_it_stops_and_the_run_resumes(tmp_path, model_file):
    out = tmp_path / "run"
    job = subprocess.Popen(SCHNET_MD + ["simulate", str(ETHANOL), "--model", str(model_file), "--out", str(out),
                                        "--steps", "1000000", "--platform", "Reference", "--timestep", "0.1",
                                        "--temperature", "1", "--report-interval", "10", "--seed", "3",
                                        "--checkpoint-interval", "100000"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "state.csv").exists() or len(steps_in(out / "state.csv")) < 3:
        assert job.poll() is None and time.time() < deadline, job.communicate()
        time.sleep(0.2)
    job.terminate()                                      # what a batch system sends on preemption
    _, err = job.communicate(timeout=60)
    assert job.returncode == 143 and "stopped by SIGTERM" in err and f"simulate --resume {out}" in err
    assert "Traceback" not in err
    stopped_at = json.loads((out / "run.json").read_text())["steps_done"]
    assert stopped_at > 0 and stopped_at % 100000 != 0    # checkpointed where it stopped, not at an interval
    result = resume_simulation(out, steps=30, progress=False)
    assert result.steps_done == stopped_at + 30
    assert steps_in(out / "state.csv") == list(range(10, stopped_at + 31, 10))


KILL_AT_RENAME = """
import os, sys
from schnet_md import simulate
from schnet_md.simulate import SimulationSettings, run_simulation

kill_at = int(sys.argv[3])
renames = None                                 # counted from the run's first step on
real_replace, real_run = os.replace, simulate._run

def counted_replace(src, dst):
    if renames is not None:
        renames.append(dst)
        if len(renames) == kill_at:
            os._exit(9)                        # killed right before this rename
    real_replace(src, dst)

def counting_run(*args, **kwargs):
    global renames
    renames = []
    return real_run(*args, **kwargs)

os.replace = counted_replace
simulate._run = counting_run
run_simulation(sys.argv[1], sys.argv[2], sys.argv[4], SimulationSettings(
    steps=60, timestep_fs=0.25, temperature_k=100.0, report_interval=10, checkpoint_interval=20,
    platform="Reference", seed=5), progress=False)
"""


def test_a_kill_before_any_rename_of_the_checkpoint_commits_still_resumes(tmp_path, model_file):
    """The commit at step 20: checkpoint -> .prev, the new checkpoint into place, run.json's steps_done.
    Killed before each of these renames in turn, the run resumes and ends as an unbroken one does."""
    reference = tmp_path / "whole"
    run_simulation(ETHANOL, model_file, reference, settings(steps=60), progress=False)
    expected = mdtraj.load(str(reference / "trajectory.dcd"), top=str(reference / "topology.pdb")).xyz
    for kill_at in range(1, 4):
        out = tmp_path / f"killed{kill_at}"
        killed = subprocess.run([sys.executable, "-c", KILL_AT_RENAME, str(ETHANOL), str(model_file), str(kill_at),
                                 str(out)], capture_output=True, text=True, timeout=300)
        assert killed.returncode == 9, killed.stderr
        result = resume_simulation(out, progress=False, log=lambda _m: None)
        assert result.steps_done == 60
        assert steps_in(out / "state.csv") == [10, 20, 30, 40, 50, 60]
        frames = mdtraj.load(str(out / "trajectory.dcd"), top=str(out / "topology.pdb")).xyz
        assert frames.shape == expected.shape
        assert abs(frames - expected).max() < 1e-4            # the same run: same seed, continued exactly


def test_a_checkpoint_or_force_from_another_run_is_refused(tmp_path, model_file):
    a, b = tmp_path / "a", tmp_path / "b"
    run_simulation(ETHANOL, model_file, a, settings(steps=20), progress=False)
    run_simulation(ETHANOL, model_file, b, settings(steps=40), progress=False)
    (a / "checkpoint.chk").write_bytes((b / "checkpoint.chk").read_bytes())
    with pytest.raises(CheckpointError, match="belongs to another run"):
        resume_simulation(a, steps=10, progress=False)
    (a / "checkpoint.chk").write_bytes((a / "final.chk").read_bytes())
    force = (a / "force.pt").read_bytes()
    (a / "force.pt").write_bytes(force[:-1] + bytes([force[-1] ^ 1]))
    with pytest.raises(runs.RunFolderError, match="force.pt is not the file this run started with"):
        resume_simulation(a, steps=10, progress=False)
    (a / "force.pt").write_bytes(force)
    assert resume_simulation(a, steps=10, progress=False).steps_done == 30
    # a run.json from before run ids cannot be used to slip in a checkpoint that has one
    info = json.loads((a / "run.json").read_text())
    del info["run_id"], info["run_files"]
    (a / "run.json").write_text(json.dumps(info))
    (a / "checkpoint.chk").write_bytes((b / "checkpoint.chk").read_bytes())
    frames_before = (a / "trajectory.dcd").read_bytes()
    with pytest.raises(CheckpointError, match="belongs to another run"):
        resume_simulation(a, steps=10, progress=False)
    assert (a / "trajectory.dcd").read_bytes() == frames_before             # nothing truncated first


def test_a_users_own_files_are_kept_unless_overwrite(tmp_path, model_file):
    out = tmp_path / "mine"
    out.mkdir()
    for name in ("force.pt", "trajectory.dcd", "state.csv"):
        (out / name).write_text(f"my own {name}")
    (out / "notes.md").write_text("keep")
    with pytest.raises(runs.RunFolderError, match=r"force.pt, state.csv, trajectory.dcd\) but no run.json"):
        run_simulation(ETHANOL, model_file, out, settings(), progress=False)
    assert (out / "force.pt").read_text() == "my own force.pt"
    run_simulation(ETHANOL, model_file, out, settings(), progress=False, overwrite=True)
    assert steps_in(out / "state.csv") == [10, 20, 30, 40] and (out / "notes.md").read_text() == "keep"
    # --overwrite of a run retires its checkpoints too: the new run cannot resume the old one's state
    run_simulation(ETHANOL, model_file, out, settings(steps=20, seed=9), progress=False, overwrite=True)
    assert not (out / "checkpoint.prev.chk").exists() or \
        json.loads((out / "run.json").read_text())["steps_done"] == 20
    assert resume_simulation(out, steps=20, progress=False).steps_done == 40


def test_run_json_of_another_version_and_non_finite_settings_are_named(tmp_path, model_file):
    out = tmp_path / "run"
    run_simulation(ETHANOL, model_file, out, settings(steps=20), progress=False)
    info = json.loads((out / "run.json").read_text())
    info["settings"]["replicas"] = 8
    (out / "run.json").write_text(json.dumps(info))
    with pytest.raises(runs.RunFolderError, match="does not know: replicas"):
        resume_simulation(out, steps=10, progress=False)
    del info["settings"]["replicas"]
    for damaged, message in (({"steps": "abc"}, "steps must be a whole number, got 'abc'"),
                             ({}, "its settings lack")):
        (out / "run.json").write_text(json.dumps(info | {"settings": info["settings"] | damaged} if damaged
                                                 else info | {"settings": {}}))
        with pytest.raises(runs.RunFolderError, match=f"run.json is damaged: .*{message}"):
            resume_simulation(out, steps=10, progress=False)
    (out / "run.json").write_text('{"settings": {"steps"')
    with pytest.raises(runs.RunFolderError, match="run.json .* is damaged"):
        resume_simulation(out, steps=10, progress=False)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="must be finite"):
            settings(temperature_k=bad)


def test_non_ascii_paths_work_end_to_end(tmp_path, model_file):
    out = tmp_path / "résultats" / "模拟"
    model = save_model(random_model(elements=(1, 6, 8), dtype=torch.float32), tmp_path / "modèle.pt")
    del model_file
    result = subprocess.run(SCHNET_MD + ["simulate", str(ETHANOL), "--model", str(model), "--out", str(out),
                                         "--steps", "20", "--platform", "Reference", "--timestep", "0.25",
                                         "--temperature", "50"], capture_output=True, text=True, timeout=300,
                            env=os.environ | {"LC_ALL": "C"})
    assert result.returncode == 0, result.stderr
    resumed = subprocess.run(SCHNET_MD + ["simulate", "--resume", str(out), "--steps", "20"], capture_output=True,
                             text=True, timeout=300, env=os.environ | {"LC_ALL": "C"})
    assert resumed.returncode == 0, resumed.stderr
    assert steps_in(out / "state.csv") == [10, 20, 30, 40]


def test_a_damaged_checkpoint_of_a_finished_run_falls_back_to_final_not_to_step_0(tmp_path, model_file):
    """The second probe: one flipped byte in a finished run's checkpoint.chk made the resume fall back to
    checkpoint.prev.chk (step 0) and cut the whole trajectory. final.chk is as far and intact: it is taken."""
    out = tmp_path / "run"
    run_simulation(ETHANOL, model_file, out, settings(steps=40), progress=False)
    blob = bytearray((out / "checkpoint.chk").read_bytes())
    blob[len(blob) // 2] ^= 0x10
    (out / "checkpoint.chk").write_bytes(bytes(blob))
    result = resume_simulation(out, steps=20, progress=False, log=lambda _m: None)
    assert result.steps_done == 60 and steps_in(out / "state.csv") == [10, 20, 30, 40, 50, 60]
