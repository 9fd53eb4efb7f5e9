"""Where the time goes in one model step: torch profiler over forward+backward of the exported module.

    .venv/bin/python benchmarks/profile_step.py [SYSTEM] [--preset schnet2017] [--threads 1]

Prints the operators with the most self time, to read before optimising anything.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from schnet_md.bench import preset_model
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
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("system", nargs="?", default="c7o2h10_1")
    p.add_argument("--preset", default="schnet2017")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--out", help="also write the table here (markdown)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    s = read_structure(ROOT / "systems" / args.system / f"{args.system}.pdb")
    module, _ = build_module(preset_model(args.preset, s.atomic_numbers.tolist()), s.atomic_numbers.tolist())
    x = torch.as_tensor(s.positions_nm, dtype=torch.float32)
    for _ in range(10):
        module(x.clone().requires_grad_(True)).backward()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.repeats):
            module(x.clone().requires_grad_(True)).backward()
    title = (f"{args.system} ({s.n_atoms} atoms, {s.n_atoms * (s.n_atoms - 1) // 2} pairs in the half list), {args.preset}, "
             f"{args.threads} thread(s), {args.repeats} forward+backward calls")
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    print(title)
    print(table)
    if args.out:
        import datetime

        from schnet_md.bench import cpu_name
        Path(args.out).write_text(
            f"# Where the time goes: one model step on the CPU\n\nMeasured {datetime.date.today()} on {cpu_name()}, "
            f"torch {torch.__version__}: `.venv/bin/python benchmarks/profile_step.py {args.system} --preset "
            f"{args.preset} --threads {args.threads} --out benchmarks/profile.md`\n\n{title}\n\n```\n{table}\n```\n\n"
            + NOTES)


if __name__ == "__main__":
    main()
