"""Copy a trained model into the package and write its model card from a fresh evaluation.

    python benchmarks/ship_model.py RUN_DIR --name ethanol --test ../shared/data/rmd17/rmd17_ethanol_test_01.npz \
        --command "schnet-md train ..."
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from schnet_md.bench import cpu_name
from schnet_md.data import read_data
from schnet_md.elements import formula
from schnet_md.evaluate import evaluate, format_table
from schnet_md.model import count_parameters
from schnet_md.modelfile import MODELS_DIR, load_model



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
    args = p.parse_args()

    run = Path(args.run_dir)
    model, meta = load_model(run / "model.pt")
    if (run / "metrics.json").exists():
        history = json.loads((run / "metrics.json").read_text())["history"]
    else:  # a run still going: its history is in the last epoch's checkpoint
        history = json.loads(torch.load(run / "checkpoint.pt", weights_only=True)["history"])
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
    card += ["Regenerate this card: `python benchmarks/ship_model.py RUN_DIR --name "
             f"{args.name} --test {' '.join(args.test)} --command ...`", ""]
    (dest / "MODEL_CARD.md").write_text("\n".join(card))
    print((dest / "MODEL_CARD.md").read_text())


if __name__ == "__main__":
    main()
