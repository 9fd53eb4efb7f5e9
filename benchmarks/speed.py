"""Speed report: writes benchmarks/speed.md (run on an idle machine; another job on the second core
slowed torch MD here ~20x).

    .venv/bin/python benchmarks/speed.py [--platform CPU] [--steps 200] [--water 1000 3000] [--threads 1 2]
    python3 benchmarks/speed.py --platform CUDA --cuda-graphs both [--backend torch python]   (GPU machine)

Systems: ethanol (9 atoms), a C7O2H10 isomer (19), aspirin (21), alanine dipeptide (22), water boxes; both
presets (schnet2017 gets a 5 Å cosine cutoff in periodic boxes, as it has none of its own). Trained
weights are used where shipped; otherwise random weights (speed does not depend on them).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import multiprocessing
import os
import platform
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch  # noqa: I001  (first)
import openmm

import schnet_md
from schnet_md.bench import benchmark_model, bench, cpu_name, preset_model, water_box
from schnet_md.modelfile import load_model, shipped_models
from schnet_md.structures import read_structure

ROOT = Path(__file__).resolve().parent.parent
MOLECULES = ["ethanol", "c7o2h10_1", "aspirin", "alanine-dipeptide"]



MEMORY_NOTE = (
    "Peak RSS on the CPU overstates what the model holds for boxes of ~1-3k atoms: once a freed block has been "
    "mmapped, glibc raises its mmap threshold (up to 32 MB) and keeps later freed blocks of that size in its heap "
    "for reuse. Water, 966 atoms, schnet2018, 1 thread, forward+backward of the exported module in a throwaway "
    "loop (resident set read from /proc every 5 of 40 calls): RSS stays at ~5 GB; with "
    "`MALLOC_MMAP_THRESHOLD_=1048576` it stays at ~640 MB between calls (peak 1.6 GB), but the calls run ~2.5x "
    "slower, every large tensor faulting in fresh pages (timed while a training ran on the other core: rough). From ~12k atoms every [pairs, F] array is above 32 MB, so RSS is "
    "the live memory there; the 24k box with schnet2018 needs more than this machine has.")


def cap_memory(limit_gb: float) -> None:
    """Make an allocation beyond `limit_gb` a clean error in this process (RLIMIT_DATA covers malloc and
    private mmaps), instead of the kernel's OOM killer picking a process - maybe a training beside us."""
    import resource

    limit = int(limit_gb * 2 ** 30)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def available_gb() -> float:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2 ** 20
    return float("inf")


@functools.lru_cache(maxsize=None)
def cached_water_box(n_atoms: int):
    return water_box(n_atoms)


def _openmm_torch_version() -> str:
    try:
        from importlib.metadata import version

        return f"openmm-torch {version('openmmtorch')}"
    except Exception:
        return "no openmm-torch"


