"""Data-parallel training (torchrun, gloo on CPU): two processes give one process's loss history, resume after
a kill (also with another process count), and a rank that dies ends the job with an error, not a hang."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, shared_file
from schnet_md.train import read_checkpoint

ARGS = ["--labels", "old", "--max-frames", "48", "--features", "16", "--interactions", "2", "--batch-size", "8",
        "--validation-fraction", "0.25", "--seed", "3", "--lr", "5e-4"]


def train_command(data, out, epochs, *extra):
    return [sys.executable, "-m", "schnet_md.cli", "train", "--data", str(data), *ARGS, "--epochs", str(epochs),
            "--out", str(out), *extra]


def run(command, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", SCHNET_MD_DIST_TIMEOUT="60")
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def history(out: Path):
    return json.loads((out / "metrics.json").read_text())["history"]


def assert_same_history(a, b, rtol=2e-4):
    assert [h["epoch"] for h in a] == [h["epoch"] for h in b]
    for x, y in zip(a, b):
        for key in ("train_loss", "validation_energy_mae", "validation_forces_mae", "learning_rate"):
            assert y[key] == pytest.approx(x[key], rel=rtol), (x["epoch"], key)


@pytest.fixture(scope="module")
def data():
    return shared_file("rmd17/rmd17_ethanol_train_01.npz")


@pytest.fixture(scope="module")
def single(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("single") / "run"
    run(train_command(data, out, 4, "--threads", "1"))
    return history(out)


def test_two_processes_give_the_one_process_history(tmp_path, data, single):
    proc = run(train_command(data, tmp_path / "run", 4, "--nproc", "2"))
    assert "(2 processes)" in proc.stdout
    assert proc.stdout.count("model written") == 1          # rank 0 reports
    assert_same_history(single, history(tmp_path / "run"))
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["processes"] == 2


def _children(pid: int):
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _descendants(pid: int):
    out, todo = [], [pid]
    while todo:
        kids = _children(todo.pop())
        out += kids
        todo += kids
    return out


def _rank_of(pid: int):
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def _start(command):
    env = dict(os.environ, OMP_NUM_THREADS="1", SCHNET_MD_DIST_TIMEOUT="60")
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait_for(path: Path, proc, timeout=300):
    start = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() - start < timeout, f"{path} never appeared"
        time.sleep(0.05)


def test_resume_after_a_kill_mid_epoch_also_with_another_process_count(tmp_path, data, single):
    out = tmp_path / "run"
    proc = _start(train_command(data, out, 4, "--nproc", "2"))
    _wait_for(out / "checkpoint.pt", proc)
    for pid in [proc.pid, *_descendants(proc.pid)]:      # the whole job (torchrun gives workers their own groups)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    done = int(read_checkpoint(out / "checkpoint.pt")["epoch"]) + 1
    assert done < 4
    run([sys.executable, "-m", "schnet_md.cli", "train", "--resume", "--out", str(out), "--epochs", "4",
         "--threads", "1"])                                # resumed on ONE process
    assert_same_history(single, history(out))


def test_a_rank_that_dies_ends_the_job_with_an_error(tmp_path, data):
    out = tmp_path / "run"
    proc = _start(train_command(data, out, 50, "--nproc", "2"))
    _wait_for(out / "checkpoint.pt", proc)
    victims = [p for p in _descendants(proc.pid) if _rank_of(p) == 1]
    assert victims, "no rank-1 worker found"
    started = time.time()
    os.kill(victims[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode != 0
    assert time.time() - started < 120, "the surviving rank hung"
    assert "fail" in err.lower() or "error" in err.lower()
