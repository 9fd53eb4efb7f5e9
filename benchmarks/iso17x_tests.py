"""iso17x test errors of one or more models, split the way a refinement needs them (issue #15).

    python benchmarks/iso17x_tests.py NAME=MODEL [NAME=MODEL ...] --refined-on 7 105 8 [--out FILE.json]

Rows: test_within (known molecules), test_other (unknown molecules), test_other without the isomers a refinement
labelled frames of (those are no longer unknown to the refined model, so only the rest still measure
generalisation to new molecules), and each of those isomers alone. kcal/mol and kcal/mol/Å, all frames.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "iso17x"


def test_sets(refined_on) -> dict:
    from schnet_md.data import read_iso17x

    mol = np.load(DATA / "iso17x.npz")["mol"]
    splits = np.load(DATA / "splits.npz")
    within, other = read_iso17x(DATA, "test_within"), read_iso17x(DATA, "test_other")
    other_mol = mol[splits["test_other"]]
    sets = {"test_within": within, "test_other": other}
    rest = np.flatnonzero(~np.isin(other_mol, refined_on))
    sets[f"test_other without {', '.join(map(str, refined_on))}"] = other.subset(rest)
    for m in refined_on:
        chosen = np.flatnonzero(other_mol == m)
        if len(chosen):
            sets[f"test_other isomer {m}"] = other.subset(chosen)
    return sets


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="NAME=MODEL (file or shipped name)")
    p.add_argument("--refined-on", type=int, nargs="*", default=[], help="unknown isomers a refinement labelled")
    p.add_argument("--out", help="JSON file for the numbers")
    args = p.parse_args()
    import torch

    from schnet_md.evaluate import evaluate
    from schnet_md.modelfile import load_model

    torch.set_num_threads(1)
    sets = test_sets(args.refined_on)
    results = {}
    for item in args.models:
        name, path = item.split("=", 1)
        model = load_model(path)[0]
        results[name] = {key: {k: v for k, v in evaluate(model, data).items()
                               if k in ("n_frames", "energy_mae_kcal_mol", "forces_mae_kcal_mol")}
                         for key, data in sets.items()}
    print("| test set | frames | " + " | ".join(f"{n}: E MAE | F MAE" for n in results) + " |")
    for key in sets:
        row = [key, str(len(sets[key]))] + [f"{results[n][key]['energy_mae_kcal_mol']:.3f} | "
                                            f"{results[n][key]['forces_mae_kcal_mol']:.3f}" for n in results]
        print("| " + " | ".join(row) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps({"models": dict(m.split("=", 1) for m in args.models),
                                              "results": results}, indent=1))


if __name__ == "__main__":
    main()