def run_row(task: dict) -> dict:
    """One row, in a fresh process on the CPU (so its peak memory is its own); on CUDA in this process (peak
    memory is the CUDA allocator's, reset per row; an RLIMIT_DATA cap would break CUDA's address reservations)."""
    if task["platform"] != "CUDA":
        cap_memory(task["memory_gb"])
    torch.set_num_threads(task["threads"])
    preset = task["preset"]
    if task["kind"] == "molecule":
        name = task["name"]
        s = read_structure(ROOT / "systems" / name / f"{name}.pdb")
        z = s.atomic_numbers.tolist()
        if preset == "schnet2017" and name in shipped_models():
            model, label = load_model(name)[0], f"shipped `{name}` (schnet2017)"
        else:
            model, label = preset_model(preset, z), f"{preset}, random weights"
        r = bench(name, s.topology, s.positions_nm, model, label, task["platform"], task["steps"], task["repeats"],
                  task["cuda_graphs"], backend=task["backend"], compile=task.get("compile", False),
                  fused=task.get("fused", False), tabulate=task.get("tabulate", False))
    else:
        topology, positions = cached_water_box(task["n_atoms"])
        model, label = benchmark_model(preset, [1, 8], periodic=True)
        label += ", random weights"
        r = bench("water box", topology, positions, model, label, task["platform"], max(5, task["steps"] // 40),
                  max(3, task["repeats"] // 10), task["cuda_graphs"], backend=task["backend"],
                  compile=task.get("compile", False), fused=task.get("fused", False),
                  tabulate=task.get("tabulate", False))
    return r.as_dict()


def failure_message(error: Exception) -> str:
    """The first line of an error and, where the cause comes further down (TorchScript tracebacks), its last
    "...Error: ..." line."""
    lines = str(error).splitlines() or [repr(error)]
    causes = [line.strip() for line in lines[1:] if "Error" in line]
    message = lines[0] + (f" ... {causes[-1]}" if causes else "")
    return message[:400]


def in_this_process(function, task: dict):
    try:
        return function(task)
    except Exception as error:   # e.g. a plugin that does not load on this machine: record it, go on
        print(f"row {task} failed: {error!r}")
        return {"failed": failure_message(error), "task": task}
    finally:   # the last row's Context, CUDA-graph pool and cached blocks go back before the next row
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def search_row(task: dict) -> dict:
    """The neighbour search alone for one water box, in a fresh process."""
    from openmm import unit

    from schnet_md.bench import time_neighbor_search

    torch.set_num_threads(task["threads"])
    topology, positions = water_box(task["n_atoms"])
    box = np.array(topology.getPeriodicBoxVectors().value_in_unit(unit.nanometer))
    return time_neighbor_search(positions, box, 5.0, task["method"], repeats=5)


def in_fresh_process(function, task: dict):
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(function, task).result()
        except Exception as error:   # e.g. out of memory for a big box: record it, go on
            print(f"row {task} failed: {error!r}")
            message = str(error).splitlines()[0] if str(error) else repr(error)
            if "can't allocate memory" in str(error):
                message = f"out of memory: needs more than its {task.get('memory_gb', 0):.0f} GB cap (the memory free at the start)"
            return {"failed": message, "task": task}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--platform", default="CPU")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--water", type=int, nargs="*", default=[1000, 3000, 12000, 24000])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--search", type=int, nargs="*", default=[1000, 3000, 12000, 24000],
                   help="water boxes for the neighbour-search-only scaling table")
    p.add_argument("--cuda-graphs", choices=["off", "on", "both"], default="off",
                   help="openmm-torch's CUDA graphs (TorchForce rows only)")
    p.add_argument("--backend", nargs="+", choices=["torch", "python"], default=["torch"],
                   help="TorchForce (openmm-torch) and/or OpenMM's PythonForce")
    p.add_argument("--compile", action="store_true", help="PythonForce rows: the model through torch.compile")
    p.add_argument("--fused", action="store_true", help="PythonForce rows: the Triton CFConv (schnet_md.fused)")
    p.add_argument("--filters", nargs="+", choices=["network", "tabulated"], default=["network"],
                   help="the filter network, and/or spline tables of it (schnet_md.tabulated)")
    p.add_argument("--presets", nargs="+", default=["schnet2017", "schnet2018"])
    p.add_argument("--molecules", nargs="*", default=MOLECULES)
    p.add_argument("--memory-gb", type=float, help="memory cap per row (default: what is free now, less 1 GB)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "speed.md"))
    p.add_argument("--report-only", action="store_true", help="rewrite the report from the existing speed.json")
    args = p.parse_args()
    if args.report_only:
        write_report(Path(args.out))
        return
    memory_gb = args.memory_gb or max(1.0, available_gb() - 1.0)
    common = dict(platform=args.platform, steps=args.steps, repeats=args.repeats, memory_gb=memory_gb,
                  compile=args.compile, fused=args.fused)
    forces = [(b, g) for b in args.backend
              for g in ([False, True] if args.cuda_graphs == "both" and b == "torch" else [args.cuda_graphs == "on"])]
    tasks = []
    for threads in args.threads:
        for preset in args.presets:
            for (backend, graphs), filters in [(f, kind) for f in forces for kind in args.filters]:
                force = dict(common, preset=preset, threads=threads, backend=backend, cuda_graphs=graphs,
                             tabulate=filters == "tabulated")
                tasks += [dict(force, kind="molecule", name=m) for m in args.molecules]
                if threads == max(args.threads):   # boxes: largest thread count only
                    tasks += [dict(force, kind="water", n_atoms=n) for n in args.water]
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    run = {"date": str(datetime.date.today()), "machine": f"{cpu_name()} ({os.cpu_count()} cores, {gpu})",
           "versions": f"Python {platform.python_version()}, torch {torch.__version__}"
                       + (f" (CUDA {torch.version.cuda})" if torch.cuda.is_available() else "")
                       + f", OpenMM {openmm.__version__}, {_openmm_torch_version()}, schnet-md {schnet_md.__version__}",
           "command": f"{'python3' if args.platform == 'CUDA' else '.venv/bin/python'} benchmarks/speed.py "
                      + " ".join(sys.argv[1:]),
           "platform": args.platform, "threads": args.threads, "memory_gb": memory_gb}
    rows, search = [], []

    def save() -> None:   # after every row: a run cut short by a time limit keeps what it measured
        Path(args.out).with_suffix(".json").write_text(
            json.dumps({"run": run, "md": rows, "neighbour_search": search}, indent=1))
        write_report(Path(args.out))

    for task in tasks:
        row = in_this_process(run_row, task) if args.platform == "CUDA" else in_fresh_process(run_row, task)
        rows.append(row)
        print(json.dumps(row), flush=True)
        save()
    for n in args.search:
        for method in ("cells", "all_pairs") if n <= 3000 else ("cells",):   # all pairs: O(N^2) memory
            row = in_fresh_process(search_row, dict(n_atoms=n, method=method, threads=max(args.threads)))
            if "failed" not in row:
                search.append(row)
            print(json.dumps(row), flush=True)
    save()


def _g(x: float) -> str:
    """Three significant figures, without exponents for the ranges in these tables."""
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.3g}" if abs(x) >= 1e-3 else f"{x:.1e}"


