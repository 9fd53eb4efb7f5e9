"""`schnet-md doctor`: is this installation able to run SchNet in OpenMM?

A broken stack does not raise, it crashes: openmm-torch 1.5 was compiled against OpenMM 8.5's C++ ABI,
and with OpenMM 8.6 deserialising, cloning or nesting a TorchForce segfaults. So every check that
touches a TorchForce runs in a child process; a crash there becomes a named failure here, not a dead
shell. The checks, per OpenMM platform: export a small SchNet -> TorchForce -> Context -> energy and
forces; an XmlSerializer round trip of the System gives the same numbers in a fresh Context; the force
inside a CustomCVForce (which OpenMM clones) gives them too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from typing import List, Optional

# The combinations of OpenMM and openmm-torch whose C++ ABIs match (openmm-torch is compiled C++ that
# calls into libOpenMM): the released openmmtorch 1.5 wheels were built against OpenMM 8.5.
ABI_COMPATIBLE = {"1.5": ("8.5",)}
PACKAGES = ("torch", "openmm", "openmmtorch", "openmmml", "mdtraj", "numpy", "schnet-md")
CHILD_TIMEOUT_S = 300


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""


@dataclass
class Report:
    versions: dict = field(default_factory=dict)
    platforms: List[str] = field(default_factory=list)
    plugin_failures: List[str] = field(default_factory=list)
    cuda: str = ""
    checks: List[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


def _version(package: str) -> Optional[str]:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def run_child(args: List[str], timeout: float = CHILD_TIMEOUT_S) -> tuple:
    """Run `python -m schnet_md.doctor ARGS` in a child; (ok, parsed JSON or None, explanation)."""
    try:
        proc = subprocess.run([sys.executable, "-m", "schnet_md.doctor", *args], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, None, f"did not finish within {timeout:.0f} s"
    if proc.returncode < 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        return False, None, (f"the process crashed ({_signal_name(proc.returncode)}): the installed OpenMM and "
                             f"openmm-torch are probably built against different C++ ABIs{': ' + tail if tail else ''}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    result = json.loads(lines[-1]) if lines else None
    if proc.returncode != 0 or result is None:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        return False, result, f"exit status {proc.returncode}: {tail}"
    return True, result, ""


def _platform_checks(platform: str) -> dict:
    """In the child: export -> Context -> energy; XML round trip; CustomCVForce nesting. Prints JSON."""
    import numpy as np
    import torch

    import openmm
    from openmm import unit

    from .export import create_torch_force
    from .model import SchNet, config_from_preset

    torch.manual_seed(0)
    model = SchNet(config_from_preset("schnet2017", [1, 6, 8], n_features=16, n_interactions=2)).eval()
    z = [6, 6, 8, 1, 1, 1, 1, 1, 1]
    rng = np.random.default_rng(0)
    positions = 0.1 * np.array([[0, 0, 0], [1.5, 0, 0], [2.0, 1.2, 0], [-0.4, 1.0, 0], [-0.4, -0.5, 0.9],
                                [-0.4, -0.5, -0.9], [1.9, -0.5, 0.9], [1.9, -0.5, -0.9], [2.9, 1.2, 0]])
    positions = positions + 0.002 * rng.standard_normal(positions.shape)

    def evaluate(system):
        context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName(platform))
        context.setPositions(positions)
        state = context.getState(getEnergy=True, getForces=True)
        return (state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole),
                state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer))

    def system_with(force):
        system = openmm.System()
        for _ in z:
            system.addParticle(1.0)
        system.addForce(force)
        return system

    results = {}
    system = system_with(create_torch_force(model, z))
    energy, forces = evaluate(system)
    results["export -> Context -> energy"] = bool(np.isfinite(energy) and np.isfinite(forces).all())
    copy = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(system))
    e2, f2 = evaluate(copy)
    results["XmlSerializer round trip"] = bool(e2 == energy and np.array_equal(f2, forces))
    cv = openmm.CustomCVForce("schnet")
    cv.addCollectiveVariable("schnet", create_torch_force(model, z))
    e3, f3 = evaluate(system_with(cv))
    results["inside CustomCVForce"] = bool(abs(e3 - energy) <= 1e-9 * max(1.0, abs(energy))
                                          and np.allclose(f3, forces, rtol=1e-6, atol=1e-6))
    results["energy_kj_mol"] = energy
    return results


def diagnose(platforms: Optional[List[str]] = None) -> Report:
    report = Report()
    report.versions = {name: _version(name) for name in PACKAGES}
    report.versions["python"] = sys.version.split()[0]
    # Versions, platforms and CUDA are read in a child too: importing openmmtorch can already fail
    ok, info, why = run_child(["--inventory"])
    if not ok:
        report.checks.append(Check("import torch, openmm, openmmtorch", False, why))
        return report
    report.platforms = info["platforms"]
    report.plugin_failures = info["plugin_failures"]
    report.cuda = info["cuda"]
    report.checks.append(Check("import torch, openmm, openmmtorch", True))

    omm, omt = report.versions.get("openmm"), report.versions.get("openmmtorch")
    if omm and omt:
        built_for = ABI_COMPATIBLE.get(".".join(omt.split(".")[:2]))
        if built_for is not None:
            matches = any(omm == v or omm.startswith(v + ".") for v in built_for)
            report.checks.append(Check(
                "OpenMM / openmm-torch ABI", matches,
                "" if matches else f"openmmtorch {omt} was built against OpenMM {' or '.join(built_for)}.x, but "
                                   f"OpenMM {omm} is installed: serialising, cloning or nesting a TorchForce "
                                   f"will crash. Install openmm=={built_for[-1]}.2 (see requirements.lock)"))
    torch_failures = [f for f in report.plugin_failures if "Torch" in f]
    for failure in torch_failures:
        # a CUDA/OpenCL plugin failing on a machine without that hardware is expected, not an error
        expected = "libcuda" in failure or "OpenCL" in failure
        if not expected:
            report.checks.append(Check("openmm-torch plugin loads", False, failure))

    for platform in platforms or report.platforms:
        ok, result, why = run_child(["--platform", platform])
        if not ok:
            report.checks.append(Check(f"{platform}: SchNet TorchForce", False, why))
            continue
        for name, passed in result.items():
            if name != "energy_kj_mol":
                report.checks.append(Check(f"{platform}: {name}", bool(passed),
                                           "" if passed else "gave different energies or forces"))
    return report


def _inventory() -> dict:
    import torch  # first: openmmtorch's plugins need torch's libraries

    import openmm

    from .export import openmm_torch

    openmm_torch()
    platforms = [openmm.Platform.getPlatform(k).getName() for k in range(openmm.Platform.getNumPlatforms())]
    if torch.cuda.is_available():
        cuda = f"yes: {torch.cuda.get_device_name(0)} (torch CUDA {torch.version.cuda})"
    else:
        cuda = f"no CUDA device visible to torch (torch built for CUDA {torch.version.cuda})"
    return {"platforms": platforms, "plugin_failures": list(openmm.Platform.getPluginLoadFailures()), "cuda": cuda}


def format_report(report: Report) -> str:
    lines = ["schnet-md doctor", "", "versions:"]
    lines += [f"  {name:12s} {version or 'not installed'}" for name, version in report.versions.items()]
    lines += ["", f"OpenMM platforms: {', '.join(report.platforms) or 'none'}", f"CUDA: {report.cuda or 'unknown'}"]
    if "CUDA" not in report.platforms:
        lines.append("  (OpenMM's CUDA platform is a separate wheel: openmm-cuda-12 or openmm-cuda-13, same version as "
                     "openmm, and openmm-torch-cuda-12/13 for the TorchForce)")
    if report.plugin_failures:
        lines.append("OpenMM plugin load failures:")
        for failure in report.plugin_failures:
            library, _, why = failure.removeprefix("Error loading library ").partition(": ")
            hardware = any(lib in why for lib in ("libOpenCL", "libcuda", "libOpenMMOpenCL", "libOpenMMCUDA"))
            lines.append(f"  {os.path.basename(library)}: {why}" +
                         ("  (no driver for that platform here: expected without its hardware)" if hardware else ""))
    lines += ["", "checks:"]
    for c in report.checks:
        lines.append(f"  [{'ok' if c.ok else 'FAIL'}] {c.name}" + (f": {c.detail}" if c.detail else ""))
    broken = [c.name for c in report.checks if not c.ok]
    lines += ["", "healthy: SchNet runs in OpenMM on this installation" if not broken
              else f"BROKEN: {'; '.join(broken)}"]
    return "\n".join(lines)


def main(argv=None) -> int:
    """Child entry point (`python -m schnet_md.doctor --inventory | --platform NAME`)."""
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--inventory", action="store_true")
    p.add_argument("--platform")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    result = _inventory() if args.inventory else _platform_checks(args.platform)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
