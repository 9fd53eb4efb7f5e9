"""ML/MM demonstration: alanine dipeptide in TIP3P water with the solute's potential swapped to SchNet.

    python benchmarks/mlmm.py sample --ps 10        # GFN2-xTB reference MD of the solute (vacuum, 500 K) -> training set
    python benchmarks/mlmm.py xtb --ps 5            # short GFN2-xTB reference run of the solute (vacuum, 300 K): test set
    python benchmarks/mlmm.py train --hours 1       # round 1: SchNet (schnet2017) on the 500 K set; resumable
    python benchmarks/mlmm.py mm --ps 100           # amber14 + TIP3P, PME: the ordinary OpenMM setup
    python benchmarks/mlmm.py mlmm --ps 50          # the same setup, solute swapped to SchNet (createMixedSystem)
    # round 2, when round 1's ML/MM run left the training data (the blow-up guard stops it):
    python benchmarks/mlmm.py sample-hot --ps 5     # GFN2-xTB MD at 700 K: distorted geometries
    python benchmarks/mlmm.py label-run             # GFN2-xTB labels for the ML/MM run's solute frames; the run
                                                    # moves to mlmm-round1/ (kept for the report)
    python benchmarks/mlmm.py train --hours 1 --round 2   # all three sets, a fresh model in model2/
    python benchmarks/mlmm.py mlmm --ps 50          # uses the newest model
    python benchmarks/mlmm.py report                # Ramachandran comparison -> benchmarks/mlmm.md

Every stage resumes where it stopped (rerun it with a larger --ps or --hours). Runs live in
$SCHNET_MD_RUNS/mlmm (default ~/.cache/schnet-md/runs/mlmm). MD: LangevinMiddleIntegrator, 300 K,
friction 1/ps, 1 fs steps (the ML region has no constraints), CPU platform unless --platform.
Caveat stated in the report: the GFN2-xTB reference is the solute in vacuum, the MM and ML/MM runs
are in water, so the reference says where the learned surface's basins are, not the solvated populations.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch  # noqa: F401  (first)
import mdtraj
import numpy as np
import openmm
import openmm.app as app
from openmm import unit

from schnet_md.analysis.load import read_trajectory
from schnet_md.simulate import (AtomicCheckpointReporter, BlowUpGuard, SimulationSettings, StateCSVReporter,
                                load_checkpoint, save_checkpoint, truncate_dcd, truncate_state_csv)

ROOT = Path(__file__).resolve().parent.parent
RUNS = Path(os.environ.get("SCHNET_MD_RUNS", Path.home() / ".cache" / "schnet-md" / "runs")) / "mlmm"
STRUCTURE = ROOT / "systems" / "alanine-dipeptide" / "alanine-dipeptide.pdb"
OUT = ROOT / "benchmarks" / "mlmm"
TIMESTEP_FS = 1.0
REPORT = 100        # steps between frames (0.1 ps)
RUN_ID = "mlmm"     # its checkpoints' run id: one run per kind folder


def solvated():
    pdb = app.PDBFile(str(STRUCTURE))
    forcefield = app.ForceField("amber14-all.xml", "amber14/tip3p.xml")
    modeller = app.Modeller(pdb.topology, pdb.positions)
    # 1.2 nm of water: the SchNet solute (no cutoff) needs the box to stay over twice its span
    modeller.addSolvent(forcefield, model="tip3p", padding=1.2 * unit.nanometer)
    return modeller.topology, modeller.positions, forcefield


def build_system(kind: str, topology, forcefield, model_path: Path):
    mm = forcefield.createSystem(topology, nonbondedMethod=app.PME, nonbondedCutoff=0.9 * unit.nanometer,
                                 constraints=app.HBonds, rigidWater=True)
    if kind == "mm":
        return mm
    from openmmml import MLPotential

    return MLPotential("schnet", modelPath=str(model_path)).createMixedSystem(topology, mm, solute_atoms(topology))


def solute_atoms(topology) -> list:
    return [a.index for a in topology.atoms() if a.residue.name in ("ACE", "ALA", "NME")]


def newest_model() -> Path:
    return RUNS / "model2" if (RUNS / "model2" / "model.pt").exists() else RUNS / "model"


def training_files(round_: int) -> list:
    return [RUNS / "train.npz"] + ([RUNS / "hot.npz", RUNS / "run_frames.npz"] if round_ == 2 else [])


def merge(files, out: Path) -> Path:
    """One rMD17-format file from several of the same molecule (frame ids: file number * 1e7 + id)."""
    from schnet_md.reference import write_rmd17

    parts = [np.load(f) for f in files]
    write_rmd17(out, parts[0]["nuclear_charges"].tolist(), np.concatenate([p["coords"] for p in parts]),
                np.concatenate([p["energies"] for p in parts]), np.concatenate([p["forces"] for p in parts]),
                np.concatenate([k * 10_000_000 + p["old_indices"] for k, p in enumerate(parts)]))
    return out


def label_run() -> None:
    """GFN2-xTB labels (solute in vacuum, as the model sees it) for every solute frame of the ML/MM run."""
    from schnet_md.reference import label_frames

    run = RUNS / "mlmm" if (RUNS / "mlmm").exists() else RUNS / "mlmm-round1"
    traj = load_solute(run)
    numbers = [a.element.atomic_number for a in traj.topology.atoms]
    label_frames(numbers, traj.xyz * 10.0, RUNS / "run_frames.npz")
    if run.name == "mlmm":
        run.rename(RUNS / "mlmm-round1")


def load_solute(run: Path) -> mdtraj.Trajectory:
    """The solute frames of a run, each molecule whole (a periodic writer may have split it across the box)."""
    traj = read_trajectory(run / "solute.dcd", run / "solute.pdb")
    return traj.make_molecules_whole() if traj.unitcell_vectors is not None else traj


def run_md(kind: str, ps: float, platform: str) -> None:
    out = RUNS / kind
    out.mkdir(parents=True, exist_ok=True)
    topology, positions, forcefield = solvated()
    system = build_system(kind, topology, forcefield, newest_model() / "model.pt")
    solute = solute_atoms(topology)
    settings = SimulationSettings(timestep_fs=TIMESTEP_FS, temperature_k=300.0, friction_per_ps=1.0, seed=1,
                                  report_interval=REPORT, checkpoint_interval=10 * REPORT)
    integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1 / unit.picosecond, TIMESTEP_FS * unit.femtosecond)
    integrator.setRandomNumberSeed(1)
    simulation = app.Simulation(topology, system, integrator, openmm.Platform.getPlatformByName(platform))
    total = int(round(ps * 1000 / TIMESTEP_FS))
    checkpoint = out / "checkpoint.chk"
    append = checkpoint.exists()
    if append:
        load_checkpoint(simulation, checkpoint, RUN_ID)
        truncate_dcd(out / "solute.dcd", simulation.currentStep // REPORT)
        truncate_state_csv(out / "state.csv", simulation.currentStep)
    else:
        # relax the solvent with the plain force field, so both runs start from the same structure
        relax = app.Simulation(topology, build_system("mm", topology, forcefield, None),
                               openmm.LangevinMiddleIntegrator(300, 1, 0.001), openmm.Platform.getPlatformByName(platform))
        relax.context.setPositions(positions)
        relax.minimizeEnergy(maxIterations=500)
        simulation.context.setPositions(relax.context.getState(getPositions=True).getPositions())
        simulation.context.setVelocitiesToTemperature(300 * unit.kelvin, 1)
        with open(out / "solute.pdb", "w") as fh:
            sub = mdtraj.Topology.from_openmm(topology).subset(solute)
            state = simulation.context.getState(getPositions=True)
            xyz = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)[solute]
            app.PDBFile.writeFile(sub.to_openmm(), xyz * unit.nanometer, fh)
        save_checkpoint(simulation, checkpoint, RUN_ID)
    remaining = total - simulation.currentStep
    if remaining <= 0:
        return
    n_dof = 3 * system.getNumParticles() - system.getNumConstraints() - 3
    dcd = app.DCDReporter(str(out / "solute.dcd"), REPORT, append=append, atomSubset=solute)
    guard = BlowUpGuard(topology)
    simulation.reporters += [dcd, StateCSVReporter(out / "state.csv", REPORT, n_dof, TIMESTEP_FS, append, guard),
                             AtomicCheckpointReporter(checkpoint, settings.checkpoint_interval, RUN_ID, guard)]
    import time
    from schnet_md.simulate import SimulationError

    t0 = time.perf_counter()
    try:
        simulation.step(remaining)
    except SimulationError as error:   # frames and the last good checkpoint stay; the report says why it stopped
        (out / "stopped.txt").write_text(f"{error}\n")
        raise
    wall = time.perf_counter() - t0
    save_checkpoint(simulation, checkpoint, RUN_ID)
    info = {"kind": kind, "ps": simulation.currentStep * TIMESTEP_FS / 1000, "atoms": system.getNumParticles(),
            "platform": platform, "ns_per_day_last_segment": remaining * TIMESTEP_FS * 1e-6 / wall * 86400}
    (out / "run.json").write_text(json.dumps(info, indent=1))
    print(info)


def phi_psi(traj: mdtraj.Trajectory) -> np.ndarray:
    return np.degrees(np.stack([mdtraj.compute_phi(traj)[1][:, 0], mdtraj.compute_psi(traj)[1][:, 0]], axis=1))


def report() -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.spatial.distance import jensenshannon

    OUT.mkdir(parents=True, exist_ok=True)
    runs = {}
    for kind, label in (("mm", "amber14 (TIP3P, PME)"), ("mlmm", "SchNet/amber14 ML/MM (TIP3P, PME)"),
                        ("mlmm-round1", "round-1 SchNet ML/MM (stopped)")):
        if (RUNS / kind / "solute.dcd").exists():
            runs[label] = load_solute(RUNS / kind)
    if (RUNS / "xtb.npz").exists():
        with np.load(RUNS / "xtb.npz") as f:
            top = mdtraj.load(str(STRUCTURE)).topology
            runs["GFN2-xTB (vacuum)"] = mdtraj.Trajectory(f["coords"] / 10.0, top)
    bins = np.linspace(-180, 180, 25)
    angles = {k: phi_psi(t) for k, t in runs.items()}
    hists = {k: np.histogram2d(*a.T, bins=[bins, bins])[0].ravel() for k, a in angles.items()}
    fig, axes = plt.subplots(1, max(len(runs), 1), figsize=(4.2 * max(len(runs), 1), 4), squeeze=False)
    for ax, (label, t) in zip(axes[0], runs.items()):
        a = angles[label]
        ax.hist2d(a[:, 0], a[:, 1], bins=[bins, bins], cmap="viridis")
        ax.set_title(f"{label}\n{t.n_frames} frames", fontsize=8)
        ax.set_xlabel("phi (°)")
        ax.set_ylabel("psi (°)")
    fig.tight_layout()
    fig.savefig(OUT / "ramachandran.png", dpi=100)
    plt.close(fig)
    lines = ["# ML/MM: alanine dipeptide in water with a SchNet solute", "",
             "Regenerated by `python benchmarks/mlmm.py report`; the stages and settings are in the script's docstring.",
             "The GFN2-xTB reference is the solute in vacuum; the MM and ML/MM runs are in water.", ""]
    if (RUNS / "mlmm-round1").exists():
        stopped = (RUNS / "mlmm-round1" / "stopped.txt")
        lines += [f"- Round 1 (model trained on the 500 K set only): the ML/MM run was stopped by the blow-up guard: "
                  f"`{stopped.read_text().strip() if stopped.exists() else 'see the log'}` "
                  "(1 fs steps, so step N is N fs). Its solute frames, labelled with GFN2-xTB, and a 700 K set went "
                  "into round 2's training data (`label-run`, `sample-hot`)."]
    for kind in ("mm", "mlmm"):
        if (RUNS / kind / "run.json").exists():
            info = json.loads((RUNS / kind / "run.json").read_text())
            lines.append(f"- `{kind}`: {info['ps']:.1f} ps, {info['atoms']} atoms, {info['platform']} platform, "
                         f"{info['ns_per_day_last_segment']:.3f} ns/day as run (not a benchmark: one thread, "
                         "the machine shared with trainings)")
    labels = list(hists)
    if len(labels) > 1:
        lines += ["", "Jensen-Shannon divergence of the (phi, psi) histograms (15° bins; 0 identical, 1 disjoint):", "",
                  "| | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        for a in labels:
            lines.append(f"| {a} | " + " | ".join(f"{jensenshannon(hists[a], hists[b], base=2) ** 2:.3f}" for b in labels) + " |")
    lines += training_lines()
    lines += analysis_lines(runs)
    lines += ["", "![Ramachandran](mlmm/ramachandran.png)", ""]
    (ROOT / "benchmarks" / "mlmm.md").write_text("\n".join(lines))
    print("\n".join(lines))


def training_lines() -> list:
    """The training set and the trained model's validation errors."""
    lines = []
    info_path = RUNS / "train.npz.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        lines += ["", f"Training set: {info['frames']} frames of {info['method']} Langevin MD of the solute in vacuum at "
                  f"{info['temperature_k']:.0f} K ({info['trajectories']} runs of {info['steps_per_trajectory']} steps "
                  f"of {info['timestep_fs']} fs, every {info['every']}th step; `python benchmarks/mlmm.py sample`)."]
    for round_, folder in ((1, RUNS / "model"), (2, RUNS / "model2")):
        if not (folder / "metrics.json").exists():
            continue
        m = json.loads((folder / "metrics.json").read_text())
        best = min(m["history"], key=lambda h: h["validation_loss"])
        hours = sum(h["seconds"] for h in m["history"]) / 3600
        sets = ", ".join(f"{f.name} ({len(np.load(f)['energies'])} frames)" for f in training_files(round_))
        line = (f"Round {round_} SchNet (schnet2017) on {sets}: {len(m['history'])} epochs ({hours:.2f} h on one CPU "
                f"thread), best validation (10% of the frames) energy MAE {best['validation_energy_mae']:.2f} kcal/mol, "
                f"force MAE {best['validation_forces_mae']:.2f} kcal/mol/Å")
        if (RUNS / "xtb_run.npz").exists():   # the separate 300 K GFN2-xTB run: never trained on
            from schnet_md.data import read_data
            from schnet_md.evaluate import evaluate
            from schnet_md.modelfile import load_model
            r = evaluate(load_model(folder / "model.pt")[0], read_data(RUNS / "xtb_run.npz"))
            line += (f"; on the 300 K GFN2-xTB run (test, {r['n_frames']} frames) {r['energy_mae_kcal_mol']:.2f} "
                     f"kcal/mol and {r['forces_mae_kcal_mol']:.2f} kcal/mol/Å")
        lines.append(line + ".")
    return lines


