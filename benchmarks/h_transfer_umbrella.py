"""GFN2-xTB frames along a hydrogen transfer (issue #15, refine_iso17x.md): umbrella windows on
xi = d(A-H) - d(B-H), the hydrogen H moving from its atom A towards B, walked by Langevin MD at the campaign's
temperature so the rest of the molecule follows the hydrogen. `--driver reference` walks them in GFN2-xTB (the
reference's relaxed path: `reference.sample_transfer`), `--driver MODEL` with a SchNet model in OpenMM (the
model's own path: `refine.model_transfer_frames`); either way the frames are labelled with GFN2-xTB.

    python benchmarks/h_transfer_umbrella.py systems/c7o2h10_7/c7o2h10_7.pdb --hydrogen 13 --to 3 \
        --out DIR/labels.npz [--driver reference|MODEL --walks 2 --temperature 500]
    python benchmarks/h_transfer_umbrella.py --evaluate DIR/labels.npz --models MODEL... [--json FILE]

`--evaluate` prints, window by window, the mean GFN2-xTB energy and each model's, both from the first window, and
the models' force MAE: the barrier the model sees along that path against the reference's.

Atoms are numbered from 1 as in the PDB; A is the hydrogen's nearest heavy atom in STRUCTURE. B may be a
hydrogen: `--hydrogen 11 --to 12` on isomer 63 pinches two methyl hydrogens together (round 6). Writes an
rMD17-format labels file (`refine --previous-labels` and `refine_iso17x.py --labels` take it) and OUT.json. The
straight-line path of `h_shift_frames.py` put most frames 60-170 kcal/mol above what MD reaches; these sit on the
slope MD climbs. `refine --from-runs` does the same for each transfer a stopped run was making.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def evaluate(labels: str, models, json_out=None) -> dict:
    """Per window: reference and model energies (kcal/mol, from the first window's mean), force MAE."""
    import torch

    from schnet_md.modelfile import load_model
    from schnet_md.units import energy_factor

    torch.set_num_threads(1)
    with np.load(labels) as d:
        z, coords, energies, forces = (torch.tensor(d["nuclear_charges"]).long(), d["coords"], d["energies"],
                                       d["forces"])
    window = np.array(json.loads(Path(labels + ".json").read_text())["window_of_frame"])
    table = {"labels": labels, "windows_A": np.unique(window).tolist(),
             "reference_kcal_mol": [], "models": {}}
    first = window == window.min()
    for w in np.unique(window):
        table["reference_kcal_mol"].append(round(float(energies[window == w].mean() - energies[first].mean()), 2))
    for spec in models:
        model, meta = load_model(spec, dtype=torch.float64)
        to_kcal = energy_factor(meta["units"]["energy"], "kcal/mol")
        e_model, f_model = [], []
        for r in coords:
            r = torch.tensor(r, requires_grad=True)
            e = model(z, r)
            (g,) = torch.autograd.grad(e, r)
            e_model.append(float(e.detach()) * to_kcal)
            f_model.append(-g.numpy() * to_kcal)
        e_model, f_model = np.array(e_model), np.array(f_model)
        table["models"][spec] = {
            "energy_kcal_mol": [round(float(e_model[window == w].mean() - e_model[first].mean()), 2)
                                for w in np.unique(window)],
            "forces_mae_kcal_mol_A": [round(float(np.abs(f_model - forces)[window == w].mean()), 2)
                                      for w in np.unique(window)]}
    print(f"{labels}: energies from the first window's mean (kcal/mol); force MAE (kcal/mol/Å)")
    print("xi0 (Å) | GFN2-xTB | " + " | ".join(f"{Path(m).stem} E, F MAE" for m in models))
    for k, w in enumerate(table["windows_A"]):
        print(f"{w:6.2f} | {table['reference_kcal_mol'][k]:6.1f} | " + " | ".join(
            f"{t['energy_kcal_mol'][k]:6.1f}, {t['forces_mae_kcal_mol_A'][k]:5.2f}" for t in table["models"].values()))
    if json_out:
        Path(json_out).write_text(json.dumps(table, indent=1))
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("structure", nargs="?")
    p.add_argument("--hydrogen", type=int, help="the moving H (PDB serial, from 1)")
    p.add_argument("--to", type=int, help="the atom it moves towards (PDB serial, from 1)")
    p.add_argument("--out")
    p.add_argument("--evaluate", metavar="LABELS_NPZ", help="compare models with the labels of a path")
    p.add_argument("--models", nargs="+", default=[])
    p.add_argument("--json", help="with --evaluate: write the table here")
    p.add_argument("--driver", default="reference", help="'reference' (GFN2-xTB MD) or a model file / name")
    p.add_argument("--temperature", type=float, default=500.0)
    p.add_argument("--walks", type=int, default=2, help="independent walks through the windows")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.evaluate:
        evaluate(args.evaluate, args.models, args.json)
        return
    if not (args.structure and args.hydrogen and args.to and args.out):
        p.error("STRUCTURE, --hydrogen, --to and --out are needed to sample a path")
    from schnet_md.reference import label_frames, sample_transfer, transfer_windows
    from schnet_md.structures import read_structure

    out = Path(args.out)
    molecule = read_structure(args.structure)
    z = molecule.atomic_numbers.tolist()
    r0 = molecule.positions_nm * 10.0
    h, b = args.hydrogen - 1, args.to - 1
    heavy = [i for i in range(len(z)) if z[i] > 1]
    a = min(heavy, key=lambda i: np.linalg.norm(r0[i] - r0[h]))
    print(f"H{args.hydrogen} from atom {a + 1} towards {args.to}, driven by {args.driver}", flush=True)
    if args.driver == "reference":
        sample_transfer(z, r0, h, a, b, out, temperature_k=args.temperature, walks=args.walks, seed=args.seed)
    else:
        import torch

        from schnet_md.reference import TRANSFER_EVERY, TRANSFER_STEPS
        from schnet_md.refine import model_transfer_frames

        torch.set_num_threads(1)
        steps, every = TRANSFER_STEPS, TRANSFER_EVERY      # sample_transfer's windows: 10 frames a window and walk
        frames = model_transfer_frames(args.driver, molecule, h, a, b, args.temperature, args.seed, walks=args.walks,
                                       steps=steps, every=every)
        out.parent.mkdir(parents=True, exist_ok=True)
        label_frames(z, frames, out, method="GFN2-xTB")
        windows = transfer_windows(r0, h, a, b)
        per_window = steps // every
        per_walk = len(windows) * per_window
        xi = np.linalg.norm(frames[:, h] - frames[:, a], axis=1) - np.linalg.norm(frames[:, h] - frames[:, b], axis=1)
        Path(str(out) + ".json").write_text(json.dumps({
            "structure": args.structure, "hydrogen": h, "donor": a, "acceptor": b, "sampled_with": args.driver,
            "method": "GFN2-xTB", "temperature_k": args.temperature, "walks": args.walks, "seed": args.seed,
            "windows_A": windows.round(4).tolist(), "xi_A": xi.round(4).tolist(),
            "window_of_frame": [float(windows[(k % per_walk) // per_window].round(4)) for k in range(len(frames))]},
            indent=1))
    with np.load(out) as d:
        e = d["energies"]
    print(f"{len(e)} frames -> {out}; GFN2-xTB energy above the lowest, percentiles 50/90/100: "
          f"{np.round(np.percentile(e - e.min(), [50, 90, 100]), 1).tolist()} kcal/mol")


if __name__ == "__main__":
    main()
