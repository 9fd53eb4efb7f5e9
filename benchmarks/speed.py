"""MD speed of schnet-md in OpenMM and model-only forward+backward time; writes benchmarks/speed.md.

    .venv/bin/python benchmarks/speed.py [--steps 2000] [--threads 1 2]

Run it on an idle machine: with another job on the second core, torch MD here ran ~20x slower.
For a system with no shipped model, a schnet2017 model with random weights and the system's elements
stands in: speed does not depend on the weight values.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch  # noqa: I001  (first)
import numpy as np
import openmm
from openmm import unit

import schnet_md
from schnet_md.export import build_module, create_torch_force
from schnet_md.model import SchNet, config_from_preset
from schnet_md.modelfile import load_model, shipped_models
from schnet_md.structures import read_structure

ROOT = Path(__file__).resolve().parent.parent
SYSTEMS = ["ethanol", "c7o2h10_1", "aspirin"]


def model_for(name: str, structure):
    if name in shipped_models():
        return load_model(name)[0], f"shipped `{name}`"
    torch.manual_seed(0)
    return SchNet(config_from_preset("schnet2017", sorted(set(structure.atomic_numbers.tolist())))).eval(), \
        "random-weight schnet2017"


def time_model(model, structure, repeats: int) -> float:
    """Median ms of one forward+backward of the exported module (what openmm-torch calls per step)."""
    module, _ = build_module(model, structure.atomic_numbers)
    positions = torch.as_tensor(structure.positions_nm, dtype=torch.float64)
    times = []
    for k in range(repeats + 20):
        p = positions.clone().requires_grad_(True)
        t0 = time.perf_counter()
        module(p).backward()
        if k >= 20:
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def time_md(model, structure, steps: int, timestep_fs: float = 0.5) -> float:
    system = openmm.System()
    for atom in structure.topology.atoms():
        system.addParticle(atom.element.mass)
    system.addForce(create_torch_force(model, structure.topology))
    integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1 / unit.picosecond, timestep_fs * unit.femtosecond)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("CPU"))
    context.setPositions(structure.openmm_positions())
    context.setVelocitiesToTemperature(300 * unit.kelvin, 1)
    integrator.step(100)  # warm-up (TorchScript profiling runs)
    t0 = time.perf_counter()
    integrator.step(steps)
    context.getState(getEnergy=True)
    return steps / (time.perf_counter() - t0)


def cpu_name() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "speed.md"))
    args = p.parse_args()
    rows = []
    for name in SYSTEMS:
        structure = read_structure(ROOT / "systems" / name / f"{name}.pdb")
        model, which = model_for(name, structure)
        for threads in args.threads:
            torch.set_num_threads(threads)
            ms = time_model(model, structure, args.repeats)
            sps = time_md(model, structure, args.steps)
            rows.append(dict(system=name, atoms=structure.n_atoms, model=which, threads=threads,
                             model_ms=ms, steps_per_s=sps, ns_per_day=sps * 0.5e-6 * 86400))
            print(json.dumps(rows[-1]))
    load = os.getloadavg()[0]
    lines = [
        "# MD speed on the CPU platform (schnet2017 preset)",
        "",
        f"Measured {datetime.date.today()} on {cpu_name()} ({os.cpu_count()} cores), 1-min load average "
        f"before writing {load:.2f}; Python {platform.python_version()}, torch {torch.__version__}, "
        f"OpenMM {openmm.__version__}, schnet-md {schnet_md.__version__}.",
        f"Command: `.venv/bin/python benchmarks/speed.py --steps {args.steps} --repeats {args.repeats} "
        f"--threads {' '.join(map(str, args.threads))}`",
        "",
        "MD: `LangevinMiddleIntegrator`, 0.5 fs, 300 K, float32 model, OpenMM CPU platform, "
        f"{args.steps} steps after 100 warm-up steps. Model: median of {args.repeats} forward+backward calls "
        "of the exported TorchScript module (the work openmm-torch does each step).",
        "",
        "| system | atoms | model | torch threads | model fwd+bwd (ms) | MD steps/s | ns/day |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['system']} | {r['atoms']} | {r['model']} | {r['threads']} | {r['model_ms']:.2f} | "
                     f"{r['steps_per_s']:.0f} | {r['ns_per_day']:.1f} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
