"""A training folder holds one run (issue #28): one writer at a time; a resume continues exactly the run it names
(run id, input files, settings; through the Python API too); and a run stopped anywhere (time budget, SIGTERM, a
kill between any two of its writes) resumes to the result of a run that was never stopped. Real processes, real
files: a tiny model on 24 rMD17 frames (18 to train on in 9 batches of 2, 6 to validate)."""

from __future__ import annotations

import copy
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, shared_file
from schnet_md import runs
from schnet_md.cli import main
from schnet_md.modelfile import load_model
from schnet_md.train import read_checkpoint, resolve_config, train_from_config

TINY = ["--features", "8", "--interactions", "1", "--batch-size", "2", "--validation-fraction", "0.25",
        "--threads", "1"]
RUN = [*TINY, "--seed", "3", "--lr", "1e-3"]
EPOCHS = "3"
EVERY_BATCH = ["--checkpoint-minutes", "1e-9"]      # a checkpoint after every batch


def write_frames(path: Path, start: int = 0, n: int = 24) -> Path:
    """n frames of rMD17 ethanol from `start`, as an rMD17 file of their own (one the test may change)."""
    with np.load(shared_file("rmd17/rmd17_ethanol_train_01.npz")) as f:
        np.savez(path, **{k: f[k] if k == "nuclear_charges" else f[k][start:start + n] for k in f.files})
    return path


