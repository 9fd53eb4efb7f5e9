"""Run folders: the lock keeps a second process out and dies with its holder; writes are whole or absent;
inputs are recorded and compared; a user's own files are not replaced unasked."""

import errno
import os
import signal
import subprocess
import sys
import time

import pytest

from schnet_md import runs

HOLD = """
import sys, time
from schnet_md import runs
with runs.exclusive(sys.argv[1], "holder"):
    print("held", flush=True)
    time.sleep(60)
"""


def _hold(path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_process_is_refused_naming_the_holder_and_kill_9_frees_the_folder(tmp_path):
    holder = _hold(tmp_path / "run")
    try:
        with pytest.raises(runs.RunFolderBusy, match=rf"in use by PID {holder.pid} on .*holder"):
            with runs.exclusive(tmp_path / "run", "second"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with runs.exclusive(tmp_path / "run", "after the kill"):    # no stale lock
        pass


def test_the_same_process_may_reenter_its_folder(tmp_path):
    with runs.exclusive(tmp_path, "outer"):
        with runs.exclusive(tmp_path, "inner"):
            pass
        holder = subprocess.run([sys.executable, "-c", HOLD, str(tmp_path)], capture_output=True, text=True,
                                timeout=60)
        assert "RunFolderBusy" in holder.stderr            # still held by the outer block


def test_a_single_output_file_has_its_own_lock(tmp_path):
    target = tmp_path / "labels.npz"
    holder = _hold(target)
    try:
        with pytest.raises(runs.RunFolderBusy, match="labels.npz is in use"):
            with runs.exclusive(target, "second"):
                pass
        with runs.exclusive(tmp_path / "other.npz", "a different file"):
            pass
    finally:
        holder.kill()
        holder.wait()


def test_atomic_write_on_a_full_disk_names_it_and_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    target.write_text("old")

    def full(_fh):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(runs.RunFolderError, match="no space left"):
        runs.atomic_write(target, writer=full)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]      # no temporary left


def test_input_records_name_the_file_that_changed(tmp_path):
    data = tmp_path / "dätä" / "train.npz"       # non-ASCII paths work
    data.parent.mkdir()
    data.write_bytes(b"abc")
    folder = tmp_path / "iso"
    folder.mkdir()
    (folder / "split.npy").write_bytes(b"123")
    records = [runs.input_record(data), runs.input_record(folder)]
    assert records[0]["path"] == str(data.resolve()) and records[0]["size"] == 3
    runs.require_inputs(records, tmp_path)
    data.write_bytes(b"abd")
    (folder / "split.npy").write_bytes(b"1234")
    with pytest.raises(runs.RunFolderError, match=r"train.npz has the same size but other content.*iso/split.npy changed size"):
        runs.require_inputs(records, tmp_path)
    data.unlink()
    assert "is gone" in runs.changed_inputs(records)[0]


def test_claim_refuses_a_users_files_and_a_run_and_overwrite_retires_only_the_runs_files(tmp_path):
    (tmp_path / "trajectory.dcd").write_text("mine")
    (tmp_path / "notes.txt").write_text("mine too")
    owned = ["trajectory.dcd", "checkpoint*.chk"]
    with pytest.raises(runs.RunFolderError, match=r"trajectory.dcd.*but no run.json.*left untouched"):
        runs.claim(tmp_path, "run.json", owned, "simulate", overwrite=False)
    (tmp_path / "run.json").write_text("{}")
    (tmp_path / "checkpoint.prev.chk").write_text("")
    with pytest.raises(runs.RunFolderError, match=r"already holds a run \(simulate: run.json\)"):
        runs.claim(tmp_path, "run.json", owned, "simulate", overwrite=False)
    runs.claim(tmp_path, "run.json", owned, "simulate", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_read_json_names_a_damaged_record(tmp_path):
    (tmp_path / "run.json").write_bytes(b'{"steps": 1\x00\x00')
    with pytest.raises(runs.RunFolderError, match=r"run.json \(the run record\) is damaged"):
        runs.read_json(tmp_path / "run.json", "run record")
