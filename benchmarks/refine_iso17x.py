"""Stages 2 and 3 of the shipped iso17x refinement (issue #15; benchmarks/refine_iso17x.md), as they were run.

Stage 1 was `schnet-md refine` round 1 (see refine_iso17x.md for the command): the 8 isomers' failed checks and
committee MD, 835 GFN2-xTB frames, fine-tuned at their natural share of 4,000 frames drawn per epoch. It kept the
accuracy (energies better) but not isomer 8's chemistry at 500 K. This stage adds the lead-up to every failure the
blow-up guard stopped (the last 20 frames of each run, GFN2-xTB) and counts the new frames 5x their share:

    python benchmarks/refine_iso17x.py --start STAGE1_MODEL --runs RUN_DIR... --labels ROUND1/*/labels.npz \
        --out DIR [--label-weight 5 --epochs 12]

It is what `schnet-md refine ... --from-runs RUN_DIR... --label-weight 5 --frames-per-epoch 4000` does in a
round, minus that round's checks and committee MD (time ran short), with the same weights, learnable-frame cut,
recipe (the start model's batch 32 and EMA 0.999, lr 1e-4) and epoch choice (the latest within 2 % of the best
validation loss). GFN2-xTB is the data's own method, so the new labels need no energy offset (measured: 4e-8 eV).
Stage 3 started from stage 2 with the lead-ups of its five blow-ups as --runs and every earlier labels.npz as
--labels (what `refine --previous-labels` now does); the commands are in refine_iso17x.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "iso17x"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--start", required=True, help="the stage-1 model")
    p.add_argument("--runs", nargs="+", required=True, help="simulate runs the blow-up guard stopped")
    p.add_argument("--labels", nargs="+", required=True, help="labels.npz files of refine round 1")
    p.add_argument("--out", required=True)
    p.add_argument("--label-weight", type=float, default=5.0)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--frames-per-epoch", type=int, default=4000)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--lr-patience", type=int, default=25,
                   help="epochs without improvement before the rate halves (refine's rounds: 25, i.e. a constant rate "
                        "over a round; round 6's probes ran with 3)")
    p.add_argument("--warmup-steps", type=int, default=0, help="refine's own rounds use refine.WARMUP_STEPS (250); "
                                                                "stages 2 and 3 of the shipped model ran without")
    args = p.parse_args()
    import torch

    from schnet_md.data import concatenate, read_data, read_rmd17
    from schnet_md.reference import label_frames
    from schnet_md.refine import (RefineSettings, _run_frames, _train, energy_spread, fine_tuning_schedule,
                                  frame_weights, learnable_frames)

    torch.set_num_threads(1)
    data = read_data(DATA, split="train")
    validation = read_data(DATA, split="validation")
    out = Path(args.out)
    labels = list(args.labels)
    for run in args.runs:                       # the lead-up to each failure, labelled once (resumable)
        z, frames = _run_frames(run)
        where = out.parent / f"{out.name}-runs" / Path(run).parent.name / Path(run).name
        where.mkdir(parents=True, exist_ok=True)
        labels.append(str(label_frames(z, frames, where / "labels.npz", method="GFN2-xTB")))
    new = concatenate([read_rmd17(path).converted(data.energy_unit) for path in labels], source="refinement labels")
    labelled = new.weighted(frame_weights(new, float(np.sqrt(np.mean(data.forces ** 2))), energy_spread(data)))
    new = learnable_frames(labelled, args.label_weight)
    print(f"{len(new)} learnable new frames of {len(labelled)}, weighted x{args.label_weight:g}", flush=True)
    schedule = RefineSettings(learning_rate=args.learning_rate, frames_per_epoch=args.frames_per_epoch, seed=1)
    _train(args.start, concatenate([data, new], source=f"{data.source} + {new.source}"), out, print,
           validation=validation, **{**fine_tuning_schedule(args.epochs, schedule, warmup_steps=args.warmup_steps),
                                     "lr_patience": args.lr_patience})


if __name__ == "__main__":
    main()
