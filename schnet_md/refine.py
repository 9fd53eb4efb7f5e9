"""`schnet-md refine`: the loop that makes a model robust where MD and minimisers take it (issue #15).

Each round, for every structure given:
  1. `check` the current model (minimisation, bond and molecule scans, hot MD); a round where every
     structure passes ends the loop;
  2. a committee: the current model fine-tuned a few epochs with different seeds (`members`);
  3. candidate frames: Langevin MD with the committee at each target temperature (frames up to where the
     blow-up guard stopped a run included), plus the geometries the failed checks visited: every failing
     bond stretched over the scan's range, the stretched molecule; plus the last frames of any `simulate` runs
     the user gives (`--from-runs`: production runs the blow-up guard stopped, labelled once) and, where such a
     run was moving a hydrogen onto another atom, frames along that transfer's path: umbrella windows walked
     in GFN2-xTB MD (the reference's relaxed path, `reference.sample_transfer`, once) and by the current model
     (its own way across, `model_transfer_frames`, every round: iso17x's went 20 kcal/mol downhill where GFN2-xTB
     climbs 65, and once taught the reference's path it found another low one);
  4. the failed checks' geometries, and the MD frames where the committee disagrees most (sigma_F), are
     labelled with the reference method (GFN2-xTB through tblite, or PBE/def2-SVP through PySCF). Another
     program's energies differ from the data's by a constant (PySCF vs rMD17's ORCA), so a few frames of the
     data with the structure's composition are labelled too, and the mean difference is taken off;
  5. the current model is fine-tuned on the original data plus every frame labelled so far. Labelled frames
     far from the data get a smaller loss weight, 1/k^2 for a frame k times further out than the data's band
     (RMS force 2x the data's, energy 3 standard deviations from its mean), so their errors count relative to
     their size: the model must
     learn their shape (a stretched bond costs energy), not spend its capacity fitting them to the data's
     accuracy (unweighted, they wrecked the test errors). Frames more than 10x beyond the band are not trained on
     at all. `frames_per_epoch` makes short epochs over a large data set, `label_weight` counts the new frames
     more than their share. The epoch kept is chosen on a held-out part of the ORIGINAL data, so accuracy where
     the model was already good is what guards it: the latest epoch within 2 % of the best validation loss (of
     equally good epochs, the one that learned the new frames longest);
  6. errors on the original test set before and after, on the new labels, and the frames added go to
     OUT/rounds.json.
Rounds are resumable: a finished round is skipped, labelling resumes chunk by chunk. One process at a time
refines into OUT (its lock). OUT/rounds.json records, when the refinement starts, the model's SHA-256, the settings,
and the files it reads (structures, data, validation and test sets, previous labels: path, size, SHA-256) with the
SHA-256 of the frames selected from them; a resume that would change any of them is refused, naming it.
Every file is written whole or not at all, and each round's work lands in its own files before rounds.json
records the round (checks.json, frames.npz, labels, the fine-tuned model, then the round in rounds.json), so
a kill at any point resumes from the last file written.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np

from .check import CheckSettings, check
from .reference import (TRANSFER_END, TRANSFER_EQUILIBRATE, TRANSFER_EVERY, TRANSFER_K, TRANSFER_STEPS,
                        TRANSFER_WINDOW, transfer_windows)
from .runs import (arrays_sha256, atomic_write, exclusive, input_record, new_run_id, read_json, require_inputs,
                   require_settings, write_json)

STRETCH_FACTORS = (1.15, 1.3, 1.5, 1.8, 2.1, 2.5)     # bond lengths labelled along a failing scan (0.9-2.5x)
MOLECULE_SCALES = (1.05, 1.1, 1.2, 1.4, 1.7, 2.0)     # the molecule scan's range (1-2x)
MINIMISER_PATH = (0.1, 0.25, 0.5, 0.75, 1.0)          # from the start to where a failed minimisation ended
FORCE_BAND, ENERGY_BAND = 2.0, 3.0                   # frames inside these bands count fully (frame_weights)
RUN_FRAMES = 20             # frames labelled from the end of each run given to refine (a blow-up's lead-up)
LEARNABLE_WEIGHT = 0.01     # frames more than 10x beyond the band are labelled and kept, but not trained on (learnable_frames)
TEST_TOLERANCE = 1.02                                 # "not worse": within 2 % of the errors before
KEEP_WITHIN = 0.02          # a fine-tuning keeps its latest epoch within 2 % of the best validation loss (~1 % RMSE)
WARMUP_STEPS = 250          # a fine-tuning's learning rate ramps up over this many steps: a fresh Adam at full rate
                            # knocked iso17x's validation forces 0.0759 -> 0.0770 eV/Å in one epoch; ramped, 0.0759


@dataclass
class RefineSettings:
    method: str = "GFN2-xTB"
    temperatures: List[float] = field(default_factory=lambda: [300.0, 500.0])
    md_steps: int = 2000              # committee MD per temperature, structure and round (0.5 fs)
    members: int = 3                  # committee size for choosing frames
    member_epochs: int = 3            # fine-tuning epochs that make each member
    frames_per_round: int = 40        # committee-MD frames labelled per round (failed-check geometries come on top)
    epochs: int = 250                 # fine-tuning epochs of the refined model, each round (lr halves after 25 flat)
    learning_rate: float = 1e-4       # start of the refined model's fine-tuning (halved on plateaus, to 1e-6)
    frames_per_epoch: int = 0         # > 0: each fine-tuning epoch draws this many frames afresh from the original
                                      # and new ones, each at its share: short epochs over a large data set
    label_weight: float = 1.0         # new frames' loss weights x this: with frames_per_epoch, as if drawn this many
                                      # times their share (a few hundred frames among 78k are otherwise barely seen)
    transfer_paths: bool = True       # a hydrogen a --from-runs run moved onto another atom: label that transfer's
                                      # paths too (the reference's, once; the current model's, every round)
    member_learning_rate: float = 2e-4
    rounds: int = 3
    check_steps: int = 2000
    seed: int = 1
    platform: str = "CPU"


COMMITTEE_RECIPE = {"batch_size": 16, "ema_decay": 0.99}   # members: a few quick epochs that move apart


def fine_tuning_recipe(metadata: dict) -> dict:
    """Batch size and EMA decay of a fine-tuning: the base model's own (from its training record), so the
    fine-tuning continues the optimisation the model came from. Another recipe costs accuracy at once: iso17x's
    model (batch 32, EMA 0.999; validation force MAE 0.0744 eV/Å) fine-tuned at lr 1e-4 with batch 16 and EMA 0.99
    was at 0.0821 after one epoch, with its own recipe at 0.0752. Models without a record get 16 and 0.99 (the
    rMD17 protocol)."""
    recorded = metadata.get("training", {}).get("settings", {})
    ema = recorded.get("ema_decay") or 0.0
    return {"batch_size": int(recorded.get("batch_size") or 16), "ema_decay": float(ema) if ema > 0 else 0.99}


def fine_tuning_schedule(epochs: int, settings: "RefineSettings", warmup_steps: int = WARMUP_STEPS) -> dict:
    """A round's fine-tuning schedule (TrainSettings fields besides the recipe): lr halved after 25 epochs without
    improvement down to 1e-6, ramped up first, and the latest epoch within KEEP_WITHIN of the best kept."""
    return dict(epochs=epochs, seed=settings.seed, learning_rate=settings.learning_rate, lr_patience=25,
                min_learning_rate=1e-6, frames_per_epoch=settings.frames_per_epoch, keep_within=KEEP_WITHIN,
                warmup_steps=warmup_steps)


def _train(model_path, data, out: Path, log, validation=None, recipe=None, **settings) -> Path:
    from .modelfile import ModelFileError, load_model
    from .train import TrainSettings, train

    if (out / "model.pt").is_file() and (out / "metrics.json").is_file():
        return out / "model.pt"
    base, metadata = load_model(model_path)
    schedule = TrainSettings(**(recipe or fine_tuning_recipe(metadata)), **settings)
    if (out / "checkpoint.pt").is_file():   # an interrupted fine-tuning goes on after its last finished epoch
        try:
            train(data, base.config, out, schedule, resume=True, log=log, validation=validation)
            return out / "model.pt"
        except ModelFileError as error:     # damaged, or from other settings: start over
            log(f"fine-tuning in {out} starts over: {error}")
        except ValueError:
            # killed after its last epoch's checkpoint, before metrics.json: it is done (train refuses to resume it)
            if _checkpoint_epochs(out) < schedule.epochs:
                raise
            return out / "model.pt"
    if out.exists():
        shutil.rmtree(out)
    train(data, base.config, out, schedule, log=log, init_state=base.state_dict(), validation=validation)
    return out / "model.pt"


def _checkpoint_epochs(out: Path) -> int:
    """Epochs a training's checkpoint.pt has finished (train.py keeps the last one's 0-based number as 'epoch')."""
    from .train import read_checkpoint

    return int(read_checkpoint(out / "checkpoint.pt")["epoch"]) + 1


def frame_weights(labelled, rms_force: float, energy_spread: dict) -> np.ndarray:
    """Loss weight of each new frame: errors count relative to how far the frame lies from the data. Frames
    like the data's (RMS force within 2x the data's, energy within 3 standard deviations of the data's mean for
    the formula) weigh 1; beyond, a frame k times further out weighs 1/k^2. Energies: the data's zero and unit."""
    from .elements import formula

    f = labelled.forces.reshape(-1, 3)
    rms = np.sqrt(np.add.reduceat((f ** 2).sum(axis=1), labelled.offsets[:-1]) / (3 * labelled.n_atoms))
    weights = np.minimum(1.0, (FORCE_BAND * rms_force / np.maximum(rms, 1e-12)) ** 2)
    for k in range(len(labelled)):
        mean, std = energy_spread[formula(labelled.frame(k)[0])]
        weights[k] = min(weights[k], (ENERGY_BAND * std / max(abs(labelled.energies[k] - mean), 1e-12)) ** 2)
    return weights


