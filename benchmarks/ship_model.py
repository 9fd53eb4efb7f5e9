"""Copy a trained model into the package and write its model card from a fresh evaluation.

    python benchmarks/ship_model.py RUN_DIR --name ethanol --test ../shared/data/rmd17/rmd17_ethanol_test_01.npz \
        --command "schnet-md train ..."
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
from pathlib import Path

import torch

from schnet_md.bench import cpu_name
from schnet_md.data import read_data
from schnet_md.elements import formula
from schnet_md.train import read_checkpoint
from schnet_md.evaluate import evaluate, format_table
from schnet_md.model import count_parameters
from schnet_md.modelfile import MODELS_DIR, load_model

ROOT = Path(__file__).resolve().parent.parent



def refinement_section(folder: Path) -> list:
    record = json.loads((folder / "rounds.json").read_text())
    lines = ["## Refinement (`schnet-md refine`)", "",
             f"Refined from the earlier shipped model with {record['settings']['method']} labels on "
             f"{', '.join(Path(s).stem for s in record['structures'])}; every round's record is in "
             "`benchmarks/accuracy/refine_*.json` and `benchmarks/accuracy.md`.", "",
             "| round | frames added (failed checks + MD) | test forces MAE before → after (kcal/mol/Å) |",
             "|---|---|---|"]
    for e in record["rounds"]:
        tests = e["test"].values() if "test" in e else \
            [{"before": e["test_before"], "after": e["test_after"]}] if "test_before" in e else []
        errors = "; ".join(f"{t['before']['forces_mae_kcal_mol']:.3f} → {t['after']['forces_mae_kcal_mol']:.3f}"
                           for t in tests) or "–"
        lines.append(f"| {e['round']} | {e['frames_added']} ({e['frames_from_failed_checks']} + {e['frames_from_md']}) "
                     f"| {errors} |")
    return lines + [""]


def robustness_section(name: str, structures: list) -> list:
    from schnet_md.check import CheckSettings, check, format_report, write_json

    lines = ["## Robustness (`schnet-md check`)", "",
             "Minimisation, bond scans (each bond 0.9-2.5x), a whole-molecule scan (1-2x) and 2,000 steps of "
             f"Langevin MD at 300 K and 500 K with the blow-up guard; CPU, {datetime.date.today()}; full reports in "
             "`benchmarks/checks/`. A failed check means: do not minimise or run hot MD with this model there "
             "without refining it (`schnet-md refine`).", ""]
    checks = ROOT / "benchmarks" / "checks"
    for structure in structures:
        report = check(str(MODELS_DIR / name / "model.pt"), structure, CheckSettings(temperature_k=500.0),
                       log=lambda _: None)
        report["model"] = name
        text = format_report(report)
        stem = f"{name}-{Path(structure).stem}"
        write_json(report, checks / f"{stem}.json")
        (checks / f"{stem}.txt").write_text(text + "\n")
        lines += ["```", text, "```", ""]
    for path in sorted((ROOT / "benchmarks" / "robustness_md").glob(f"{name}-*.json")):   # long MD campaigns
        record = json.loads(path.read_text())
        lines += [f"Long MD ({path.stem}, `benchmarks/robustness_md.md`; model: {record['model']}): " + "; ".join(
            f"{r['system']} seed {r['seed']} at {r['temperature_k']:g} K: {r['ps_done']:.1f} of {r['ps_target']:g} ps, "
            + ("ran to the end" if r["stopped"] is None else f"stopped ({r['stopped'][:80]})")
            for r in record["runs"]) + ".", ""]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("run_dir")
    p.add_argument("--name", required=True)
    p.add_argument("--test", nargs="+", required=True,
                   help="held-out test data: rMD17 files, or FOLDER:SPLIT for iso17x (e.g. ../shared/data/iso17x:test_other)")
    p.add_argument("--labels", default="new")
    p.add_argument("--train", help="the rMD17 training file: test frames it shares (by old_indices) are refused")
    p.add_argument("--command", required=True, help="the training command, quoted")
    p.add_argument("--status", help="a line on the model's status (e.g. interim, not converged)")
    p.add_argument("--check", nargs="*", default=[], metavar="STRUCTURE",
                   help="run `schnet-md check` on these structures (500 K); the card gets the verdicts, "
                        "benchmarks/checks/ the full reports")
    p.add_argument("--refined", help="the `schnet-md refine` folder the model comes from: the card lists its rounds")
    args = p.parse_args()

    run = Path(args.run_dir)
    model, meta = load_model(run / "model.pt")
    if (run / "metrics.json").exists():
        history = json.loads((run / "metrics.json").read_text())["history"]
    else:  # a run still going: its history is in the last epoch's checkpoint
        history = json.loads(read_checkpoint(run / "checkpoint.pt")["history"])
    dest = MODELS_DIR / args.name
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(run / "model.pt", dest / "model.pt")
    if args.train:   # rMD17 files carry the original MD17 frame numbers: refuse any overlap
        import numpy as np
        seen = set(np.load(args.train)["old_indices"].tolist())
        for t in args.test:
            shared = sum(int(i) in seen for i in np.load(t)["old_indices"])
            if shared:
                raise SystemExit(f"{t} shares {shared} frames with {args.train}: not a held-out test set")
    test_sets = []
    for t in args.test:
        path, _, split = t.partition(":")
        test_sets.append(read_data(path, labels=args.labels, split=split or "test_within"))
    results = [evaluate(model, data) for data in test_sets]
    (dest / "metrics.json").write_text(json.dumps({"test": results, "training": meta.get("training")}, indent=1))
    training = meta["training"]
    wall = sum(h["seconds"] for h in history)
    card = [
        f"# {args.name}: SchNet ({meta['preset']}) for {formula(test_sets[0].frame(0)[0])}",
        "",
        *([f"**Status:** {args.status}", ""] if args.status else []),
        f"- Elements: {', '.join(model.element_symbols)}; {count_parameters(model):,} parameters; "
        f"energies in {meta['units']['energy']}, lengths in Å (exported forces: kJ/mol, nm).",
        f"- Training data: {training['data']} (SHA-256 `{training['data_sha256'][:16]}…`), "
        f"{training['n_train']} training / {training['n_validation']} validation frames ("
        + (f"validation: {training['validation_data']}" if training.get("validation_data")
           and training.get("validation_data") != training["data"]
           else f"random split of the same file, seed {training['settings']['seed']}")
        + f"); best validation epoch {training['epoch']} of {len(history) or '?'}.",
        f"- Loss: rho·|ΔE|² + mean_i |ΔF_i|², rho = {training['settings']['rho']}; Adam, lr "
        f"{training['settings']['learning_rate']} halved after {training['settings']['lr_patience']} epochs "
        f"without improvement; batch {training['settings']['batch_size']}.",
        f"- Trained on: {cpu_name()}, 1 thread, torch {torch.__version__}; "
        f"{wall / 60:.0f} min of training epochs.",
        f"- Command: `{args.command}`",
        "",
        "## Test metrics (frames never used in training or validation)",
        "",
    ]
    for r in results:
        card += [f"{r['data']}, {r['n_frames']} frames:", "", "```", format_table(r), "```", ""]
    if args.refined:
        card += refinement_section(Path(args.refined))
    if args.check:
        card += robustness_section(args.name, args.check)
    card += ["Regenerate this card: `python benchmarks/ship_model.py RUN_DIR --name "
             f"{args.name} --test {' '.join(args.test)}"
             + (f" --check {' '.join(args.check)}" if args.check else "")
             + (" --refined REFINE_DIR" if args.refined else "") + " --command ...`", ""]
    (dest / "MODEL_CARD.md").write_text("\n".join(card))
    print((dest / "MODEL_CARD.md").read_text())


if __name__ == "__main__":
    main()
