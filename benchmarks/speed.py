"""Speed report: writes benchmarks/speed.md (run on an idle machine; another job on the second core
slowed torch MD here ~20x).

    .venv/bin/python benchmarks/speed.py [--platform CPU] [--steps 200] [--water 1000 3000] [--threads 1 2]

Systems: ethanol (9 atoms), a C7O2H10 isomer (19), aspirin (21), alanine dipeptide (22), water boxes; both
presets (schnet2017 gets a 5 Å cosine cutoff in periodic boxes, as it has none of its own). Trained
weights are used where shipped; otherwise random weights (speed does not depend on them).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
from pathlib import Path

import torch  # noqa: I001  (first)
import openmm

import schnet_md
from schnet_md.bench import cpu_name, bench, preset_model, water_box
from schnet_md.modelfile import load_model, shipped_models
from schnet_md.structures import read_structure

ROOT = Path(__file__).resolve().parent.parent
MOLECULES = ["ethanol", "c7o2h10_1", "aspirin", "alanine-dipeptide"]



def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--platform", default="CPU")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--water", type=int, nargs="*", default=[1000, 3000])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--cuda-graphs", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "speed.md"))
    args = p.parse_args()
    rows = []
    targets = [(m, read_structure(ROOT / "systems" / m / f"{m}.pdb")) for m in MOLECULES]
    for threads in args.threads:
        torch.set_num_threads(threads)
        for preset in ("schnet2017", "schnet2018"):
            for name, s in targets:
                z = s.atomic_numbers.tolist()
                if preset == "schnet2017" and name in shipped_models():
                    model, label = load_model(name)[0], f"shipped `{name}` (schnet2017)"
                else:
                    model, label = preset_model(preset, z), f"{preset}, random weights"
                r = bench(name, s.topology, s.positions_nm, model, label, args.platform, args.steps, args.repeats,
                          args.cuda_graphs)
                rows.append(r.as_dict())
                print(json.dumps(rows[-1]))
            for n in (args.water if threads == max(args.threads) else []):   # boxes: largest thread count only
                topology, positions = water_box(n)
                cutoff = 5.0 if preset == "schnet2017" else None
                model = preset_model(preset, [1, 8], cutoff)
                label = preset + (" + 5 Å cutoff" if cutoff else "") + ", random weights"
                r = bench("water box", topology, positions, model, label, args.platform,
                          max(5, args.steps // 40), max(3, args.repeats // 10), args.cuda_graphs)
                rows.append(r.as_dict())
                print(json.dumps(rows[-1]))
    (ROOT / "benchmarks" / "speed.json").write_text(json.dumps(rows, indent=1))
    lines = [
        f"# MD speed ({args.platform} platform)", "",
        f"Measured {datetime.date.today()} on {cpu_name()} ({os.cpu_count()} cores, no GPU), idle apart from this "
        f"benchmark; Python {platform.python_version()}, torch {torch.__version__}, OpenMM {openmm.__version__}, "
        f"schnet-md {schnet_md.__version__}. Command: `.venv/bin/python benchmarks/speed.py --steps {args.steps} "
        f"--repeats {args.repeats} --water {' '.join(map(str, args.water))} --threads "
        f"{' '.join(map(str, args.threads))}`. Raw numbers: `benchmarks/speed.json`.", "",
        "MD: `LangevinMiddleIntegrator`, 0.5 fs, 300 K, float32 model, only the SchNet force, after warm-up. "
        "Model: median forward+backward of the exported TorchScript module. Peak memory: process resident-set "
        "peak so far (CPU), so it only grows down the table.", "",
        "| system | atoms | model | neighbours | torch threads | model fwd+bwd (ms) | MD steps/s | ns/day | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['system']} | {r['n_atoms']} | {r['model']} | {r['neighbor_list']} | {r['torch_threads']} | "
                     f"{r['model_ms']:.2f} | {r['steps_per_second']:.1f} | {r['ns_per_day']:.2f} | {r['peak_memory_mb']:.0f} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
