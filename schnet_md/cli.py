"""`schnet-md` command line: parse, call the library, print. No physics lives here."""

from __future__ import annotations

import argparse
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

from . import runs
from .runs import RunInterrupted


def _launch_processes(nproc: int, argv) -> int:
    """`train --nproc N`: run this same command as N processes on this machine through torchrun."""
    import os
    import subprocess

    rest = list(argv)
    k = rest.index("--nproc")
    del rest[k:k + 2]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "schnet_md.cli", *rest]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.call(command, env=env)


def _train(args) -> int:
    import os

    import torch

    from .parallel import main_process
    from .train import asked_settings, resolve_config, train_from_config

    if args.nproc and args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        if args.argv is None or "--nproc" not in args.argv:
            raise ValueError("--nproc must be given on the command line")
        return _launch_processes(args.nproc, args.argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {
        "data": {"path": args.data, "format": args.format, "labels": args.labels, "split": args.split,
                 "max_frames": args.max_frames, "energy_unit": args.energy_unit,
                 "validation_path": args.validation_data, "validation_split": args.validation_split,
                 "energy_only": args.energy_only},
        "model": {"preset": args.preset, "n_features": args.features, "n_interactions": args.interactions,
                  "cutoff": args.cutoff, "init": args.init},
        "training": {"epochs": args.epochs, "batch_size": args.batch_size, "learning_rate": args.lr,
                     "lr_patience": args.lr_patience, "rho": args.rho,
                     "validation_fraction": args.validation_fraction, "seed": args.seed,
                     "ema_decay": args.ema, "early_stopping_patience": args.early_stopping,
                     "max_hours": args.max_hours, "device": args.device, "checkpoint_minutes": args.checkpoint_minutes,
                     "frames_per_epoch": args.frames_per_epoch, "warmup_steps": args.warmup_steps},
    }
    # a resume takes only what is given again (the library holds it against the recorded run)
    config = asked_settings(args.config, overrides) if args.resume else resolve_config(args.config, overrides)
    resume_line = f"continue with: schnet-md train --resume --out {args.out}"
    try:
        summary = train_from_config(config, args.out, resume=args.resume, overwrite=args.overwrite)
    except RunInterrupted as stop:
        if main_process():
            print(f"schnet-md train: {stop}; {resume_line} (exit status {stop.exit_code})", file=sys.stderr)
        return stop.exit_code
    if not main_process():
        return 0                                   # rank 0 reports
    model_file = Path(args.out) / "model.pt"
    if not summary["finished"]:                    # the time budget ran out: resumable
        kept = f"the best model so far is {model_file}" if model_file.is_file() else \
            "no epoch has finished yet, so there is no model.pt"
        print(f"{summary['stop_reason']}; {kept}; {resume_line}")
        return 0
    if not model_file.is_file():
        raise RuntimeError(f"training ended without writing {model_file}")
    print(f"model written to {model_file}" + (f" ({summary['processes']} processes)" if summary["processes"] > 1
                                              else ""))
    return 0


@contextmanager
def _json_output(path, command: str, overwrite: bool):
    """--json FILE: held for the command's life (one writer at a time), and refused before any work if it exists,
    unless --overwrite."""
    if not path:
        yield
        return
    with runs.exclusive(path, command, file=True):
        runs.refuse_existing([path], overwrite, f"{command} report")
        yield


def _evaluate(args) -> int:
    from .data import read_data
    from .evaluate import check_labels, evaluate, format_table, rmd17_labels_for
    from .modelfile import load_model, trained_labels

    with _json_output(args.json, "evaluate", args.overwrite):
        model, metadata = load_model(args.model)
        trained_on = trained_labels(metadata)
        data = read_data(args.data, args.format, labels=args.labels or rmd17_labels_for(trained_on),
                         split=args.split, energy_only=args.energy_only)
        check_labels(args.model, trained_on, data, args.allow_label_mismatch,
                     log=lambda m: print(m, file=sys.stderr))
        metrics = evaluate(model, data)
        print(f"{metrics['data']}: {metrics['n_frames']} frames")
        print(format_table(metrics))
        if args.json:
            runs.write_json(args.json, metrics)
    return 0


def _export(args) -> int:
    from .export import expected_atoms, export_model, load_exported
    from .structures import read_structure, select_atoms

    if Path(args.out).exists() and not args.overwrite:
        raise ValueError(f"{args.out} already exists; pass --overwrite to replace it")
    if args.engine == "lammps":
        from .lammps import export_lammps

        if args.structure or args.atoms:
            raise ValueError("--engine lammps takes no --structure or --atoms: LAMMPS gives the atoms at run time")
        path = export_lammps(args.model, args.out, dtype=args.precision or "float64", tabulate=args.tabulate)
        elements = " ".join(load_exported(path)[1]["element_symbols"])
        print(f"LAMMPS model written to {path}: pair_style schnet; pair_coeff * * {path} <element per atom type: "
              f"{elements} or NULL>")
        return 0
    if not args.structure:
        raise ValueError("export for OpenMM needs --structure FILE (the system the force acts on)")
    args.precision = args.precision or "float32"
    structure = read_structure(args.structure)
    atoms = select_atoms(structure, args.atoms) if args.atoms else None
    path = export_model(args.model, structure, args.out, atoms=atoms, dtype=args.precision, tabulate=args.tabulate)
    n = structure.n_atoms if atoms is None else len(atoms)
    print(f"TorchForce module for {n} of {structure.n_atoms} particles written to {path}")
    # a bare openmmtorch.TorchForce(path) takes whatever particles it is given: say which it expects
    metadata = load_exported(path)[1]
    print(f"it expects {expected_atoms(metadata)} (create_torch_force(FILE, topology) checks this; "
          "a bare TorchForce cannot)")
    if metadata["periodic"]:
        print(f"periodic: load it with schnet_md.export.load_torch_force('{path}'), or call "
              "setUsesPeriodicBoundaryConditions(True) on openmmtorch.TorchForce(FILE)")
    return 0


def _simulate(args) -> int:
    import json

    from .simulate import SimulationSettings, resume_simulation, run_simulation

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.resume:
        if args.tabulate:
            raise ValueError("--resume continues with the run's own exported force (force.pt); --tabulate applies "
                             "to new runs")
        from .simulate import read_run_info

        info = read_run_info(Path(args.resume))
        for given, key in ((args.structure, "structure"), (args.model, "model")):
            if given is not None and info and str(given) != str(info.get(key)) and \
                    Path(str(given)).resolve() != Path(str(info.get(key))).resolve():
                raise ValueError(f"--resume {args.resume} continues the run of {key} {info.get(key)!r}; it cannot "
                                 f"switch to {given!r} (start a new run with another --out)")
        result = resume_simulation(args.resume, steps=args.steps, platform=args.platform)
    else:
        if not (args.structure and args.model and args.out):
            raise ValueError("simulate needs STRUCTURE, --model and --out (or --resume DIR)")
        settings = SimulationSettings(
            steps=1000 if args.steps is None else args.steps, timestep_fs=args.timestep, temperature_k=args.temperature,
            friction_per_ps=args.friction, report_interval=args.report_interval,
            checkpoint_interval=args.checkpoint_interval, minimize=args.minimize, seed=args.seed,
            platform=args.platform, precision=args.precision, tabulate=args.tabulate, guard=not args.no_guard,
            disagreement_warn=args.disagreement_warn, disagreement_stop=args.disagreement_stop,
            pressure_bar=args.pressure, barostat_interval=args.barostat_interval)
        result = run_simulation(args.structure, args.model, args.out, settings, overwrite=args.overwrite)
    seed = json.loads((result.out_dir / "run.json").read_text())["settings"]["seed"]
    print(f"trajectory: {result.trajectory}  ({result.n_frames} frames)")
    print(f"state log:  {result.state_csv}")
    print(f"seed:       {seed} (rerun with --seed {seed} to repeat this run)")
    print(f"speed:      {result.ns_per_day:.2f} ns/day, {result.steps_per_second:.1f} steps/s "
          f"on the {result.platform} platform")
    return 0


def _analyze(args) -> int:
    from .analysis.analyze import analyze_to

    report = analyze_to(args.trajectory, args.out, top=args.top, timestep_ps=args.timestep, overwrite=args.overwrite)
    print(f"report: {report}")
    return 0


def _compare(args) -> int:
    from .analysis.compare import compare_to

    labels = args.labels.split(",") if args.labels else None
    print(f"report: {compare_to(args.trajectories, args.out, top=args.top, labels=labels, overwrite=args.overwrite)}")
    return 0


def _label(args) -> int:
    from .reference import frames_from, label_frames

    with runs.exclusive(args.out, "label", file=True):       # from before the input is read: a second writer is
        z, coords, files = frames_from(args.input, args.top)  # refused at once (label_frames holds it again)
        out = label_frames(z, coords, args.out, method=args.method, charge=args.charge, workers=args.workers,
                           inputs=files, overwrite=args.overwrite)
    print(f"{len(coords)} frames labelled with {args.method}: {out} (rMD17 format: Å, kcal/mol)")
    return 0


def _sample(args) -> int:
    from .reference import sample

    out = sample(args.structure, args.out, args.ps, args.temperature, args.timestep, args.every, args.friction,
                 args.trajectories, args.seed, args.method, args.charge, overwrite=args.overwrite)
    print(f"reference MD frames written to {out} (rMD17 format: Å, kcal/mol); settings in {out}.json")
    return 0


def _import_schnetpack(args) -> int:
    from .elements import atomic_number
    from .modelfile import save_model
    from .schnetpack_import import import_model_file

    elements = [atomic_number(e) for e in args.elements]
    model = import_model_file(args.model, elements, args.energy_unit, args.length_unit)
    save_model(model, args.out, {"source": f"schnetpack model {args.model}", "preset": "schnetpack",
                                 "units": {"length": "Angstrom", "energy": args.energy_unit}})
    print(f"schnet-md model written to {args.out} (elements {' '.join(args.elements)}, energies in {args.energy_unit})")
    return 0


def _bench(args) -> int:
    import torch

    from .bench import bench, benchmark_model, water_box
    from .modelfile import load_model
    from .structures import read_structure

    if args.threads:
        torch.set_num_threads(args.threads)
    with _json_output(args.json, "bench", args.overwrite):
        results = []
        for target in args.targets:
            if target.startswith("water:"):
                count = target.split(":", 1)[1]
                if not count.isdigit() or not 30 <= int(count) <= 10_000_000:
                    raise ValueError(f"water:N needs a number of atoms from 30 up, got {target!r}")
                topology, positions = water_box(int(count))
                name = f"water box ({topology.getNumAtoms()} atoms)"
            else:
                path = Path(target) if Path(target).exists() else SYSTEMS / target / f"{target}.pdb"
                if not path.exists():
                    raise ValueError(f"bench target {target!r} is neither a file nor one of the ready-to-run systems "
                                     f"({', '.join(sorted(d.name for d in SYSTEMS.iterdir() if d.is_dir()))}) nor water:N")
                structure = read_structure(path)
                topology, positions, name = structure.topology, structure.positions_nm, target
            z = [a.element.atomic_number for a in topology.atoms()]
            if args.model:
                model, label = load_model(args.model)[0], args.model
            else:
                model, label = benchmark_model(args.preset, z, topology.getPeriodicBoxVectors() is not None, args.cutoff)
            r = bench(name, topology, positions, model, label + (" + tabulated filters" if args.tabulate else ""),
                      args.platform, args.steps, args.repeats, args.cuda_graphs, args.neighbor_list, tabulate=args.tabulate)
            results.append(r.as_dict())
            print(f"{r.system:28s} {r.n_atoms:6d} atoms  {r.model:34s} {r.neighbor_list:9s} model {r.model_ms:9.2f} ms  "
                  f"MD {r.steps_per_second:9.1f} steps/s  {r.ns_per_day:8.2f} ns/day  peak {r.peak_memory_mb:8.0f} MB "
                  f"(model calls {r.model_memory_mb:+.0f} MB)")
        if args.json:
            runs.write_json(args.json, results)
    return 0


def _check(args) -> int:
    from .check import CheckSettings, check, format_report, write_json

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    settings = CheckSettings(temperature_k=args.temperature, md_steps=args.steps, platform=args.platform,
                             seed=args.seed)
    with _json_output(args.json, "check", args.overwrite):
        report = check(args.model, args.structure, settings, log=lambda m: print(m, file=sys.stderr))
        print(format_report(report))
        if args.json:
            write_json(report, args.json)
    return 0 if report["passed"] else 2


def _refine(args) -> int:
    import numpy as np

    from .data import read_data
    from .refine import RefineSettings, refine

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    # held from before the data are read: a second refine into OUT is refused at once (refine() holds it again)
    with runs.exclusive(args.out, "refine", file=False):
        data = read_data(args.data, args.format, labels=args.labels, split=args.split)
        if args.max_frames and args.max_frames < len(data):      # evenly spaced: every molecule of a multi-molecule set
            data = data.subset(np.unique(np.linspace(0, len(data) - 1, args.max_frames).round().astype(np.int64)))
        test = [read_data(args.test, labels=args.labels, split=split) for split in args.test_split] \
            if args.test else None
        if test and args.test_frames:
            test = [t.subset(np.unique(np.linspace(0, len(t) - 1, args.test_frames).round().astype(np.int64)))
                    if args.test_frames < len(t) else t for t in test]
        validation = read_data(args.validation_data, labels=args.labels, split=args.validation_split) \
            if args.validation_data else None
        settings = RefineSettings(method=args.method, temperatures=args.temperatures, md_steps=args.md_steps,
                                  members=args.members, member_epochs=args.member_epochs, frames_per_round=args.frames,
                                  epochs=args.epochs, learning_rate=args.learning_rate, rounds=args.rounds,
                                  check_steps=args.check_steps, seed=args.seed, frames_per_epoch=args.frames_per_epoch,
                                  label_weight=args.label_weight, transfer_paths=args.transfer_paths)
        record = refine(args.model, args.structure, data, args.out, settings, test=test, validation=validation,
                        log=lambda m: print(m, file=sys.stderr, flush=True), polish_epochs=args.polish_epochs,
                        runs=args.from_runs or (), previous_labels=args.previous_labels or (),
                        data_files={"data": args.data, "validation": args.validation_data, "test": args.test})
    final = record["final_check"]
    worse = [r["round"] for r in record["rounds"] if r.get("test_not_worse") is False]   # said, not hidden
    print(f"rounds: {len(record['rounds'])}; final model {record['final_model']}; check "
          f"{'passed' if final['passed'] else 'still fails'}; record {Path(args.out) / 'rounds.json'}"
          + (f"; test errors got worse in round(s) {worse}" if worse else ""))
    return 0 if final["passed"] else 2


def _doctor(args) -> int:
    from .doctor import diagnose, format_report

    report = diagnose(args.platform or None)
    print(format_report(report))
    return 0 if report.ok else 1


SHIPPED = "ethanol, aspirin, iso17x, alanine-dipeptide"
SYSTEMS = Path(__file__).resolve().parent.parent / "systems"     # ready-to-run structures of a source checkout


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """--help shows each option's default where it has a meaningful one."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text \
                and action.option_strings:
            text += f" (default: {action.default})"
        return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="schnet-md", description="SchNet potentials for molecular dynamics: train, export to OpenMM, simulate.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a SchNet on energies (and forces)",
                       description="Train a SchNet. Settings come from --config FILE (TOML with [data], [model] "
                                   "and [training] tables) and are overridden by the flags below.")
    t.add_argument("--config", help="TOML config file")
    t.add_argument("--data", help="training data: rMD17 npz, iso17x folder, QM9 npz or any ASE-readable file")
    t.add_argument("--format", choices=["auto", "rmd17", "iso17x", "qm9", "ase"])
    t.add_argument("--labels", choices=["new", "old"],
                   help="rMD17 files: new = revised rMD17 labels, old = original MD17 labels of the same frames")
    t.add_argument("--split", help="iso17x split to train on (default: train)")
    t.add_argument("--validation-data", help="a separate validation file (default: a random fraction)")
    t.add_argument("--validation-split", help="iso17x split to validate on (default: validation)")
    t.add_argument("--energy-unit", help="model energy unit (default: the data's): kcal/mol, eV, kJ/mol, ...")
    t.add_argument("--energy-only", action="store_true", default=None,
                   help="train on energies alone, leaving out any forces in the data (needed when forces are all "
                        "zero in some frames or missing from some)")
    t.add_argument("--out", required=True, help="output folder (model.pt, checkpoint.pt, metrics.json, config.json)")
    t.add_argument("--preset", choices=["schnet2017", "schnet2018"])
    t.add_argument("--init", help="fine-tune from this model (file or shipped name): its architecture, weights and "
                                  "energy statistics (e.g. committee members: --init BASE --seed k)")
    t.add_argument("--features", type=int, help="override F (feature width)")
    t.add_argument("--interactions", type=int, help="override the number of interaction blocks")
    t.add_argument("--cutoff", type=float, help="override the cutoff (Å; cosine)")
    t.add_argument("--epochs", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float, help="initial Adam learning rate")
    t.add_argument("--lr-patience", type=int, help="epochs without improvement before the learning rate halves")
    t.add_argument("--rho", type=float, help="energy weight in the loss (paper: 0.01)")
    t.add_argument("--validation-fraction", type=float)
    t.add_argument("--ema", type=float, help="decay of an exponential moving average of the weights (e.g. 0.99)")
    t.add_argument("--early-stopping", type=int, help="stop after N epochs without validation improvement")
    t.add_argument("--max-hours", type=float, help="stop after this much wall time (checked between batches); "
                                                  "--resume continues")
    t.add_argument("--checkpoint-minutes", type=float,
                   help="also write checkpoint.pt within an epoch after this much wall time (default 10; 0: at epoch "
                        "ends only), so a long epoch is resumable")
    t.add_argument("--max-frames", type=int, help="use only the first N frames of the data")
    t.add_argument("--warmup-steps", type=int, help="ramp the learning rate up over the first N optimiser steps "
                                                    "(fine-tuning with --init: a fresh optimiser at full rate first "
                                                    "knocks the model off its minimum)")
    t.add_argument("--frames-per-epoch", type=int, help="each epoch trains on N frames drawn afresh from the training "
                                                        "set (short epochs over a large set; default: all)")
    t.add_argument("--device", help="auto (CUDA when present), cpu or cuda")
    t.add_argument("--seed", type=int)
    t.add_argument("--threads", type=int, help="torch CPU threads (per process)")
    t.add_argument("--nproc", type=int, help="data-parallel processes on this machine (torchrun; gloo on CPU, NCCL "
                                             "on CUDA); for several machines launch `torchrun ... -m schnet_md.cli "
                                             "train ...` yourself")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in OUT exactly (its config.json and checkpoint.pt, its input files "
                        "unchanged); only --epochs, --max-hours, --device and --checkpoint-minutes may change")
    t.add_argument("--overwrite", action="store_true",
                   help="replace a run already in OUT (its model.pt, checkpoints, metrics.json and config.json are "
                        "removed before the new run starts)")
    t.set_defaults(func=_train)

    v = sub.add_parser("evaluate", help="energy and force errors of a model on labelled frames",
                       description="MAE and RMSE of energies and force components, in kcal/mol and meV.")
    v.add_argument("model", help=f"model file, or a shipped model name ({SHIPPED})")
    v.add_argument("--data", required=True, help="rMD17 npz, iso17x folder, QM9 npz or any ASE-readable file")
    v.add_argument("--format", choices=["auto", "rmd17", "iso17x", "qm9", "ase"], default="auto")
    v.add_argument("--labels", choices=["new", "old"],
                   help="rMD17 files: new = revised rMD17 labels, old = original MD17 labels (default: those the model "
                        "was trained on)")
    v.add_argument("--allow-label-mismatch", action="store_true",
                   help="evaluate on labels other than those the model was trained on (their energies lie on another "
                        "zero, which the energy errors then include)")
    v.add_argument("--split", default="test_within", help="iso17x split (default: test_within)")
    v.add_argument("--energy-only", action="store_true", help="score energies alone, leaving out any forces in the "
                                                              "data")
    v.add_argument("--json", help="also write the metrics to this JSON file (an existing one is refused before any "
                                  "work, unless --overwrite)")
    v.add_argument("--overwrite", action="store_true", help="replace the --json file if it exists")
    v.set_defaults(func=_evaluate)

    e = sub.add_parser("export", help="write an openmmtorch.TorchForce module for a structure",
                       description="Export MODEL for the particles of STRUCTURE: the module takes positions "
                                   "in nm (and box vectors in nm) and returns the energy in kJ/mol.")
    e.add_argument("model", help=f"model file written by `schnet-md train`, or a shipped model name ({SHIPPED})")
    e.add_argument("--engine", choices=["openmm", "lammps"], default="openmm",
                   help="openmm: a TorchForce module for one system (default); lammps: a module for pair_style schnet")
    e.add_argument("--structure", help="PDB or XYZ file of the whole system (OpenMM)")
    e.add_argument("--atoms", help="the particles the model acts on: 'resname MOL', 'resid 0', "
                                   "'index 0 to 8 or index 12' or 'all' (mdtraj selection "
                                   "syntax; default: all)")
    e.add_argument("--precision", choices=["float32", "float64"],
                   help="default: float32 for OpenMM, float64 for LAMMPS")
    e.add_argument("--tabulate", action="store_true",
                   help="filters from spline tables of the distance instead of the filter network: faster, the same "
                        "forces to float32 precision")
    e.add_argument("--out", required=True, help="output .pt file (TorchScript)")
    e.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    e.set_defaults(func=_export)

    s = sub.add_parser("simulate", help="run MD in OpenMM with the model",
                       description="Langevin MD (LangevinMiddleIntegrator) of STRUCTURE with MODEL in OpenMM.")
    s.add_argument("structure", nargs="?", help="PDB, PDBx/mmCIF or XYZ file")
    s.add_argument("--model", help=f"model file written by `schnet-md train`, or a shipped model name ({SHIPPED}); "
                                   "several files joined by commas make a committee (mean force; state.csv reports "
                                   "their force disagreement)")
    s.add_argument("--disagreement-warn", type=float, default=200.0,
                   help="committee force disagreement (kJ/mol/nm) that earns a warning")
    s.add_argument("--disagreement-stop", type=float, default=0.0,
                   help="committee force disagreement (kJ/mol/nm) that stops the run (0: never)")
    s.add_argument("--pressure", type=float, default=0.0,
                   help="bar: NPT with a MonteCarloBarostat at this pressure (periodic systems; 0: constant volume). "
                        "state.csv then tracks volume_nm3 and density_g_ml")
    s.add_argument("--barostat-interval", type=int, default=25, help="steps between the barostat's volume moves")
    s.add_argument("--out", help="output folder (refused if it already holds a run or files a run writes, unless "
                                 "--overwrite)")
    s.add_argument("--overwrite", action="store_true",
                   help="replace the run (or the run files) already in --out: its trajectory, checkpoints and records "
                        "are removed first")
    s.add_argument("--steps", type=int, help="steps to run (default 1000; with --resume: further steps, default "
                                             "up to the step count the run was started with)")
    s.add_argument("--timestep", type=float, default=0.5, help="fs")
    s.add_argument("--temperature", type=float, default=300.0, help="K")
    s.add_argument("--friction", type=float, default=1.0, help="1/ps")
    s.add_argument("--report-interval", type=int, default=10, help="steps between frames and state.csv rows")
    s.add_argument("--checkpoint-interval", type=int, default=1000, help="steps between checkpoints")
    s.add_argument("--platform", choices=["CUDA", "OpenCL", "CPU", "Reference"],
                   help="default: fastest available (CUDA > OpenCL > CPU > Reference)")
    s.add_argument("--precision", choices=["float32", "float64"], default="float32", help="model precision")
    s.add_argument("--tabulate", action="store_true",
                   help="filters from spline tables (faster; the same forces to float32 precision)")
    s.add_argument("--threads", type=int, help="torch threads for the model on the CPU platform (default: torch's)")
    s.add_argument("--minimize", action="store_true", help="minimise the energy first (checked by the guard)")
    s.add_argument("--seed", type=int, default=0,
                   help="seed for velocities and the thermostat; 0 picks one, which run.json records")
    s.add_argument("--no-guard", action="store_true",
                   help="do not stop when bonds break or form (for reactive chemistry)")
    s.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    s.set_defaults(func=_simulate)

    a = sub.add_parser("analyze", help="analyse a trajectory with mdtraj (report, plots, JSON)",
                       description="RMSD, radius of gyration, rotatable dihedrals and their transitions, conformer "
                                   "populations, bond sanity, energies and temperature.")
    a.add_argument("trajectory", help="a run folder of `schnet-md simulate`, a trajectory file (with --top), "
                                      "or iso17x:MOL for an iso17x reference trajectory")
    a.add_argument("--top", help="topology (PDB) for a bare trajectory file")
    a.add_argument("--timestep", type=float, help="picoseconds between frames of a bare trajectory file (a run "
                                                  "folder, or a file beside its run.json, knows its own)")
    a.add_argument("--out", required=True, help="output folder (report.md, summary.json, *.png); one that already "
                                                "holds any of these, an earlier analysis too, is refused unless "
                                                "--overwrite")
    a.add_argument("--overwrite", action="store_true",
                   help="replace an earlier output in --out (all its files go first; other files stay)")
    a.set_defaults(func=_analyze)

    c = sub.add_parser("compare", help="compare trajectories of one molecule (dihedral and distance distributions)")
    c.add_argument("trajectories", nargs="+", help="run folders, trajectory files (with --top) or iso17x:MOL; "
                                                   "the first is the reference")
    c.add_argument("--top", help="topology (PDB) for bare trajectory files")
    c.add_argument("--labels", help="comma-separated names for the trajectories")
    c.add_argument("--out", required=True, help="output folder (compare.md, compare.json, *.png); one that already "
                                                "holds any of these, an earlier comparison too, is refused unless "
                                                "--overwrite")
    c.add_argument("--overwrite", action="store_true",
                   help="replace an earlier output in --out (all its files go first; other files stay)")
    c.set_defaults(func=_compare)

    lb = sub.add_parser("label", help="GFN2-xTB energies and forces for structures or trajectories (tblite)",
                        description="Label frames with GFN2-xTB (tblite); writes an rMD17-format npz the trainer "
                                    "reads. Parallel over cores; the work is kept in OUT.parts/, and rerunning resumes "
                                    "it if the input file(s), frames, method and charge are those it started with "
                                    "(else it is refused, naming what changed).")
    lb.add_argument("input", help="structure file, run folder, or trajectory file (with --top)")
    lb.add_argument("--top", help="topology for a bare trajectory file")
    lb.add_argument("--out", required=True, help="output .npz (an existing file no labelling made is refused unless "
                                                "--overwrite)")
    lb.add_argument("--overwrite", action="store_true",
                    help="start afresh: replace --out and any earlier labelling of it (OUT.parts/)")
    lb.add_argument("--method", default="GFN2-xTB",
                    help="GFN2-xTB or GFN1-xTB (tblite), or PBE/def2-SVP (PySCF, rMD17's level of theory)")
    lb.add_argument("--charge", type=int, default=0)
    lb.add_argument("--workers", type=int, default=0, help="processes (default: one per core)")
    lb.set_defaults(func=_label)

    sp = sub.add_parser("sample", help="reference MD with GFN2-xTB to make a training set",
                        description="Langevin MD with GFN2-xTB (ASE + tblite), independent trajectories in parallel; "
                                    "every --every-th step becomes a labelled frame. Rerunning resumes (OUT.parts/), "
                                    "also with a larger --ps; other settings or a changed structure file are refused, "
                                    "by name.")
    sp.add_argument("structure")
    sp.add_argument("--out", required=True, help="output .npz (rMD17 format; an existing file no sampling made is "
                                                "refused unless --overwrite)")
    sp.add_argument("--overwrite", action="store_true",
                    help="start afresh: replace --out and any earlier sampling of it (OUT.parts/)")
    sp.add_argument("--ps", type=float, required=True, help="simulated time per trajectory (ps)")
    sp.add_argument("--temperature", type=float, default=500.0, help="K")
    sp.add_argument("--timestep", type=float, default=0.5, help="fs")
    sp.add_argument("--every", type=int, default=10, help="steps between saved frames")
    sp.add_argument("--friction", type=float, default=0.01, help="1/fs")
    sp.add_argument("--trajectories", type=int, default=0,
                    help="independent runs (default: one per core; resuming: the run's own number)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--method", default="GFN2-xTB")
    sp.add_argument("--charge", type=int, default=0)
    sp.set_defaults(func=_sample)

    im = sub.add_parser("import-schnetpack", help="convert a schnetpack 2.x SchNet into a schnet-md model file",
                        description="Read a schnetpack model file (a pickled NeuralNetworkPotential such as "
                                    "best_model; needs schnetpack installed, and unpickling runs code from the file: "
                                    "use trusted files only) and write a schnet-md model file (data only).")
    im.add_argument("model", help="schnetpack model file")
    im.add_argument("--elements", nargs="+", required=True, help="elements the model was trained on, e.g. H C N O")
    im.add_argument("--energy-unit", default="eV", help="the energy unit the model was trained in (default eV)")
    im.add_argument("--length-unit", default="Angstrom", help="its length unit (default Angstrom)")
    im.add_argument("--out", required=True)
    im.set_defaults(func=_import_schnetpack)

    b = sub.add_parser("bench", help="MD steps/s, ns/day, model-only time and peak memory",
                       description="Time the model (forward+backward) and OpenMM MD with it. Targets: names in "
                                   "systems/, structure files, or water:N for a water box of about N atoms.")
    b.add_argument("targets", nargs="+")
    b.add_argument("--model", help="model file or shipped name (default: random weights of --preset)")
    b.add_argument("--preset", default="schnet2017", choices=["schnet2017", "schnet2018"])
    b.add_argument("--cutoff", type=float, default=5.0, help="cosine cutoff given to schnet2017 in periodic boxes (Å)")
    b.add_argument("--platform", default="CPU", choices=["CUDA", "OpenCL", "CPU", "Reference"])
    b.add_argument("--steps", type=int, default=200)
    b.add_argument("--repeats", type=int, default=50)
    b.add_argument("--cuda-graphs", action="store_true", help="openmm-torch CUDA graphs (graph-safe export)")
    b.add_argument("--neighbor-list", default="auto", choices=["auto", "all_pairs", "cells"])
    b.add_argument("--tabulate", action="store_true", help="filters from spline tables (schnet_md.tabulated)")
    b.add_argument("--threads", type=int, help="torch CPU threads")
    b.add_argument("--json", help="also write the results here (an existing file is refused before any work, unless "
                                  "--overwrite)")
    b.add_argument("--overwrite", action="store_true", help="replace the --json file if it exists")
    b.set_defaults(func=_bench)

    ck = sub.add_parser("check", help="robustness checks before production MD (minimisation, bond and molecule "
                                      "scans, hot MD); exit 2 if any fails",
                        description="Minimise, stretch every bond (0.9-2.5x) and the whole molecule (1-2x), and run "
                                    "Langevin MD at 300 K and --temperature with the blow-up guard. Prints a verdict; "
                                    "exit status 0 passed, 2 failed.")
    ck.add_argument("model", help=f"model file or shipped model name ({SHIPPED})")
    ck.add_argument("structure", help="PDB, PDBx/mmCIF or XYZ file of the molecule")
    ck.add_argument("--temperature", type=float, default=500.0, help="K, the hot MD check (300 K always runs)")
    ck.add_argument("--steps", type=int, default=2000, help="MD steps per temperature (0.5 fs)")
    ck.add_argument("--platform", default="CPU", choices=["CUDA", "OpenCL", "CPU", "Reference"])
    ck.add_argument("--seed", type=int, default=1)
    ck.add_argument("--threads", type=int, help="torch threads")
    ck.add_argument("--json", help="write the full report (every scan energy) here (an existing file is refused "
                                   "before any check runs, unless --overwrite)")
    ck.add_argument("--overwrite", action="store_true", help="replace the --json file if it exists")
    ck.set_defaults(func=_check)

    rf = sub.add_parser("refine", help="make a model robust: check, committee MD, label what it gets wrong, "
                                       "fine-tune, repeat",
                        description="Rounds of: schnet-md check; a committee of fine-tuned copies runs MD at the target "
                                    "temperatures; the frames where it disagrees most and the geometries the failed "
                                    "checks visited are labelled with the reference method (GFN2-xTB, or PBE/def2-SVP in "
                                    "PySCF for rMD17-trained models) and added to the training data; "
                                    "the model is fine-tuned. Stops when the check passes (exit 0) or after --rounds "
                                    "(exit 2). Resumable; OUT/rounds.json records every round, and the model, "
                                    "settings and input files it started with: a resume that would change one is "
                                    "refused, naming it.")
    rf.add_argument("model", help=f"model file or shipped model name ({SHIPPED})")
    rf.add_argument("structure", nargs="+", help="the molecule(s) to make it robust for (a round passes when "
                                                 "every one passes the check)")
    rf.add_argument("--data", required=True, help="the model's training data (its labels' method must be --method's)")
    rf.add_argument("--format", choices=["auto", "rmd17", "iso17x", "qm9", "ase"], default="auto")
    rf.add_argument("--labels", choices=["new", "old"], default="new")
    rf.add_argument("--split", default="train", help="iso17x split of --data")
    rf.add_argument("--max-frames", type=int, help="fine-tune on N evenly spaced frames of --data (for large sets "
                                                    "such as iso17x: every isomer stays in)")
    rf.add_argument("--validation-data", help="the model's validation set: each round's best epoch is chosen on it "
                                              "(default: 5%% of --data)")
    rf.add_argument("--validation-split", default="validation", help="iso17x split of --validation-data")
    rf.add_argument("--test", help="a test set: errors before and after each round go to rounds.json")
    rf.add_argument("--test-frames", type=int, help="evaluate N evenly spaced frames of each test set (default: all)")
    rf.add_argument("--test-split", nargs="+", default=["test_within"],
                    help="iso17x split(s) of --test (e.g. test_within test_other)")
    rf.add_argument("--out", required=True)
    rf.add_argument("--method", default="GFN2-xTB",
                    help="reference method for new labels: GFN2-xTB (tblite) or PBE/def2-SVP (PySCF; rMD17's level)")
    rf.add_argument("--temperatures", type=float, nargs="+", default=[300.0, 500.0], help="K")
    rf.add_argument("--md-steps", type=int, default=2000)
    rf.add_argument("--members", type=int, default=3)
    rf.add_argument("--member-epochs", type=int, default=3)
    rf.add_argument("--frames", type=int, default=40, help="committee-MD frames labelled per round, shared by the "
                                                          "structures (the failed checks' geometries come on top)")
    rf.add_argument("--epochs", type=int, default=250, help="fine-tuning epochs per round (best epoch chosen on "
                                                           "held-out original data)")
    rf.add_argument("--learning-rate", type=float, default=1e-4, help="start of each round's fine-tuning")
    rf.add_argument("--frames-per-epoch", type=int, default=0,
                    help="each fine-tuning epoch draws N frames afresh from --data and the new labels (large sets "
                         "such as iso17x: short epochs that keep seeing all of the data; default: all, every epoch)")
    rf.add_argument("--rounds", type=int, default=3, help="may be raised when resuming")
    rf.add_argument("--polish-epochs", type=int, default=0,
                    help="once the rounds are done, continue the last round's fine-tuning this many more epochs")
    rf.add_argument("--label-weight", type=float, default=1.0,
                    help="the new frames' loss weights times this: with --frames-per-epoch on a large set, as if drawn "
                         "this many times their share")
    rf.add_argument("--check-steps", type=int, default=2000)
    rf.add_argument("--from-runs", nargs="+", metavar="RUN_DIR",
                    help="simulate runs (e.g. ones the blow-up guard stopped): the last 20 frames of each are labelled "
                         "in the next round, each run once; a hydrogen such a run was moving onto another atom also "
                         "gets frames along that transfer's relaxed path (GFN2-xTB umbrella MD)")
    rf.add_argument("--no-transfer-paths", dest="transfer_paths", action="store_false",
                    help="label only the runs' last frames, not the relaxed paths of their hydrogen transfers")
    rf.add_argument("--previous-labels", nargs="+", metavar="LABELS_NPZ",
                    help="labels.npz files of an earlier refinement (same --method): trained on in every round with "
                         "the new ones, so refining a refined model again does not forget them")
    rf.add_argument("--seed", type=int, default=1)
    rf.add_argument("--threads", type=int)
    rf.set_defaults(func=_refine)

    d = sub.add_parser("doctor", help="check that this installation runs SchNet in OpenMM (versions, platforms, "
                                      "export, serialisation)",
                       description="Print the versions of torch, OpenMM, openmm-torch, openmm-ml and mdtraj, the OpenMM "
                                   "platforms and plugin load failures and whether CUDA is visible; then, in child "
                                   "processes (a crash is reported, not suffered), export a small SchNet to a TorchForce "
                                   "and compute energies on each platform, round-trip the System through XmlSerializer "
                                   "and nest the force in a CustomCVForce. Exits 1 naming what is broken.")
    d.add_argument("--platform", action="append", help="check only this platform (repeatable; default: all)")
    d.set_defaults(func=_doctor)
    for parser in sub.choices.values():
        parser.formatter_class = DefaultsHelpFormatter
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        with warnings.catch_warnings():     # a warning is one line, like an error (not a source line too)
            warnings.showwarning = lambda message, *_, **__: print(f"schnet-md {args.command}: warning: {message}",
                                                                   file=sys.stderr)
            return args.func(args)
    except (ValueError, RuntimeError, OSError) as err:   # OSError: missing, read-only or full files and folders
        print(f"schnet-md {args.command}: error: {err}", file=sys.stderr)
        return 1
    except RunInterrupted as stop:           # SIGTERM or SIGINT, after a checkpoint
        print(f"schnet-md {args.command}: {stop}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print(f"schnet-md {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if type(err).__name__ == "OpenMMException":   # openmm's own errors: a clear line, not a traceback
            print(f"schnet-md {args.command}: error (OpenMM): {str(err).strip()}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
