"""`schnet-md analyze`: structure, conformations, chemistry and energies of one trajectory.

Writes OUT/report.md (with the plots), OUT/summary.json and OUT/*.png: OUTPUTS. One analysis at a time writes
a folder, and a folder that holds any of these files (an earlier analysis too) is replaced only when asked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import mdtraj
import numpy as np

from .. import runs
from ..structures import BondMap
from .dihedrals import (CORE_HALF_WIDTH, STAGGERED, STATE_NAMES, assign_states, conformer_populations,
                        dihedral_angles, rotatable_dihedrals, transitions, backbone_phi_psi)
from .load import LoadedTrajectory, load_trajectory

OUTPUTS = ("report.md", "summary.json", "structure.png", "dihedrals.png", "ramachandran.png", "energy.png")


def analyze(loaded: LoadedTrajectory) -> dict:
    """Every number the report shows, as plain data."""
    traj = loaded.traj
    n = traj.n_frames
    if n == 0:
        raise ValueError(f"{loaded.label}: the trajectory holds no frames")
    heavy = traj.topology.select("not element H")
    out: dict = {"label": loaded.label, "n_frames": n, "n_atoms": traj.n_atoms,
                 "time_ps": [float(traj.time[0]), float(traj.time[-1])]}
    potential = loaded.state["potential_kj_mol"] if loaded.state else None
    if potential is None and loaded.reference_energies_ev is not None:
        potential = loaded.reference_energies_ev * 96.48533212331002
    lowest = int(np.nanargmin(potential)) if potential is not None else 0
    sel = heavy if len(heavy) >= 3 else None
    out["rmsd_to_first_angstrom"] = (10 * mdtraj.rmsd(traj, traj, 0, atom_indices=sel)).tolist()
    out["rmsd_to_lowest_energy_angstrom"] = (10 * mdtraj.rmsd(traj, traj, lowest, atom_indices=sel)).tolist()
    out["lowest_energy_frame"] = lowest if potential is not None else None
    out["radius_of_gyration_angstrom"] = (10 * mdtraj.compute_rg(traj)).tolist()

    quads, names = rotatable_dihedrals(traj.topology, traj.xyz[0])
    angles = dihedral_angles(traj, quads)
    states = np.stack([assign_states(angles[:, k]) for k in range(len(quads))], axis=1) if len(quads) else \
        np.zeros((n, 0), dtype=np.int64)
    labels = [STATE_NAMES[c] for c in STAGGERED]
    out["dihedrals"] = []
    for k, name in enumerate(names):
        trans = transitions(states[:, k])
        out["dihedrals"].append({
            "name": name, "atoms": quads[k].tolist(), "angles_deg": angles[:, k].tolist(),
            "states": states[:, k].tolist(), "n_transitions": len(trans),
            "transitions": [{"frame": t, "time_ps": float(traj.time[t]), "from": labels[a], "to": labels[b]}
                            for t, a, b in trans],
            "state_populations": {labels[s]: float(np.mean(states[:, k] == s)) for s in range(len(labels))},
        })
    out["conformers"] = [{"states": c, "population": p} for c, p in conformer_populations(states)]
    phi, psi, residues = backbone_phi_psi(traj)
    out["backbone"] = [{"residue": r, "phi_deg": phi[:, k].tolist(), "psi_deg": psi[:, k].tolist()}
                       for k, r in enumerate(residues)]
    out["dihedral_state_definition"] = {"centers_deg": list(STAGGERED), "core_half_width_deg": CORE_HALF_WIDTH}

    bond_map = BondMap(traj.topology.to_openmm())
    changes = []
    for t in range(n):
        box = None if traj.unitcell_vectors is None else traj.unitcell_vectors[t] * 10.0
        broken, formed = bond_map.changes(traj.xyz[t].astype(np.float64) * 10.0, box)
        if broken or formed:
            changes.append({"frame": t, "broken": [f"{bond_map.names[i]}-{bond_map.names[j]}" for i, j, _, _ in broken],
                            "formed": [f"{bond_map.names[i]}-{bond_map.names[j]}" for i, j, _ in formed]})
    out["chemistry_changes"] = {"n_frames_changed": len(changes), "first": changes[:5],
                                "bonds_checked": int(len(bond_map.bonds))}

    if loaded.state:
        s = loaded.state
        out["energy"] = {k: s[k].tolist() for k in ("potential_kj_mol", "kinetic_kj_mol", "total_kj_mol", "temperature_k")}
        out["mean_temperature_k"] = float(np.nanmean(s["temperature_k"]))
        ensemble = loaded.run_info.get("settings", {}).get("ensemble")
        if ensemble == "nve" and n > 2:
            slope = np.polyfit(s["time_ps"], s["total_kj_mol"], 1)[0]     # kJ/mol/ps
            out["nve_drift_kj_mol_per_ns_per_atom"] = float(slope * 1000.0 / traj.n_atoms)
    return out


def save_figure(fig, path: Path) -> None:
    """A matplotlib figure as a PNG, written whole or not at all; the figure is closed."""
    import matplotlib.pyplot as plt

    try:
        runs.atomic_write(path, writer=lambda fh: fig.savefig(fh, format="png", dpi=100))
    finally:
        plt.close(fig)


def write_report(summary: dict, traj_time: np.ndarray, out_dir: str | Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t = traj_time
    pngs = []

    fig, ax = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    ax[0].plot(t, summary["rmsd_to_first_angstrom"], label="to first frame")
    if summary["lowest_energy_frame"] is not None:
        ax[0].plot(t, summary["rmsd_to_lowest_energy_angstrom"], label="to lowest-energy frame")
    ax[0].set_ylabel("heavy-atom RMSD (Å)")
    ax[0].legend()
    ax[1].plot(t, summary["radius_of_gyration_angstrom"])
    ax[1].set_ylabel("radius of gyration (Å)")
    ax[1].set_xlabel("time (ps)")
    fig.tight_layout()
    save_figure(fig, out / "structure.png")
    pngs.append(("RMSD and radius of gyration", "structure.png"))

    dihedrals = summary["dihedrals"]
    if dihedrals:
        fig, axes = plt.subplots(len(dihedrals), 2, figsize=(10, 2.2 * len(dihedrals)), squeeze=False,
                                 gridspec_kw={"width_ratios": [3, 1]})
        for k, d in enumerate(dihedrals):
            axes[k, 0].plot(t, d["angles_deg"], ".", ms=2)
            for tr in d["transitions"]:
                axes[k, 0].axvline(tr["time_ps"], color="red", lw=0.6, alpha=0.6)
            axes[k, 0].set_ylim(0, 360)
            axes[k, 0].set_yticks([0, 60, 180, 300, 360])
            axes[k, 0].set_ylabel(d["name"], fontsize=8)
            axes[k, 1].hist(d["angles_deg"], bins=36, range=(0, 360), orientation="horizontal")
            axes[k, 1].set_ylim(0, 360)
        axes[-1, 0].set_xlabel("time (ps); red lines: transitions")
        fig.tight_layout()
        save_figure(fig, out / "dihedrals.png")
        pngs.append(("Rotatable heavy-atom dihedrals", "dihedrals.png"))

    if summary.get("backbone"):
        fig, axes = plt.subplots(1, len(summary["backbone"]), figsize=(4.2 * len(summary["backbone"]), 4), squeeze=False)
        for ax, res in zip(axes[0], summary["backbone"]):
            ax.scatter(res["phi_deg"], res["psi_deg"], s=3, alpha=0.5)
            ax.set_xlim(-180, 180)
            ax.set_ylim(-180, 180)
            ax.set_xlabel("phi (°)")
            ax.set_ylabel("psi (°)")
            ax.set_title(res["residue"])
            ax.axhline(0, color="grey", lw=0.5)
            ax.axvline(0, color="grey", lw=0.5)
        fig.tight_layout()
        save_figure(fig, out / "ramachandran.png")
        pngs.append(("Ramachandran plot (backbone phi/psi)", "ramachandran.png"))

    if "energy" in summary:
        e = summary["energy"]
        fig, ax = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
        ax[0].plot(t, np.array(e["potential_kj_mol"]) - e["potential_kj_mol"][0], label="potential")
        ax[0].plot(t, np.array(e["total_kj_mol"]) - e["total_kj_mol"][0], label="total")
        ax[0].set_ylabel("energy - first value (kJ/mol)")
        ax[0].legend()
        ax[1].plot(t, e["temperature_k"])
        ax[1].set_ylabel("temperature (K)")
        ax[1].set_xlabel("time (ps)")
        fig.tight_layout()
        save_figure(fig, out / "energy.png")
        pngs.append(("Energy and temperature", "energy.png"))

    lines = [f"# Trajectory analysis: {summary['label']}", "",
             f"{summary['n_frames']} frames, {summary['n_atoms']} atoms, {summary['time_ps'][0]:.3f}–"
             f"{summary['time_ps'][1]:.3f} ps.", ""]
    lines += ["| quantity | mean | min | max |", "|---|---|---|---|"]
    for key, name in (("rmsd_to_first_angstrom", "RMSD to first frame (Å)"),
                      ("rmsd_to_lowest_energy_angstrom", "RMSD to lowest-energy frame (Å)"),
                      ("radius_of_gyration_angstrom", "radius of gyration (Å)")):
        v = np.array(summary[key])
        lines.append(f"| {name} | {v.mean():.3f} | {v.min():.3f} | {v.max():.3f} |")
    if "mean_temperature_k" in summary:
        lines.append(f"| temperature (K) | {summary['mean_temperature_k']:.1f} | | |")
    if "nve_drift_kj_mol_per_ns_per_atom" in summary:
        lines += ["", f"NVE total-energy drift: {summary['nve_drift_kj_mol_per_ns_per_atom']:.4g} kJ/mol per ns per atom."]
    ch = summary["chemistry_changes"]
    lines += ["", "## Chemistry", "",
              f"{ch['bonds_checked']} bonds checked in every frame (broken: > 1.5 x sum of covalent radii; formed: "
              f"a non-bonded pair < 1.1 x): " + ("no bond broke or formed." if ch["n_frames_changed"] == 0 else
                                                 f"**{ch['n_frames_changed']} frames changed chemistry**, first: "
                                                 f"{ch['first'][:3]}")]
    lines += ["", "## Conformational transitions", "",
              f"States: cores of +-{summary['dihedral_state_definition']['core_half_width_deg']:g}° around "
              "60° (g+), 180° (t), 300° (g-); a transition is counted only when another core is reached.", "",
              "| dihedral | transitions | g+ | t | g- |", "|---|---|---|---|---|"]
    for d in dihedrals:
        p = d["state_populations"]
        lines.append(f"| {d['name']} | {d['n_transitions']} | {p['g+']:.2f} | {p['t']:.2f} | {p['g-']:.2f} |")
    if not dihedrals:
        lines.append("| (no rotatable heavy-atom dihedral) | | | | |")
    if summary.get("backbone"):
        lines += ["", "## Backbone", "", "Peptide backbone dihedrals (mdtraj's phi C-N-CA-C and psi N-CA-C-N; amide "
                  "C-N bonds are planar and not counted as rotatable above):", "",
                  "| residue | phi mean (°) | psi mean (°) | alpha-R (-160<phi<-20, -120<psi<50) | beta/PPII (phi<-40, psi>90) |",
                  "|---|---|---|---|---|"]
        for res in summary["backbone"]:
            phi, psi = np.array(res["phi_deg"]), np.array(res["psi_deg"])
            alpha = np.mean((phi > -160) & (phi < -20) & (psi > -120) & (psi < 50))
            beta = np.mean((phi < -40) & (psi > 90))
            lines.append(f"| {res['residue']} | {np.degrees(np.angle(np.mean(np.exp(1j * np.radians(phi))))):.0f} | "
                         f"{np.degrees(np.angle(np.mean(np.exp(1j * np.radians(psi))))):.0f} | {alpha:.2f} | {beta:.2f} |")
    lines += ["", "Conformers (combined dihedral states) and populations:", ""]
    lines += [f"- `{c['states']}`: {c['population']:.3f}" for c in summary["conformers"][:10]]
    for title, png in pngs:
        lines += ["", f"## {title}", "", f"![{title}]({png})"]
    runs.atomic_write(out / "report.md", "\n".join(lines) + "\n")
    runs.atomic_write(out / "summary.json", json.dumps(summary, indent=1))
    return out / "report.md"


def analyze_to(spec, out_dir, top: Optional[str] = None, timestep_ps: Optional[float] = None,
               overwrite: bool = False) -> Path:
    """Analyse one trajectory into OUT (OUTPUTS), holding OUT for the whole time; a folder holding any of OUTPUTS
    is refused unless `overwrite`, before the trajectory is read."""
    with runs.exclusive(out_dir, "analyze", file=False):
        runs.replace_outputs(out_dir, OUTPUTS, overwrite, "analyze")
        loaded = load_trajectory(spec, top, timestep_ps=timestep_ps, need_time=True)
        return write_report(analyze(loaded), loaded.traj.time, out_dir)