def learnable_frames(weighted, label_weight: float = 1.0):
    """The frames of `weighted` (new labels carrying their frame_weights) that a fine-tuning trains on, their
    weights times `label_weight`. Frames far beyond the data (a bond stretched 2.5x) are left out: the model is
    wrong there by hundreds of times its usual error, so even at weight 1/k^2 a few dozen of them made ~40 % of
    iso17x's loss and pulled the fit away from the data, while MD never goes there."""
    learnable = weighted.subset(np.flatnonzero(weighted.weights >= LEARNABLE_WEIGHT))
    return learnable.weighted(label_weight * learnable.weights)


def energy_spread(data) -> dict:
    """{formula: (mean, standard deviation)} of the data's energies."""
    from .elements import formula

    groups: dict = {}
    for k in range(len(data)):
        groups.setdefault(formula(data.frame(k)[0]), []).append(data.energies[k])
    return {key: (float(np.mean(e)), float(np.std(e)) or 1.0) for key, e in groups.items()}


def _md_frames(members: List[str], structure_path, temperature: float, steps: int, platform: str, seed: int,
               folder: Path) -> np.ndarray:
    """Å frames of committee MD (every 10 steps), also those written before a blow-up stopped it."""
    from .analysis.load import read_trajectory
    from .simulate import SimulationError, SimulationSettings, run_simulation

    run = folder / f"md_{temperature:g}K"
    if run.exists():
        shutil.rmtree(run)
    settings = SimulationSettings(steps=steps, temperature_k=temperature, report_interval=10, platform=platform,
                                  seed=seed, checkpoint_interval=max(steps, 1), disagreement_warn=0.0)
    try:
        run_simulation(structure_path, ",".join(members), run, settings, progress=False)
    except SimulationError:
        pass                                  # the frames before the failure are the interesting ones
    if not (run / "trajectory.dcd").is_file() or (run / "trajectory.dcd").stat().st_size == 0:
        return np.zeros((0, 0, 3))
    return read_trajectory(run / "trajectory.dcd", run / "topology.pdb").xyz.astype(np.float64) * 10.0


