"""`check --json FILE` and `evaluate --json FILE`: one writer at a time, taken before any work, and an existing
file is replaced only with --overwrite (refused before any work, too)."""

from __future__ import annotations

import json
import socket

from conftest import FIXTURES, SYSTEMS, shared_file
from processes import paused_command
from schnet_md.cli import main

ETHANOL_PDB = str(SYSTEMS / "ethanol" / "ethanol.pdb")


def _not_run(*args, **kwargs):
    raise AssertionError("the command did its work although it was refused")


def test_a_check_report_has_one_writer_and_is_not_replaced_unasked(tmp_path, capsys, monkeypatch):
    import schnet_md.check

    report = tmp_path / "check.json"
    argv = ["check", str(FIXTURES / "ethanol_unrefined.pt"), ETHANOL_PDB, "--json", str(report)]
    first = paused_command("schnet_md.check", "check", 1, argv)      # holds check.json, about to check
    monkeypatch.setattr(schnet_md.check, "check", _not_run)
    try:
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert f"check.json is in use by PID {first.pid} on {socket.gethostname()}" in err and err.count("\n") == 1
    finally:
        first.kill()
        first.wait()
    assert not report.exists()
    report.write_text("my notes")
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "check.json already exist(s)" in err and "--overwrite" in err and err.count("\n") == 1
    assert report.read_text() == "my notes"
    # replaced when asked (the checks themselves are test_check.py's)
    monkeypatch.setattr(schnet_md.check, "check", lambda *args, **kwargs: {"passed": False, "stand-in": True})
    monkeypatch.setattr(schnet_md.check, "format_report", lambda report: "verdict: FAILED")
    assert main(argv + ["--overwrite"]) == 2
    assert json.loads(report.read_text()) == {"passed": False, "stand-in": True}


def test_an_evaluation_report_has_one_writer_and_is_not_replaced_unasked(tmp_path, capsys, monkeypatch):
    import schnet_md.modelfile

    import numpy as np

    with np.load(shared_file("rmd17/rmd17_ethanol_test_01.npz")) as full:       # 20 frames are enough here
        np.savez(tmp_path / "test.npz", **{key: full[key] if key == "nuclear_charges" else full[key][:20]
                                            for key in full.files})
    data = tmp_path / "test.npz"
    metrics = tmp_path / "métriques"              # a --json name without a suffix is a file all the same
    argv = ["evaluate", "ethanol", "--data", str(data), "--json", str(metrics)]
    first = paused_command("schnet_md.modelfile", "load_model", 1, argv)    # holds the report, about to read
    real_load = schnet_md.modelfile.load_model
    monkeypatch.setattr(schnet_md.modelfile, "load_model", _not_run)
    try:
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert f"métriques is in use by PID {first.pid}" in err and err.count("\n") == 1
    finally:
        first.kill()
        first.wait()
    monkeypatch.setattr(schnet_md.modelfile, "load_model", real_load)
    assert main(argv) == 0
    written = json.loads(metrics.read_text())
    assert written["n_frames"] == 20 and sorted(p.name for p in tmp_path.iterdir()) == [".métriques.lock",
                                                                                       "métriques", "test.npz"]
    monkeypatch.setattr(schnet_md.modelfile, "load_model", _not_run)
    assert main(argv) == 1
    assert "already exist(s)" in capsys.readouterr().err
    monkeypatch.setattr(schnet_md.modelfile, "load_model", real_load)
    assert main(argv + ["--overwrite"]) == 0 and json.loads(metrics.read_text()) == written


def test_a_bench_report_is_not_replaced_unasked(tmp_path, capsys):
    mine = tmp_path / "mine.json"
    mine.write_text("[1, 2, 3]")
    args = ["bench", "ethanol", "--model", "ethanol", "--steps", "5", "--repeats", "1", "--platform", "Reference"]
    assert main([*args, "--json", str(mine)]) == 1
    assert "mine.json already exist" in capsys.readouterr().err and mine.read_text() == "[1, 2, 3]"
    assert main([*args, "--json", str(mine), "--overwrite"]) == 0
    assert json.loads(mine.read_text())[0]["n_atoms"] == 9
