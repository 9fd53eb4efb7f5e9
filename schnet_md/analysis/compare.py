"""`schnet-md compare`: trajectories of the same molecule (e.g. SchNet MD against the GFN2-xTB reference,
or two models) compared on dihedral and distance distributions.

The divergence is Jensen-Shannon (base 2: 0 = identical distributions, 1 = no overlap) between
histograms, for each rotatable heavy-atom dihedral (36 bins of 10°) and for each heavy-atom pair
distance (0.05 Å bins), each trajectory against the first. Writes OUT/compare.md, OUT/compare.json and plots
(OUTPUTS); a folder holding any of them is replaced only when asked."""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path
from typing import List, Sequence

import numpy as np
from scipy.spatial.distance import jensenshannon

from .. import runs
from .analyze import save_figure
from .dihedrals import dihedral_angles, rotatable_dihedrals
from .load import LoadedTrajectory, load_trajectory

DIHEDRAL_BINS = np.linspace(0.0, 360.0, 37)
OUTPUTS = ("compare.md", "compare.json", "dihedral_distributions.png", "distance_distributions.png")


def js_divergence(a: np.ndarray, b: np.ndarray, bins: np.ndarray) -> float:
    p, _ = np.histogram(a, bins=bins)
    q, _ = np.histogram(b, bins=bins)
    if p.sum() == 0 or q.sum() == 0:
        return float("nan")
    return float(jensenshannon(p, q, base=2) ** 2)


def bond_set(traj) -> set:
    """Bonds (i < j) of a trajectory's first frame, from covalent radii (the topology's own bonds may be
    missing or template-made, so the geometry decides, the same way for every input)."""
    from ..structures import infer_bonds

    z = [a.element.atomic_number for a in traj.topology.atoms]
    box = None if traj.unitcell_vectors is None else traj.unitcell_vectors[0] * 10.0
    return set(infer_bonds(z, traj.xyz[0] * 10.0, box))


def compare(loaded: Sequence[LoadedTrajectory]) -> dict:
    if len(loaded) < 2:
        raise ValueError("compare needs at least two trajectories")
    ref = loaded[0].traj
    elements = [a.element.symbol for a in ref.topology.atoms]
    for item in loaded[1:]:
        other = [a.element.symbol for a in item.traj.topology.atoms]
        if other != elements:
            raise ValueError(f"{item.label} is not the same molecule as {loaded[0].label} in the same atom order "
                             f"({len(other)} vs {len(elements)} atoms, elements {''.join(other)} vs {''.join(elements)})")
        # same elements in the same order can still be another molecule (isomers): compare the bond graphs
        ref_bonds, bonds = bond_set(ref), bond_set(item.traj)
        if bonds != ref_bonds:
            names = [f"{a.element.symbol}{a.index + 1}" for a in ref.topology.atoms]
            only = sorted(ref_bonds - bonds)[:1] or sorted(bonds - ref_bonds)[:1]
            i, j = only[0]
            where = loaded[0].label if (i, j) in ref_bonds else item.label
            raise ValueError(f"{item.label} and {loaded[0].label} are different molecules: their bonds differ "
                             f"({len(ref_bonds ^ bonds)} bond(s), e.g. {names[i]}-{names[j]} only in {where}); compare "
                             "compares one molecule's conformations")
    quads, names = rotatable_dihedrals(ref.topology, ref.xyz[0])
    heavy = ref.topology.select("not element H")
    pairs = np.array(list(combinations(heavy, 2)), dtype=np.int64).reshape(-1, 2)
    angles = [dihedral_angles(item.traj, quads) for item in loaded]
    import mdtraj
    distances = [10 * mdtraj.compute_distances(item.traj, pairs) for item in loaded]
    d_max = max(float(d.max()) for d in distances) if len(pairs) else 1.0
    d_bins = np.arange(0.0, d_max + 0.1, 0.05)
    out = {"trajectories": [{"label": x.label, "n_frames": x.traj.n_frames, "time_unit": x.time_unit,
                             "time_ps": [float(x.traj.time[0]), float(x.traj.time[-1])]} for x in loaded],
           "dihedrals": [], "distances": {}}
    for k, name in enumerate(names):
        out["dihedrals"].append({"name": name, "atoms": quads[k].tolist(),
                                 "js_divergence": [js_divergence(angles[0][:, k], a[:, k], DIHEDRAL_BINS)
                                                   for a in angles[1:]]})
    per_pair = [[js_divergence(distances[0][:, p], d[:, p], d_bins) for p in range(len(pairs))] for d in distances[1:]]
    out["distances"] = {"n_pairs": int(len(pairs)), "mean_js_divergence": [float(np.mean(v)) for v in per_pair],
                        "max_js_divergence": [float(np.max(v)) for v in per_pair],
                        "pooled_js_divergence": [js_divergence(distances[0].ravel(), d.ravel(), d_bins)
                                                 for d in distances[1:]]}
    out["_angles"], out["_distances"], out["_names"] = angles, distances, names
    return out