def model_transfer_frames(model, structure, hydrogen: int, donor: int, acceptor: int, temperature: float,
                          seed: int, walks: int = 2, equilibrate: int = TRANSFER_EQUILIBRATE,
                          steps: int = TRANSFER_STEPS, every: int = TRANSFER_EVERY, platform: str = "CPU",
                          xi_end: float = TRANSFER_END, window: float = TRANSFER_WINDOW) -> np.ndarray:
    """Å frames along the MODEL's own path of a hydrogen transfer: the umbrella windows of
    `reference.sample_transfer`, walked by Langevin MD on `model` in OpenMM (a CustomCompoundBondForce holds xi).
    The reference's relaxed path shows where the barrier is; this shows where the model goes instead (its
    lowest way across need not be the reference's), and labelled it teaches the model its own mistake."""
    import openmm
    from openmm import unit

    from .export import create_torch_force
    from .simulate import particle_system
    from .units import energy_factor

    start = structure.positions_nm * 10.0
    windows = transfer_windows(start, hydrogen, donor, acceptor, xi_end, window)
    k = TRANSFER_K * energy_factor("kcal/mol", "kJ/mol") * 100.0          # kcal/mol/Å^2 -> kJ/mol/nm^2
    frames = []
    for walk in range(walks):
        system = particle_system(structure.topology)
        system.addForce(create_torch_force(model, structure.topology))
        bias = openmm.CustomCompoundBondForce(3, "0.5*k_xi*(distance(p1,p2) - distance(p1,p3) - xi0)^2")
        bias.addGlobalParameter("k_xi", k)
        bias.addGlobalParameter("xi0", 0.0)
        bias.addBond([hydrogen, donor, acceptor], [])
        system.addForce(bias)
        integrator = openmm.LangevinMiddleIntegrator(temperature * unit.kelvin, 10.0 / unit.picosecond,
                                                     0.5 * unit.femtosecond)
        integrator.setRandomNumberSeed(seed + walk + 1)
        context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName(platform))
        context.setPositions(structure.positions_nm)
        context.setVelocitiesToTemperature(temperature * unit.kelvin, seed + walk + 1)
        for xi0 in windows:
            context.setParameter("xi0", float(xi0) / 10.0)
            integrator.step(equilibrate)
            for _ in range(steps // every):
                integrator.step(every)
                r = context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.angstrom)
                if not np.isfinite(r).all():      # the model blew up: what came before is kept
                    break
                frames.append(np.array(r))
            else:
                continue
            break
    return np.array(frames).reshape(-1, structure.n_atoms, 3)