def analysis_lines(runs: dict) -> list:
    """schnet-md's own analysis: chemistry and transitions of each run, and `compare` against amber14."""
    from schnet_md.analysis.analyze import analyze
    from schnet_md.analysis.compare import compare, write_comparison
    from schnet_md.analysis.load import LoadedTrajectory

    loaded = [LoadedTrajectory(t, label) for label, t in runs.items()]
    lines = ["", "Per run (`schnet_md.analysis.analyze`): frames whose bond map differs from the topology's "
             "(broken or formed bonds), and phi/psi transitions between staggered states with hysteresis:", "",
             "| run | frames | frames with changed bonds | dihedral transitions |", "|---|---|---|---|"]
    for item in loaded:
        a = analyze(item)
        trans = ", ".join(f"{d['name']}: {d['n_transitions']}" for d in a["dihedrals"])
        lines.append(f"| {item.label} | {a['n_frames']} | {a['chemistry_changes']['n_frames_changed']} | {trans} |")
    if len(loaded) > 1:
        result = compare(loaded)
        write_comparison(result, OUT / "compare")
        lines += ["", f"`schnet_md.analysis.compare` against {loaded[0].label} (Jensen-Shannon divergence of each "
                  "rotatable dihedral and of the heavy-atom distances; plots in [mlmm/compare](mlmm/compare/compare.md)):",
                  "", "| distribution | " + " | ".join(x.label for x in loaded[1:]) + " |",
                  "|---|" + "---|" * (len(loaded) - 1)]
        for d in result["dihedrals"]:
            lines.append(f"| dihedral {d['name']} | " + " | ".join(f"{v:.3f}" for v in d["js_divergence"]) + " |")
        lines.append("| heavy-atom distances, mean | " +
                     " | ".join(f"{v:.3f}" for v in result["distances"]["mean_js_divergence"]) + " |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("sample", "sample-hot", "mm", "mlmm", "xtb"):
        s = sub.add_parser(name)
        s.add_argument("--ps", type=float, required=True)
        s.add_argument("--platform", default="CPU")
    t = sub.add_parser("train")
    t.add_argument("--hours", type=float, default=1.0)
    t.add_argument("--round", type=int, choices=(1, 2), default=1)
    sub.add_parser("label-run")
    sub.add_parser("report")
    args = p.parse_args()
    RUNS.mkdir(parents=True, exist_ok=True)
    if args.command == "sample":
        from schnet_md.reference import sample
        sample(STRUCTURE, RUNS / "train.npz", ps=args.ps, temperature_k=500.0, every=20)
    elif args.command == "sample-hot":
        from schnet_md.reference import sample
        sample(STRUCTURE, RUNS / "hot.npz", ps=args.ps, temperature_k=700.0, every=10, seed=100)
    elif args.command == "label-run":
        label_run()
    elif args.command == "xtb":
        from schnet_md.reference import sample
        out = sample(STRUCTURE, RUNS / "xtb_run.npz", ps=args.ps, temperature_k=300.0, every=20, trajectories=1, seed=7)
        with np.load(out) as f:
            np.savez(RUNS / "xtb.npz", coords=f["coords"])
    elif args.command == "train":
        from schnet_md.train import resolve_config, train_from_config
        model_dir = RUNS / ("model" if args.round == 1 else "model2")
        data = training_files(args.round)
        path = data[0] if len(data) == 1 else merge(data, RUNS / "train_round2.npz")
        config = resolve_config(None, {"data": {"path": str(path)},
                                       "training": {"epochs": 3000, "batch_size": 16, "lr_patience": 25,
                                                    "ema_decay": 0.99, "max_hours": args.hours,
                                                    "validation_fraction": 0.1}})
        train_from_config(config, model_dir, resume=(model_dir / "checkpoint.pt").exists())
    elif args.command in ("mm", "mlmm"):
        run_md(args.command, args.ps, args.platform)
    else:
        report()


if __name__ == "__main__":
    main()