def write_comparison(result: dict, out_dir: str | Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = [t["label"] for t in result["trajectories"]]
    angles, distances, names = result.pop("_angles"), result.pop("_distances"), result.pop("_names")
    images = []
    if names:
        fig, axes = plt.subplots(len(names), 1, figsize=(7, 2.2 * len(names)), squeeze=False)
        for k, name in enumerate(names):
            for label, a in zip(labels, angles):
                axes[k, 0].hist(a[:, k], bins=DIHEDRAL_BINS, density=True, histtype="step", label=label)
            axes[k, 0].set_ylabel(name, fontsize=8)
        axes[0, 0].legend(fontsize=7)
        axes[-1, 0].set_xlabel("dihedral (°)")
        fig.tight_layout()
        save_figure(fig, out / "dihedral_distributions.png")
        images.append(("Dihedral distributions", "dihedral_distributions.png"))
    fig, ax = plt.subplots(figsize=(7, 3))
    for label, d in zip(labels, distances):
        ax.hist(d.ravel(), bins=200, density=True, histtype="step", label=label)
    ax.set_xlabel("heavy-atom pair distance (Å)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out / "distance_distributions.png")
    images.append(("Heavy-atom distance distributions", "distance_distributions.png"))

    lines = ["# Trajectory comparison", "", "Reference (first): " + labels[0], ""]
    lines += ["| trajectory | frames | time (ps) |", "|---|---|---|"]
    lines += [f"| {t['label']} | {t['n_frames']} | "
              + (f"{t['time_ps'][0]:.3f}–{t['time_ps'][1]:.3f} |" if t.get("time_unit", "ps") == "ps"
                 else "unknown (a bare file without --timestep) |")
              for t in result["trajectories"]]
    lines += ["", "Jensen-Shannon divergence against the first trajectory (base 2: 0 identical, 1 disjoint):", "",
              "| distribution | " + " | ".join(labels[1:]) + " |", "|---|" + "---|" * (len(labels) - 1)]
    for d in result["dihedrals"]:
        lines.append(f"| dihedral {d['name']} | " + " | ".join(f"{v:.3f}" for v in d["js_divergence"]) + " |")
    dist = result["distances"]
    lines.append(f"| {dist['n_pairs']} heavy-atom distances, mean | " +
                 " | ".join(f"{v:.3f}" for v in dist["mean_js_divergence"]) + " |")
    lines.append("| heavy-atom distances, worst pair | " + " | ".join(f"{v:.3f}" for v in dist["max_js_divergence"]) + " |")
    for title, png in images:
        lines += ["", f"## {title}", "", f"![{title}]({png})"]
    runs.atomic_write(out / "compare.md", "\n".join(lines) + "\n")
    runs.atomic_write(out / "compare.json", json.dumps(result, indent=1))
    return out / "compare.md"


def compare_to(specs: List[str], out_dir, top=None, labels=None, overwrite: bool = False) -> Path:
    """Compare trajectories into OUT (OUTPUTS), holding OUT for the whole time; a folder holding any of OUTPUTS
    is refused unless `overwrite`, before the trajectories are read."""
    if labels is not None and len(labels) != len(specs):
        raise ValueError(f"--labels names {len(labels)} trajectories but {len(specs)} were given")
    with runs.exclusive(out_dir, "compare", file=False):
        runs.replace_outputs(out_dir, OUTPUTS, overwrite, "compare")
        loaded = [load_trajectory(s, top, None if not labels else labels[k]) for k, s in enumerate(specs)]
        return write_comparison(compare(loaded), out_dir)