def _run_frames(run_dir) -> tuple:
    """(atomic numbers, Å frames): the last RUN_FRAMES frames of a `simulate` run (its trajectory.dcd and
    topology.pdb), e.g. one the blow-up guard stopped: the frames leading up to where the model went wrong."""
    from .analysis.load import read_trajectory

    run = Path(run_dir)
    missing = [name for name in ("trajectory.dcd", "topology.pdb") if not (run / name).is_file()]
    if missing:
        raise ValueError(f"{run} is not a simulate run folder: {', '.join(missing)} missing")
    try:
        traj = read_trajectory(run / "trajectory.dcd", run / "topology.pdb")
    except Exception as err:                # mdtraj raises many kinds on a bad file
        raise ValueError(f"cannot read the trajectory of {run}: {err}") from None
    if traj.n_frames == 0:
        raise ValueError(f"{run} holds no frames")
    z = np.array([atom.element.atomic_number for atom in traj.topology.atoms])
    return z, traj.xyz[-RUN_FRAMES:].astype(np.float64) * 10.0


def _transfer_every(method: str) -> int:
    """MD steps between the frames a transfer path gives: 10 per window and walk for GFN2-xTB (~7 ms a label),
    2 for DFT (seconds to minutes a label; 52 frames a path)."""
    from .reference import DFT_METHODS

    return 100 if method in DFT_METHODS else TRANSFER_EVERY


def _run_start(run_dir):
    """The start of a `simulate` run (its topology.pdb: the structure after --minimize, with its bonds)."""
    from .structures import read_structure

    return read_structure(Path(run_dir) / "topology.pdb")


def _run_transfers(start, z, frames) -> List[tuple]:
    """[(hydrogen, donor, acceptor)]: the hydrogen transfers under way in the last of a run's `frames` (Å),
    judged against the bonds of its `start`."""
    from .reference import hydrogen_transfers

    return hydrogen_transfers(z, [(b[0].index, b[1].index) for b in start.topology.bonds()], frames[-1])


def _read_labels(path):
    """A labels.npz an earlier refinement wrote (rMD17 keys), read or refused with the reason."""
    from .data import read_rmd17

    if not Path(path).is_file():
        raise ValueError(f"previous labels {path}: no such file")
    try:
        labels = read_rmd17(path)
    except Exception as err:                # numpy and the reader raise many kinds on a bad file
        raise ValueError(f"previous labels {path}: not a labels file ({err})") from None
    if not len(labels):
        raise ValueError(f"previous labels {path} hold no frames")
    return labels


def _check_geometries(report: dict, structure) -> np.ndarray:
    """Å geometries the failed checks went to: failing bonds stretched over the scan's range, the stretched
    molecule, and the straight path from the start to where a failed minimisation ended."""
    from .structures import BondMap

    r = structure.positions_nm * 10.0
    frames = []
    if not report["bond_scans"]["passed"]:
        bonds = BondMap(structure.topology)
        degree = np.bincount(bonds.bonds.ravel(), minlength=len(r))
        for (i, j), row in zip(bonds.bonds.tolist(), report["bond_scans"]["bonds"]):
            if row["largest_fall_kcal_mol"] <= 1.0 and row["lowest_below_relaxed_kcal_mol"] <= 1.0:
                continue
            a, b = (i, j) if degree[j] <= degree[i] else (j, i)     # the end the scan moves
            for f in STRETCH_FACTORS:
                x = r.copy()
                x[b] = r[a] + f * (r[b] - r[a])
                frames.append(x)
    if not report["molecule_scan"]["passed"] or not report["minimisation"]["passed"]:
        centre = r.mean(axis=0)
        frames += [centre + s * (r - centre) for s in MOLECULE_SCALES]
    if not report["minimisation"]["passed"] and "relaxed_positions_angstrom" in report["minimisation"]:
        end = np.asarray(report["minimisation"]["relaxed_positions_angstrom"])   # the minimiser's path, roughly
        frames += [r + t * (end - r) for t in MINIMISER_PATH]
    return np.array(frames).reshape(-1, len(r), 3)


