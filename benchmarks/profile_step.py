"""Where the time goes in one model step: torch profiler over forward+backward of the exported module.

    .venv/bin/python benchmarks/profile_step.py [SYSTEM[@PRESET] ...] [--preset schnet2017] [--threads 1]

SYSTEM is a folder of systems/ or waterN (a periodic water box of about N atoms; schnet2017 gets a 5 Å cosine
cutoff there, as in speed.py). Prints the operators with the most self time, to read before optimising.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import numpy as np

from schnet_md.bench import benchmark_model, preset_model, water_box
from schnet_md.export import build_module
from schnet_md.structures import read_structure

ROOT = Path(__file__).resolve().parent.parent

NOTES = """## What the profile led to

Measured on this machine, c7o2h10_1, schnet2017, 1 thread: median of 300 forward+backward calls of the exported
module after a save/load round trip, timed by a throwaway loop during development after each change (the
first profile, before these changes, spent 23% in mm, 14% in exp and 9% in addmm). The end state is the
speed.md row (`benchmarks/speed.py`):

1. openmm-torch calls `energy.backward()`, so weights that require grad got gradients every step. The
   exported copy now has frozen weights: 6.8 -> 4.7 ms.
2. W(r_ij) = W(r_ji): pair lists are half lists (each pair once; the filter is sent both ways), which halves
   the filter network, the dominant cost: 4.7 -> 2.8 ms (training steps 2.1x faster too).
3. With 301 Gaussians most exponents are large and negative, where CPU exp takes a ~10x slower path; the
   exponent is clamped at -80 (values below e^-80 ~ 2e-35 change nothing): 2.8 -> 2.4 ms.

Tried and not kept: one GEMM for the three blocks' first filter layers (2% faster, not worth the less
readable model); TorchScript's CPU fuser (this torch build has no LLVM backend). What remains is GEMMs with
K = 301 (~0.6 ms) and the per-operator overhead of ~250 small operators.

## Water boxes: the other regime

With ~95k pair slots (the water profile above) matrix products are only ~13% of the time; the rest is about
250 passes per call over [pair slots, F] arrays (mul, index_select, softplus, exp, where, div, sub).

4. Under a cutoff, schnet2017's Gaussians centred beyond cutoff + sqrt(80/gamma) are constant (the e^-80 clamp)
   for every pair inside it; the export folds them into the filter networks' biases (301 -> 79 under 5 Å):
   water, 966 atoms 579 -> 189 ms, 2,685 atoms 1,057 -> 435 ms (2 threads; speed.md before and after).
5. TorchScript's autodiff differentiates softplus with its symbolic formula (exp, mul, gt, where, sub, div: six
   passes) where eager autograd runs one fused kernel, so the same module run eagerly is ~20% faster (966 atoms,
   schnet2018, 1 thread, idle: 590 against 725 ms, medians of a throwaway loop of 5 calls each, twice). Left as it is: openmm-torch runs TorchScript, and the switch
   that avoids the symbolic gradients is process-wide.

For the GPU goal (24k atoms, schnet2018, < 20 ms/step) this says where the work is: each [pair slots, F]
array of that box is ~470 MB, so ~250 passes at an H100's ~3 TB/s take ~70 ms before any arithmetic. It needs a
fused CFConv (filter network, message and scatter in one kernel, as NNPOps does for SchNet-like models), not
a rearrangement of torch operators; not attempted here without a GPU to measure it on.
"""


def profile_case(system: str, preset: str, threads: int, repeats: int):
    """(title, table) for one system and preset."""
    if system.startswith("water"):
        from openmm import unit

        topology, positions = water_box(int(system[len("water"):]))
        z = [a.element.atomic_number for a in topology.atoms()]
        box = np.array(topology.getPeriodicBoxVectors().value_in_unit(unit.nanometer))
        model, label = benchmark_model(preset, [1, 8], periodic=True)
        module, meta = build_module(model, z, periodic=True, box_nm=box, positions_nm=positions)
        args = (torch.as_tensor(box, dtype=torch.float32),)
        pairs = (f"a cell list of {meta['pair_capacity']} pair slots" if meta["neighbor_list"] == "cells"
                 else f"{len(z) * (len(z) - 1) // 2} pairs in the half list")
        label = f"water box, {label}"
    else:
        s = read_structure(ROOT / "systems" / system / f"{system}.pdb")
        z, positions, args = s.atomic_numbers.tolist(), s.positions_nm, ()
        module, _ = build_module(preset_model(preset, z), z)
        pairs = f"{len(z) * (len(z) - 1) // 2} pairs in the half list"
        label = f"{system}, {preset}"
    x = torch.as_tensor(positions, dtype=torch.float32)
    for _ in range(5):
        module(x.clone().requires_grad_(True), *args).backward()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            module(x.clone().requires_grad_(True), *args).backward()
    title = f"{label}: {len(z)} atoms, {pairs}; {threads} thread(s), {repeats} forward+backward calls"
    return title, prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("systems", nargs="*", default=["c7o2h10_1"], help="SYSTEM or SYSTEM@PRESET")
    p.add_argument("--preset", default="schnet2017")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--out", help="also write the tables here (markdown)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    sections = []
    for case in args.systems:
        system, _, preset = case.partition("@")
        repeats = args.repeats if not system.startswith("water") else max(3, args.repeats // 10)
        title, table = profile_case(system, preset or args.preset, args.threads, repeats)
        print(title)
        print(table)
        sections.append(f"{title}\n\n```\n{table}\n```\n")
    if args.out:
        import datetime

        from schnet_md.bench import cpu_name
        command = " ".join(["benchmarks/profile_step.py", *args.systems, "--preset", args.preset, "--threads",
                            str(args.threads), "--repeats", str(args.repeats), "--out", "benchmarks/profile.md"])
        Path(args.out).write_text(
            f"# Where the time goes: one model step on the CPU\n\nMeasured {datetime.date.today()} on {cpu_name()}, "
            f"torch {torch.__version__}: `.venv/bin/python {command}`\n\n" + "\n".join(sections)
            + "\n" + NOTES)


if __name__ == "__main__":
    main()
