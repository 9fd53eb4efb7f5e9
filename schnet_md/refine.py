"""`schnet-md refine`: the loop that makes a model robust where MD and minimisers take it (issue #15).

Each round:
  1. `check` the current model on the structure (minimisation, bond and molecule scans, hot MD); a round that
     passes ends the loop;
  2. a committee: the current model fine-tuned a few epochs with different seeds (`members`);
  3. candidate frames: Langevin MD with the committee at each target temperature (frames up to where the
     blow-up guard stopped a run included), plus the geometries the failed checks visited: stretched bonds,
     the stretched molecule, the minimiser's path;
  4. the frames where the committee disagrees most (sigma_F), and the failed checks' geometries, are labelled
     with the reference method (GFN2-xTB through tblite: the labels of iso17x and the ML/MM data);
  5. the current model is fine-tuned on the original data plus every frame labelled so far;
  6. errors on the original test set before and after, and the frames added, go to OUT/rounds.json.
Rounds are resumable: a finished round is skipped, labelling resumes frame by frame.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np

from .check import CheckSettings, check


@dataclass
class RefineSettings:
    method: str = "GFN2-xTB"
    temperatures: List[float] = field(default_factory=lambda: [300.0, 500.0])
    md_steps: int = 2000              # committee MD per temperature and round (0.5 fs)
    members: int = 3                  # committee size for choosing frames
    member_epochs: int = 3            # fine-tuning epochs that make each member
    frames_per_round: int = 40
    epochs: int = 20                  # fine-tuning epochs of the refined model, each round
    learning_rate: float = 2e-4
    rounds: int = 3
    check_steps: int = 2000
    seed: int = 1
    platform: str = "CPU"


def _fine_tune(model_path, data, out: Path, epochs: int, seed: int, lr: float, log) -> Path:
    from .modelfile import load_model
    from .train import TrainSettings, train

    if (out / "model.pt").is_file() and (out / "metrics.json").is_file():
        return out / "model.pt"
    if out.exists():
        shutil.rmtree(out)              # an unfinished fine-tuning starts over
    base, _ = load_model(model_path)
    train(data, base.config, out, TrainSettings(epochs=epochs, batch_size=16, learning_rate=lr, seed=seed,
                                                  ema_decay=0.99), log=log, init_state=base.state_dict())
    return out / "model.pt"


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


def _check_geometries(report: dict, structure) -> np.ndarray:
    """Å geometries the failed checks went to: stretched failing bonds, the stretched molecule."""
    from .structures import BondMap

    r = structure.positions_nm * 10.0
    frames = []
    if not report["bond_scans"]["passed"]:
        bonds = BondMap(structure.topology)
        degree = np.bincount(bonds.bonds.ravel(), minlength=len(r))
        for (i, j), row in zip(bonds.bonds.tolist(), report["bond_scans"]["bonds"]):
            if row["largest_fall_kcal_mol"] <= 1.0 and row["lowest_below_relaxed_kcal_mol"] <= 1.0:
                continue
            a, b = (i, j) if degree[j] <= degree[i] else (j, i)
            for f in (1.15, 1.3, 1.5):
                x = r.copy()
                x[b] = r[a] + f * (r[b] - r[a])
                frames.append(x)
    if not report["molecule_scan"]["passed"] or not report["minimisation"]["passed"]:
        centre = r.mean(axis=0)
        frames += [centre + s * (r - centre) for s in (1.05, 1.1, 1.2)]
    return np.array(frames).reshape(-1, len(r), 3)


def refine(model, structure_path, data, out_dir, settings: Optional[RefineSettings] = None, test=None,
           log: Callable[[str], None] = print) -> dict:
    """Run refinement rounds until `check` passes or `settings.rounds` are done; returns the record."""
    from .committee import ForceDisagreement
    from .data import concatenate, read_rmd17
    from .evaluate import evaluate
    from .modelfile import load_model
    from .reference import label_frames
    from .structures import read_structure

    settings = settings or RefineSettings()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record_path = out / "rounds.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else \
        {"model": str(model), "structure": str(structure_path), "data": data.source, "settings": asdict(settings),
         "rounds": []}
    if record["settings"] != asdict(settings) or record["model"] != str(model):
        raise ValueError(f"{out} holds a refinement of {record['model']} with other settings; use another --out")
    structure = read_structure(structure_path)
    z = structure.atomic_numbers
    check_settings = CheckSettings(temperature_k=max(settings.temperatures), md_steps=settings.check_steps,
                                   platform=settings.platform, seed=settings.seed)
    current = str(model) if not record["rounds"] else record["rounds"][-1]["model"]
    labelled = [read_rmd17(r["labels"]) for r in record["rounds"] if r.get("labels")]
    quiet = lambda _: None  # noqa: E731
    for k in range(len(record["rounds"]) + 1, settings.rounds + 1):
        folder = out / f"round{k}"
        folder.mkdir(exist_ok=True)
        log(f"round {k}: checking {current}")
        report = check(current, structure_path, check_settings, log=quiet)
        if report["passed"]:
            record["passed_after_round"] = k - 1
            break
        log(f"round {k}: committee of {settings.members}")
        members = [str(_fine_tune(current, data, folder / f"member{m}", settings.member_epochs, settings.seed + m,
                                  settings.learning_rate, quiet)) for m in range(settings.members)]
        log(f"round {k}: committee MD at {', '.join(f'{t:g} K' for t in settings.temperatures)}")
        md = [_md_frames(members, structure_path, t, settings.md_steps, settings.platform, settings.seed + k, folder)
              for t in settings.temperatures]
        md = np.concatenate([m for m in md if len(m)]) if any(len(m) for m in md) else np.zeros((0, len(z), 3))
        failed = _check_geometries(report, structure)
        sigma = ForceDisagreement(members, z)
        scores = np.array([sigma(x / 10.0) for x in md]) if len(md) else np.zeros(0)
        n_failed = min(len(failed), settings.frames_per_round // 2)
        n_md = min(len(md), settings.frames_per_round - n_failed)
        chosen_md = np.argsort(-scores)[:n_md]
        frames = np.concatenate([failed[:n_failed], md[chosen_md]]) if n_md else failed[:n_failed]
        log(f"round {k}: labelling {len(frames)} frames with {settings.method}")
        labels = label_frames(z, frames, folder / "labels.npz", method=settings.method)
        labelled.append(read_rmd17(labels))
        combined = concatenate([data, *labelled], source=f"{data.source} + {len(labelled)} refinement round(s)")
        log(f"round {k}: fine-tuning on {len(combined)} frames")
        refined = _fine_tune(current, combined, folder / "model", settings.epochs, settings.seed,
                             settings.learning_rate, quiet)
        entry = {"round": k, "check_before": {key: report[key]["passed"] for key in
                                              ("minimisation", "bond_scans", "molecule_scan")} |
                 {"md": [m["passed"] for m in report["md"]]},
                 "frames_added": int(len(labelled[-1])), "frames_from_md": int(n_md),
                 "frames_from_failed_checks": int(n_failed),
                 "max_md_disagreement_kj_mol_nm": float(scores.max()) if len(scores) else None,
                 "labels": str(labels), "model": str(refined)}
        if test is not None:
            entry["test_before"] = evaluate(load_model(current)[0], test)
            entry["test_after"] = evaluate(load_model(refined)[0], test)
        record["rounds"].append(entry)
        record_path.write_text(json.dumps(record, indent=1))
        current = str(refined)
    final = check(current, structure_path, check_settings, log=quiet)
    record["final_model"] = current
    record["final_check"] = {"passed": final["passed"]} | {key: final[key]["passed"] for key in
                                                            ("minimisation", "bond_scans", "molecule_scan")}
    record_path.write_text(json.dumps(record, indent=1))
    return record