def _energy_offset(data, numbers, method: str, folder: Path, n: int = 3) -> dict:
    """Mean (E_method - E_data) over `n` data frames with the same composition as `numbers`, in the data's
    energy unit: the constant that puts new labels on the data's energy zero."""
    from .data import read_rmd17
    from .reference import label_frames

    composition = np.bincount(numbers, minlength=119)
    same = [k for k in range(len(data)) if np.array_equal(
        np.bincount(data.frame(k)[0], minlength=119), composition)]
    if not same:
        raise ValueError("the data hold no frame with the structure's composition, so new labels cannot be put on "
                         "its energy zero; add such frames or refine with structures the data know")
    picks = sorted({same[i] for i in np.linspace(0, len(same) - 1, min(n, len(same))).round().astype(int)})
    differences = []
    by_order: dict = {}                              # one label job per atom order (usually one)
    for k in picks:
        by_order.setdefault(tuple(data.frame(k)[0].tolist()), []).append(k)
    for i, (order, ks) in enumerate(by_order.items()):
        labels = label_frames(np.array(order), np.array([data.frame(k)[1] for k in ks]), folder / f"offset{i}.npz",
                              method=method)
        done = read_rmd17(labels).converted(data.energy_unit)
        frame_of = dict(zip(np.load(labels)["old_indices"].tolist(), done.energies.tolist()))
        differences += [frame_of[m] - data.energies[k] for m, k in enumerate(ks) if m in frame_of]
    if not differences:
        raise RuntimeError(f"{method} failed on every frame meant to align its energy zero with the data's")
    diff = np.array(differences)
    return {"frames": picks, "offset": float(diff.mean()), "spread": float(np.ptp(diff)), "unit": data.energy_unit}


def _summary(report: dict) -> dict:
    return {"passed": report["passed"]} | {key: report[key]["passed"] for key in
                                           ("minimisation", "bond_scans", "molecule_scan")} | \
        {"md": [m["passed"] for m in report["md"]]}


def _evaluate_round(entry: dict, before, after, new, tests, log) -> None:
    """Errors of the models before and after a round on its new labels and on the test sets, into `entry`."""
    from .evaluate import evaluate
    from .modelfile import load_model

    k = entry["round"]
    before, after = load_model(before)[0], load_model(after)[0]
    entry["labelled_before"] = evaluate(before, new)
    entry["labelled_after"] = evaluate(after, new)
    if tests:
        entry["test"] = {t.source: {"before": evaluate(before, t), "after": evaluate(after, t)} for t in tests}
        entry["test_not_worse"] = bool(all(m["after"][q] <= TEST_TOLERANCE * m["before"][q]
                                           for m in entry["test"].values()
                                           for q in ("energy_mae_kcal_mol", "forces_mae_kcal_mol")))
        for name, m in entry["test"].items():
            log(f"round {k}: {name}: energy MAE {m['before']['energy_mae_kcal_mol']:.3f} -> "
                f"{m['after']['energy_mae_kcal_mol']:.3f} kcal/mol, forces MAE "
                f"{m['before']['forces_mae_kcal_mol']:.3f} -> {m['after']['forces_mae_kcal_mol']:.3f} kcal/mol/Å")
        if not entry["test_not_worse"]:
            log(f"round {k}: warning: test errors got worse (more than {100 * (TEST_TOLERANCE - 1):.0f} %)")


def _data_sets(data, validation, tests, files: dict) -> dict:
    """What a refinement trains, validates and tests on: each set's file (absolute path, None for sets handed over
    in memory) and the SHA-256 of its frames as selected (another --split, --labels or --max-frames gives others)."""
    def frames(d):
        return arrays_sha256(d.atomic_numbers.astype(np.int64), d.offsets, d.positions, d.energies,
                             *([] if d.forces is None else [d.forces]))

    def path(role):
        return str(Path(files[role]).resolve()) if files.get(role) else None

    return {"data_file": path("data"), "data_frames_sha256": frames(data),
            "validation_file": path("validation"),
            "validation_frames_sha256": None if validation is None else frames(validation),
            "test_file": path("test"), "test_frames_sha256": [frames(t) for t in tests]}


def refine(model, structures: Sequence, data, out_dir, settings: Optional[RefineSettings] = None, test=None,
           log: Callable[[str], None] = print, validation=None, polish_epochs: int = 0, runs: Sequence = (),
           previous_labels: Sequence = (), data_files: Optional[dict] = None) -> dict:
    """Run refinement rounds until `check` passes on every structure or `settings.rounds` are done; returns
    the record (also OUT/rounds.json). `validation`: the model's own validation set (else 5 % of `data`);
    `test`: one test set or a list (errors before and after each round). `polish_epochs`: once the rounds
    are done, the last round's fine-tuning goes on for this many more epochs (its errors are re-evaluated).
    `runs`: folders of `simulate` runs (say, production runs the blow-up guard stopped) whose last RUN_FRAMES
    frames are labelled in the next round that runs, each run once. `previous_labels`: labels.npz files of an
    earlier refinement (in `settings.method`), trained on in every round with the new labels, so that refining a
    refined model again does not forget what it learned. `data_files`: {"data", "validation", "test"}, the files
    `data`, `validation` and `test` were read from, recorded with the structures and previous labels. The whole
    refinement holds OUT's lock."""
    with exclusive(out_dir, "refine", file=False):
        return _refine(model, structures, data, out_dir, settings, test, log, validation, polish_epochs, runs,
                       previous_labels, data_files or {})


