"""`schnet-md doctor`: a clean install reports healthy; a crashing child or a mismatched ABI is named."""

from __future__ import annotations

import os
import subprocess
import sys

import schnet_md.doctor as doctor
from conftest import ROOT


def test_doctor_reports_this_install_healthy():
    proc = subprocess.run([sys.executable, "-m", "schnet_md.cli", "doctor", "--platform", "Reference"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for name in ("torch", "openmm", "openmmtorch", "openmmml", "mdtraj"):
        assert f"  {name} " in out
    assert "OpenMM platforms: " in out and "Reference" in out and "CUDA: " in out
    for check in ("export -> Context -> energy", "XmlSerializer round trip", "inside CustomCVForce"):
        assert f"[ok] Reference: {check}" in out
    assert "healthy" in out and "FAIL" not in out


def test_a_crashing_child_is_named_not_suffered(tmp_path, monkeypatch):
    """What a segfaulting TorchForce does to the child: the parent reports the signal and exits 1."""
    crash = tmp_path / "python"
    crash.write_text("#!/bin/sh\nkill -SEGV $$\n")
    crash.chmod(0o755)
    monkeypatch.setattr(doctor.sys, "executable", str(crash))
    report = doctor.diagnose(["Reference"])
    assert not report.ok
    text = doctor.format_report(report)
    assert "SIGSEGV" in text and "BROKEN" in text and "ABI" in text


def test_a_mismatched_openmm_is_named_with_the_fix(monkeypatch):
    real = doctor._version
    monkeypatch.setattr(doctor, "_version", lambda p: "8.6.1" if p == "openmm" else real(p))
    report = doctor.diagnose(["Reference"])
    failed = [c for c in report.checks if not c.ok]
    assert [c.name for c in failed] == ["OpenMM / openmm-torch ABI"]
    assert "openmm==8.5.2" in failed[0].detail and "8.6.1" in failed[0].detail


def test_cli_exit_status_follows_the_verdict(monkeypatch, capsys):
    from schnet_md import cli

    monkeypatch.setattr(doctor, "diagnose", lambda platforms=None: doctor.Report(
        checks=[doctor.Check("Reference: XmlSerializer round trip", False, "crashed (SIGSEGV)")]))
    assert cli.main(["doctor"]) == 1
    assert "BROKEN: Reference: XmlSerializer round trip" in capsys.readouterr().out