def write_report(out: Path) -> None:
    """speed.md from the raw numbers in speed.json (rerun with --report-only after editing the text)."""
    data = json.loads(out.with_suffix(".json").read_text())
    run, rows, search = data["run"], data["md"], data["neighbour_search"]
    cuda = run["platform"] == "CUDA"
    memory_text = ("Peak memory is the CUDA caching allocator's peak during the model calls (torch tensors on the GPU; "
                   "OpenMM's own buffers not included); every row runs in one process, its peak reset first."
                   if cuda else
                   "Each row runs in a fresh process: peak RSS is that process's resident-set peak (CPU; torch, OpenMM and "
                   "the system included), 'model adds' how far the model calls raised it. Each row may use at most "
                   f"{run['memory_gb']:.0f} GB (what was free).")
    lines = [
        f"# MD speed ({run['platform']} platform)", "",
        f"Measured {run['date']} on {run['machine']}, idle apart from this benchmark; {run['versions']}. "
        f"Command: `{run['command']}`. Raw numbers: `{out.with_suffix('.json').name}`.", "",
        "MD: `LangevinMiddleIntegrator`, 0.5 fs, 300 K, float32 model, only the SchNet force, after warm-up. "
        "Force: openmm-torch's TorchForce (with or without CUDA graphs) or OpenMM's PythonForce (the model on the "
        "platform's device). Model: median forward+backward of the exported module (TorchScript; compiled or fused "
        "as the force column says; 'tabulated filters': spline tables instead of the filter network, "
        "schnet_md.tabulated). " + memory_text, "",
        f"| system | atoms | model | neighbours | force | torch threads | model fwd+bwd (ms) | MD steps/s | ms/step "
        f"| ns/day | {'peak CUDA memory' if cuda else 'peak RSS'} (MB) | model adds (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r.get("task", r)     # a failed row keeps its task, a measured one the same keys
        if t.get("backend") == "python":
            force = "PythonForce" + (" + torch.compile" if t.get("compile") else "") \
                + (" + fused CFConv" if t.get("fused") else "")
        else:
            force = "TorchForce" + (" + CUDA graphs" if t.get("cuda_graphs") else "")
        force += " + tabulated filters" if t.get("tabulate") else ""
        if "failed" in r:
            system = t.get("name", "water box")
            atoms = "" if t["kind"] == "molecule" else f"~{t['n_atoms']}"
            lines.append(f"| {system} | {atoms} | {t['preset']} | | {force} | {t['threads']} | did not run: {r['failed']} "
                         "| | | | | |")
            continue
        lines.append(f"| {r['system']} | {r['n_atoms']} | {r['model']} | {r['neighbor_list']} | {force} | "
                     f"{r['torch_threads']} | {_g(r['model_ms'])} | {_g(r['steps_per_second'])} | "
                     f"{_g(1000 / r['steps_per_second'])} | {_g(r['ns_per_day'])} | "
                     f"{r['peak_memory_mb']:.0f} | {r['model_memory_mb']:.0f} |")
    if not cuda:
        lines += ["", MEMORY_NOTE]
    if not search:
        out.write_text("\n".join(lines) + "\n")
        return
    lines += ["", "## Neighbour search alone (O(N) cell list against O(N^2) all pairs)", "",
              f"Water boxes, 5 Å cutoff, float32, TorchScript, {max(run['threads'])} torch thread(s), median of 5 calls, "
              "each box in a fresh process; pairs are the half list (each pair once); slots: the fixed capacity "
              "(cell list) or every pair (all pairs).", "",
              "| atoms | method | ms | pairs within cutoff | pair slots | peak RSS (MB) |", "|---|---|---|---|---|---|"]
    for r in search:
        lines.append(f"| {r['n_atoms']} | {r['method']} | {_g(r['ms'])} | {r['pairs_found']} | {r['pair_slots']} | "
                     f"{r['peak_memory_mb']:.0f} |")
    out.write_text("\n".join(lines) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