def cli(capsys, *args):
    code = main(["train", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def start(*args, env=None, cwd=ROOT):
    environment = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "schnet_md.cli", "train", *map(str, args)], cwd=cwd,
                            env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(*args, env=None):
    proc = start(*args, env=env)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def crash_before(point: str) -> dict:
    return {runs.CRASH_BEFORE_WRITE: point}


def wait_for(path: Path, proc, timeout=120):
    started = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() - started < timeout, f"{path} never appeared"
        time.sleep(0.01)


def checkpoint(out: Path) -> dict:
    return read_checkpoint(out / "checkpoint.pt")


def assert_same_run(expected: Path, out: Path):
    """The same weights (exactly: one thread, the same batches in the same order), model.pt and history."""
    a, b = checkpoint(expected), checkpoint(out)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    model_a, model_b = load_model(expected / "model.pt")[0].state_dict(), load_model(out / "model.pt")[0].state_dict()
    assert all(torch.equal(value, model_b[key]) for key, value in model_a.items())
    history_a, history_b = (json.loads((p / "metrics.json").read_text())["history"] for p in (expected, out))
    assert [{k: v for k, v in row.items() if k != "seconds"} for row in history_a] == \
        [{k: v for k, v in row.items() if k != "seconds"} for row in history_b]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_frames(tmp_path_factory.mktemp("data") / "ethanol24.npz")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert main(["train", "--data", str(data), *RUN, "--epochs", EPOCHS, "--out", str(out)]) == 0
    return out


# ---- one writer per folder --------------------------------------------------------------------------------

def test_a_second_train_or_a_resume_of_a_running_one_is_refused_naming_it(tmp_path, capsys, data):
    out = tmp_path / "run"
    first = start("--data", data, *RUN, "--epochs", "100000", "--out", out)
    try:
        wait_for(out / "model.pt", first)
        code, _, err = run("--data", data, *TINY, "--seed", "9", "--epochs", "2", "--out", out)
        assert code == 1 and f"in use by PID {first.pid} on " in err and "schnet-md train" in err
        assert "Traceback" not in err
        code, _, err = cli(capsys, "--resume", "--out", out, "--epochs", "200000")
        assert code == 1 and f"in use by PID {first.pid}" in err
    finally:
        first.send_signal(signal.SIGTERM)                # stops at the next batch, after a checkpoint
        _, err = first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert f"continue with: schnet-md train --resume --out {out}" in err
    # the first run's files, consistent with each other: none of the second's settings, one run id throughout
    record = json.loads((out / "config.json").read_text())
    state = checkpoint(out)
    _, meta = load_model(out / "model.pt")
    assert record["training"]["seed"] == 3 and record["training"]["epochs"] == 100000
    assert state["run_id"] == record["run_id"] == meta["training"]["run_id"]
    assert meta["training"]["epoch"] == state["saved_epoch"] + 1 and meta["training"]["settings"]["seed"] == 3
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == \
        ["checkpoint.pt", "config.json", "model.pt"]


# ---- a resume continues exactly the run it names ------------------------------------------------------------

def test_overwrite_then_a_kill_never_resumes_the_old_run(tmp_path, capsys, data):
    out = tmp_path / "run"
    assert cli(capsys, "--data", data, *RUN, "--epochs", "2", "--out", out)[0] == 0
    old_run = json.loads((out / "config.json").read_text())["run_id"]
    other = write_frames(tmp_path / "other.npz", start=500)
    new_run = ["--data", other, *TINY, "--seed", "4", "--lr", "2e-3", "--epochs", EPOCHS, "--out", out, "--overwrite"]
    # killed in its first epoch, before its first checkpoint: the old run is gone, the new one cannot resume
    code, _, err = run(*new_run, env=crash_before("checkpoint.pt:1"))
    assert code == runs.CRASH_EXIT, err[-3000:]
    record = json.loads((out / "config.json").read_text())
    assert record["run_id"] != old_run and record["data"]["path"] == str(other.resolve())
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["config.json"]
    code, _, err = cli(capsys, "--resume", "--out", out)
    assert code == 1 and "before its first checkpoint" in err and "--overwrite" in err
    # killed after two checkpoints within its first epoch: the resume continues the new run, on the new data
    code, _, err = run(*new_run, *EVERY_BATCH, env=crash_before("checkpoint.pt:3"))
    assert code == runs.CRASH_EXIT, err[-3000:]
    assert (checkpoint(out)["epoch"], checkpoint(out)["batch"]) == (-1, 2)
    assert cli(capsys, "--resume", "--out", out)[0] == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["run_id"] == json.loads((out / "config.json").read_text())["run_id"] != old_run
    assert metrics["settings"]["seed"] == 4 and metrics["settings"]["learning_rate"] == 2e-3
    assert len(metrics["history"]) == 3
    assert load_model(out / "model.pt")[1]["training"]["data_sha256"] == runs.file_sha256(other)


def test_a_checkpoint_of_another_run_is_refused(tmp_path, capsys, data):
    for name in ("a", "b"):
        assert cli(capsys, "--data", data, *RUN, "--epochs", "1", "--out", tmp_path / name)[0] == 0
    shutil.copy(tmp_path / "a" / "checkpoint.pt", tmp_path / "b" / "checkpoint.pt")
    code, _, err = cli(capsys, "--resume", "--out", tmp_path / "b", "--epochs", "2")
    assert code == 1 and "belongs to another run" in err
    state = checkpoint(tmp_path / "b")
    del state["run_id"]                                   # as an earlier schnet-md wrote them
    buffer = io.BytesIO()
    torch.save(state, buffer)
    (tmp_path / "b" / "checkpoint.pt").write_bytes(runs.sealed(buffer.getvalue()))
    code, _, err = cli(capsys, "--resume", "--out", tmp_path / "b", "--epochs", "2")
    assert code == 1 and "belongs to another run (run id none)" in err
    torch.save(state, tmp_path / "b" / "checkpoint.pt")   # no seal at all
    code, _, err = cli(capsys, "--resume", "--out", tmp_path / "b", "--epochs", "2")
    assert code == 1 and "has no seal" in err


def test_a_damaged_checkpoint_is_refused_not_trained_on(tmp_path, capsys, data):
    """One flipped byte anywhere in checkpoint.pt (here in the middle, among the weights): a resume refuses it
    instead of training on the damage and writing it into model.pt under a fresh checksum."""
    out = tmp_path / "run"
    assert cli(capsys, "--data", data, *RUN, "--epochs", "1", "--out", out)[0] == 0
    model_before = (out / "model.pt").read_bytes()
    blob = bytearray((out / "checkpoint.pt").read_bytes())
    blob[len(blob) // 2] ^= 0x10
    (out / "checkpoint.pt").write_bytes(bytes(blob))
    code, _, err = cli(capsys, "--resume", "--out", out, "--epochs", "2")
    assert code == 1 and "does not match the size and checksum recorded when it was written" in err
    assert (out / "model.pt").read_bytes() == model_before


def test_a_data_file_changed_since_the_run_started_is_refused_by_name(tmp_path, capsys):
    mine = write_frames(tmp_path / "train.npz")
    out = tmp_path / "run"
    assert cli(capsys, "--data", mine, *RUN, "--epochs", "1", "--out", out)[0] == 0
    inputs = json.loads((out / "config.json").read_text())["inputs"]
    assert inputs["data"] == runs.input_record(mine)
    write_frames(mine, start=100)                         # the same name and size, other frames
    code, _, err = cli(capsys, "--resume", "--out", out, "--epochs", "2")
    assert code == 1 and f"{mine.resolve()} has the same size but other content" in err
    assert len(err.strip().splitlines()) == 1


def test_a_relative_data_path_is_resumed_from_another_directory(tmp_path, capsys, monkeypatch):
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir()
    there.mkdir()
    write_frames(here / "train.npz")
    write_frames(there / "train.npz", start=300)          # what the same name means in the other directory
    out = tmp_path / "run"
    monkeypatch.chdir(here)
    assert cli(capsys, "--data", "train.npz", *RUN, "--epochs", "1", "--out", out)[0] == 0
    assert json.loads((out / "config.json").read_text())["data"]["path"] == str(here / "train.npz")
    monkeypatch.chdir(there)
    code, _, err = cli(capsys, "--resume", "--out", out, "--data", "train.npz", "--epochs", "2")
    assert code == 1 and "data.path" in err               # the name given again names another file here
    assert cli(capsys, "--resume", "--out", out, "--epochs", "2")[0] == 0
    assert len(json.loads((out / "metrics.json").read_text())["history"]) == 2
    assert load_model(out / "model.pt")[1]["training"]["data_sha256"] == runs.file_sha256(here / "train.npz")


def test_the_python_api_holds_a_resume_to_the_recorded_run(tmp_path, data):
    def quiet(_):
        pass

    out = tmp_path / "run"
    asked = {"data": {"path": str(data)}, "model": {"n_features": 8, "n_interactions": 1},
             "training": {"epochs": 1, "batch_size": 2, "seed": 3}}
    train_from_config(resolve_config(None, asked), out, log=quiet)
    changed = copy.deepcopy(asked)
    changed["training"].update(learning_rate=5e-3, epochs=2)
    with pytest.raises(ValueError, match=r"training.learning_rate \(recorded 0.001, asked 0.005\)"):
        train_from_config(resolve_config(None, changed), out, resume=True, log=quiet)
    longer = copy.deepcopy(asked)
    longer["training"]["epochs"] = 2                       # how long it goes on may change
    assert len(train_from_config(resolve_config(None, longer), out, resume=True, log=quiet)["history"]) == 2
    with pytest.raises(ValueError, match="already finished 2 of 2 epochs"):
        train_from_config(None, out, resume=True, log=quiet)
    with pytest.raises(ValueError, match="give one"):
        train_from_config(None, out, resume=True, overwrite=True, log=quiet)
    with pytest.raises(runs.RunFolderError, match=r"already holds a run \(training: config.json\)"):
        train_from_config(resolve_config(None, asked), out, log=quiet)


def test_damaged_records_and_a_users_own_files_are_one_line_refusals(tmp_path, capsys, data):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "model.pt").write_bytes(b"my own model")
    code, _, err = cli(capsys, "--data", data, *RUN, "--epochs", "1", "--out", mine)
    assert code == 1 and "model.pt" in err and "no config.json" in err and "--overwrite" in err
    assert (mine / "model.pt").read_bytes() == b"my own model"
    out = tmp_path / "run"
    assert cli(capsys, "--data", data, *RUN, "--epochs", "1", "--out", out)[0] == 0
    for damage, message in (("{not json", "is damaged and cannot be read"), ("[1, 2]", "holds list, not a record"),
                            ('{"data": 1}', "lacks its data, model or training settings")):
        (out / "config.json").write_text(damage)
        code, _, err = cli(capsys, "--resume", "--out", out, "--epochs", "2")
        assert code == 1 and f"{out / 'config.json'} (the training run's record)" in err and message in err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


# ---- stopped anywhere, resumed to the uninterrupted result ----------------------------------------------

def test_max_hours_is_honoured_within_an_epoch(tmp_path, capsys, data, uninterrupted):
    out = tmp_path / "run"
    code, stdout, _ = cli(capsys, "--data", data, *RUN, "--epochs", EPOCHS, "--max-hours", "1e-7", "--out", out)
    assert code == 0 and "time budget of 1e-07 h reached in epoch 1, after batch 1 of 9" in stdout
    assert "no model.pt" in stdout and f"continue with: schnet-md train --resume --out {out}" in stdout
    assert (checkpoint(out)["epoch"], checkpoint(out)["batch"]) == (-1, 1)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["finished"] is False and metrics["history"] == []
    assert cli(capsys, "--resume", "--out", out, "--max-hours", "0")[0] == 0
    assert_same_run(uninterrupted, out)


def test_sigterm_within_an_epoch_then_resume_ends_as_the_uninterrupted_run(tmp_path, capsys, data, uninterrupted):
    out = tmp_path / "run"
    proc = start("--data", data, *RUN, "--epochs", EPOCHS, *EVERY_BATCH, "--out", out)
    wait_for(out / "checkpoint.pt", proc)                  # after the first batch
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "stopped by SIGTERM in epoch 1, after batch" in err and "(exit status 143)" in err
    assert f"continue with: schnet-md train --resume --out {out}" in err and "Traceback" not in err
    state = checkpoint(out)
    assert state["epoch"] == -1 and 0 < state["batch"] < 9
    assert not (out / "metrics.json").exists()            # not finished
    assert cli(capsys, "--resume", "--out", out)[0] == 0
    assert_same_run(uninterrupted, out)


def test_a_kill_between_any_two_writes_resumes_to_the_uninterrupted_result(tmp_path, capsys, data, uninterrupted):
    out = tmp_path / "run"
    fresh = ["--data", data, *RUN, "--epochs", EPOCHS, *EVERY_BATCH, "--out", out]
    resume = ["--resume", "--out", out]
    # each process is killed at the next point and the one after it resumes
    for args, point in ((fresh, "checkpoint.pt:3"),      # within epoch 1, after two checkpoints
                        (resume, "model.pt:1"),           # at epoch 1's end: checkpoint.pt written, model.pt not
                        (resume, "metrics.json:1")):      # at the run's end: checkpoint.pt, model.pt, no metrics.json
        code, _, err = run(*args, env=crash_before(point))
        assert code == runs.CRASH_EXIT, (point, err[-3000:])
    assert not (out / "metrics.json").exists()
    assert cli(capsys, *resume)[0] == 0                   # completes the last commit
    assert_same_run(uninterrupted, out)