def _refine(model, structures, data, out_dir, settings, test, log, validation, polish_epochs, runs, previous_labels,
            data_files) -> dict:
    from .committee import ForceDisagreement
    from .data import concatenate, file_sha256, read_rmd17
    from .elements import formula
    from .modelfile import resolve_model_path
    from .reference import label_frames, sample_transfer
    from .structures import read_structure
    from .train import split_indices

    settings = settings or RefineSettings()
    if not settings.label_weight > 0 or settings.frames_per_epoch < 0:
        raise ValueError(f"label_weight must be > 0 (got {settings.label_weight}) and frames_per_epoch >= 0 (got "
                         f"{settings.frames_per_epoch})")
    tests = [] if test is None else (list(test) if isinstance(test, (list, tuple)) else [test])
    # the model's labels (its energy zero) must be the data's: fine-tuning across them learns the offset
    from .evaluate import check_labels
    from .modelfile import load_model, trained_labels

    trained_on = trained_labels(load_model(model)[1])
    for labelled in [data, validation, *tests]:
        if labelled is not None:
            check_labels(model, trained_on, labelled, log=lambda _note: None)   # (a mismatch raises)
    structures = [str(s) for s in ([structures] if isinstance(structures, (str, Path)) else structures)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record_path = out / "rounds.json"
    if record_path.is_file():
        record = read_json(record_path, "refinement record")
        require_inputs(record.get("inputs", []), out, new_run="another --out")     # names the file that changed
    else:
        record = {"model": str(model), "structures": structures, "data": data.source,
                  "validation": validation.source if validation is not None else "5 % of the data",
                  "settings": asdict(settings), "rounds": [],
                  "previous_labels": [str(Path(p).resolve()) for p in previous_labels]}
    # what the refinement reads is recorded when it starts (records written before this guard get it now)
    data_sets = _data_sets(data, validation, tests, data_files)
    record.setdefault("data_sets", data_sets)
    base_sha = file_sha256(resolve_model_path(model))       # a shipped name may later name another file
    known_sha = "model_sha256" in record                    # (records written before this guard lack it)
    record.setdefault("model_sha256", base_sha)
    if record["model_sha256"] != base_sha:
        raise ValueError(f"{out} refines another file than {model} is now (SHA-256 {record['model_sha256'][:16]}…, "
                         f"now {base_sha[:16]}…); pass the model file the refinement started from")
    # (more rounds may be asked for; a setting added since a record was written has its default there)
    same = lambda a: {k: v for k, v in (asdict(RefineSettings()) | a).items() if k != "rounds"}  # noqa: E731
    # the same bytes under another name (the file a shipped name used to point to) are the same model
    if record["model"] != str(model) and not known_sha:
        raise ValueError(f"{out} holds a refinement of {record['model']}, not of {model}; use another --out")
    require_settings(same(record["settings"]) | {"structures": record.get("structures")} | record["data_sets"],
                     same(asdict(settings)) | {"structures": structures} | data_sets, out, new_run="another --out")
    if sorted(record.get("previous_labels", [])) != sorted(str(Path(p).resolve()) for p in previous_labels):
        raise ValueError(f"{out} was started with other previous labels ({len(record.get('previous_labels', []))} "
                         "file(s)); pass the same ones or use another --out")
    molecules = {path: read_structure(path) for path in structures}
    from_runs = {str(Path(r).resolve()): _run_frames(r) for r in runs}      # read first: a bad folder fails early
    previous = [_read_labels(p) for p in previous_labels]
    record.setdefault("run_id", new_run_id())
    record.setdefault("inputs", [input_record(p) for p in [*structures, *previous_labels,
                                                           *(p for p in data_files.values() if p)]])
    write_json(record_path, record)
    check_settings = CheckSettings(temperature_k=max(settings.temperatures), md_steps=settings.check_steps,
                                   platform=settings.platform, seed=settings.seed)
    # the held-out original frames that choose each fine-tuning's best epoch, and the force scale of the data
    if validation is None:
        train_idx, val_idx = split_indices(len(data), 0.05, settings.seed)
        original_train, original_val = data.subset(train_idx), data.subset(val_idx)
    else:
        original_train, original_val = data, validation.converted(data.energy_unit)
    rms_force = float(np.sqrt(np.mean(data.forces ** 2)))
    spread = energy_spread(data)
    offsets = record.setdefault("energy_offsets", {})
    for z in [m.atomic_numbers for m in molecules.values()] + [z for z, _ in from_runs.values()] + \
            [d.frame(0)[0] for d in previous]:
        name = formula(z)                          # the reference's energy zero against the data's, per formula
        if name not in offsets:
            log(f"aligning {settings.method} energies with the data's on {name}")
            offsets[name] = _energy_offset(data, z, settings.method, out / "offset" / name)
            write_json(record_path, record)

    def on_data_zero(labels):
        d = (read_rmd17(labels) if isinstance(labels, (str, Path)) else labels).converted(data.energy_unit)
        return replace(d, energies=d.energies - offsets[formula(d.frame(0)[0])]["offset"])

    def training_set():
        """(every label so far, weighted; the original training frames plus the learnable ones) for fine-tuning."""
        new = concatenate(labelled, source=f"{len(labelled)} refinement label set(s)")
        new = new.weighted(frame_weights(new, rms_force, spread))
        return new, concatenate([original_train, learnable_frames(new, settings.label_weight)],
                                source=f"{data.source} + {new.source}")

    current = str(model) if not record["rounds"] else record["rounds"][-1]["model"]
    labelled = [on_data_zero(d) for d in previous] + [on_data_zero(p) for r in record["rounds"] for p in r["labels"]]
    quiet = lambda _: None  # noqa: E731
    for k in range(len(record["rounds"]) + 1, settings.rounds + 1):
        folder = out / f"round{k}"
        folder.mkdir(exist_ok=True)
        log(f"round {k}: checking {current} on {len(structures)} structure(s)")
        check_file = folder / "checks.json"          # a resumed round keeps its checks
        if check_file.is_file():
            reports = read_json(check_file, f"round {k}'s checks")
        else:
            reports = {path: check(current, path, check_settings, log=quiet) for path in structures}
            write_json(check_file, reports)
        if all(r["passed"] for r in reports.values()):
            record["passed_after_round"] = k - 1
            break
        members: List[str] = []
        entry = {"round": k, "check_before": {path: _summary(r) for path, r in reports.items()},
                 "frames_added": 0, "frames_from_md": 0, "frames_from_failed_checks": 0,
                 "max_md_disagreement_kj_mol_nm": None, "labels": []}
        per_md = max(1, settings.frames_per_round // len(structures))
        for n, path in enumerate(structures):
            z = molecules[path].atomic_numbers
            where = folder / Path(path).stem if len(structures) > 1 else folder
            where.mkdir(exist_ok=True)
            chosen_file = where / "frames.npz"      # the frames chosen for labelling: a resumed round keeps them
            if not chosen_file.is_file():
                if not members:
                    log(f"round {k}: committee of {settings.members}")
                    members = [str(_train(current, data, folder / f"member{m}", quiet, recipe=COMMITTEE_RECIPE,
                                          epochs=settings.member_epochs, frames_per_epoch=settings.frames_per_epoch,
                                          seed=settings.seed + m, learning_rate=settings.member_learning_rate))
                               for m in range(settings.members)]
                log(f"round {k}: committee MD of {Path(path).name} at "
                    f"{', '.join(f'{t:g} K' for t in settings.temperatures)}")
                md = [_md_frames(members, path, t, settings.md_steps, settings.platform,
                                 settings.seed + 1000 * k + n, where) for t in settings.temperatures]
                md = np.concatenate([m for m in md if len(m)]) if any(len(m) for m in md) else \
                    np.zeros((0, len(z), 3))
                sigma = ForceDisagreement(members, z)
                scores = np.array([sigma(x / 10.0) for x in md]) if len(md) else np.zeros(0)
                chosen = np.argsort(-scores)[:min(len(md), per_md)]
                failed = _check_geometries(reports[path], molecules[path])
                atomic_write(chosen_file, writer=lambda fh: np.savez(
                    fh, frames=np.concatenate([failed, md[chosen]]), from_failed_checks=len(failed),
                    from_md=len(chosen), max_sigma=scores.max() if len(scores) else np.nan))
            chosen = np.load(chosen_file)
            frames = chosen["frames"]
            entry["frames_from_md"] += int(chosen["from_md"])
            entry["frames_from_failed_checks"] += int(chosen["from_failed_checks"])
            if np.isfinite(chosen["max_sigma"]):
                entry["max_md_disagreement_kj_mol_nm"] = max(entry["max_md_disagreement_kj_mol_nm"] or 0.0,
                                                             float(chosen["max_sigma"]))
            if not len(frames):
                continue
            log(f"round {k}: labelling {len(frames)} frames of {Path(path).name} with {settings.method}")
            labels = label_frames(z, frames, where / "labels.npz", method=settings.method)
            labelled.append(on_data_zero(labels))
            entry["labels"].append(str(labels))
            entry["frames_added"] += int(len(labelled[-1]))
        used = {r for e in record["rounds"] for r in e.get("runs", [])}
        starts = {}                                 # run folder -> its start structure, read once a round
        entry["runs"] = [r for r in from_runs if r not in used]
        entry["frames_from_runs"] = 0
        for run in entry["runs"]:
            z, frames = from_runs[run]
            where = folder / "runs" / hashlib.sha1(run.encode()).hexdigest()[:12]    # one folder per run, stable
            where.mkdir(parents=True, exist_ok=True)
            log(f"round {k}: labelling the last {len(frames)} frames of {run} with {settings.method}")
            labels = label_frames(z, frames, where / "labels.npz", method=settings.method)
            labelled.append(on_data_zero(labels))
            entry["labels"].append(str(labels))
            entry["frames_added"] += int(len(labelled[-1]))
            entry["frames_from_runs"] += int(len(labelled[-1]))
            if settings.transfer_paths:            # the reaction itself: the slope the model let MD climb
                start = starts[run] = _run_start(run)
                found = [{"run": run, "hydrogen": h + 1, "donor": d + 1, "acceptor": a + 1}
                         for h, d, a in _run_transfers(start, z, frames)]
                record.setdefault("transfers", []).extend(t for t in found if t not in record["transfers"])
                for t in found:     # the reference's relaxed path, once
                    log(f"round {k}: GFN2-xTB MD along the relaxed path of H{t['hydrogen']} from atom "
                        f"{t['donor']} to {t['acceptor']} (as in {run}), labelled with {settings.method}")
                    labels = sample_transfer(start.atomic_numbers, start.positions_nm * 10.0, t["hydrogen"] - 1,
                                             t["donor"] - 1, t["acceptor"] - 1,
                                             where / f"transfer_H{t['hydrogen']}_{t['acceptor']}.npz",
                                             method=settings.method, temperature_k=max(settings.temperatures),
                                             seed=settings.seed, every=_transfer_every(settings.method))
                    labelled.append(on_data_zero(labels))
                    entry["labels"].append(str(labels))
                    entry["frames_added"] += int(len(labelled[-1]))
                    entry.setdefault("transfer_frames", []).append({**t, "path": "reference",
                                                                    "frames": int(len(labelled[-1]))})
        # every transfer found so far, walked again by the current model: its own way across moves as it learns
        # (a model taught the reference's path found another low one beside it)
        for n, t in enumerate(record.get("transfers", []) if settings.transfer_paths else []):
            if t["run"] not in starts:          # a run of an earlier round (or session)
                starts[t["run"]] = _run_start(t["run"])
            start = starts[t["run"]]
            where = folder / "transfers"
            where.mkdir(exist_ok=True)
            walked = where / f"{n}_H{t['hydrogen']}_{t['acceptor']}_frames.npy"
            if not walked.is_file():
                log(f"round {k}: the model's own path of H{t['hydrogen']} from atom {t['donor']} to {t['acceptor']}")
                path_frames = model_transfer_frames(current, start, t["hydrogen"] - 1, t["donor"] - 1,
                                                    t["acceptor"] - 1, max(settings.temperatures),
                                                    settings.seed + 1000 * k, platform=settings.platform,
                                                    every=_transfer_every(settings.method))
                atomic_write(walked, writer=lambda fh: np.save(fh, path_frames))
            labels = label_frames(start.atomic_numbers, np.load(walked), where / f"{n}_H{t['hydrogen']}_"
                                  f"{t['acceptor']}.npz", method=settings.method)
            labelled.append(on_data_zero(labels))
            entry["labels"].append(str(labels))
            entry["frames_added"] += int(len(labelled[-1]))
            entry.setdefault("transfer_frames", []).append({**t, "path": "model", "frames": int(len(labelled[-1]))})
        new, combined = training_set()
        log(f"round {k}: fine-tuning on {len(combined)} frames ({len(combined) - len(original_train)} of the "
            f"{len(new)} labelled so far, weights {LEARNABLE_WEIGHT:g}-1; the rest lie too far out), validated on "
            f"{len(original_val)} original ones")
        entry["frames_trained_on"] = len(combined) - len(original_train)
        refined = _train(current, combined, folder / "model", quiet, validation=original_val,
                         **fine_tuning_schedule(settings.epochs, settings))
        entry["model"] = str(refined)
        _evaluate_round(entry, current, refined, new, tests, log)
        record["rounds"].append(entry)
        write_json(record_path, record)
        current = str(refined)
    if polish_epochs and record["rounds"]:
        entry = record["rounds"][-1]
        target = settings.epochs + polish_epochs
        if entry.get("fine_tuning_epochs", settings.epochs) < target:
            # the last round's fine-tuning goes on from its checkpoint: same data, validation and schedule
            k = entry["round"]
            folder = out / f"round{k}" / "model"
            new, combined = training_set()
            log(f"round {k}: fine-tuning on to epoch {target}")
            (folder / "metrics.json").unlink(missing_ok=True)      # unfinished: _train resumes its checkpoint
            _train(current, combined, folder, quiet, validation=original_val, **fine_tuning_schedule(target, settings))
            before = str(model) if k == 1 else record["rounds"][-2]["model"]
            _evaluate_round(entry, before, current, new, tests, log)
            entry["fine_tuning_epochs"] = target
            write_json(record_path, record)
    digest = file_sha256(current) if Path(current).is_file() else current
    if record.get("final_check_of") != digest:          # a rerun with nothing new does not check again
        final = {path: check(current, path, check_settings, log=quiet) for path in structures}
        record["final_model"] = current
        record["final_check"] = {"passed": all(r["passed"] for r in final.values())} | \
            {path: _summary(r) for path, r in final.items()}
        record["final_check_of"] = digest
        write_json(record_path, record)
    return record
