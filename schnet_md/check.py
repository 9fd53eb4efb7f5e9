"""`schnet-md check MODEL STRUCTURE`: the robustness suite a model must pass before production MD.

Low test errors say nothing about geometries far from the data, and MD and OpenMM scripts go there: a
minimiser follows the model's gradient wherever it leads, hot MD samples stretched bonds. The checks:

  minimisation   OpenMM's minimizer from the structure: no bond may break or form, and no bond length may
                 change by more than 25 %;
  bond scans     each bond stretched (one end moved along the bond, 0.9x to 2.5x its length): the energy may
                 not fall below the relaxed minimum, and past the equilibrium length it may not fall by more
                 than 1 kcal/mol anywhere (a falling curve is a spurious minimum or a negative barrier); a scan
                 is judged only until the moving atom runs into a third atom (closer than the formed-bond
                 limit) or through one of its own partners (that bond at half its length), where the true
                 energy rises and falls again too;
  molecule scan  every coordinate scaled about the centroid (1x to 2x): never below the relaxed minimum;
  MD             Langevin MD at 300 K and at the given temperature with the blow-up guard (no bond broken or
                 formed, finite energies).

Energies are compared in kcal/mol. The verdict and every number go to JSON.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from . import runs

SCAN_DROP_KCAL = 1.0          # tolerated fall of a stretched bond's energy past its equilibrium length
BOND_CHANGE_LIMIT = 0.25      # largest relative bond-length change a minimisation may make
KJ_PER_KCAL = 4.184


@dataclass
class CheckSettings:
    temperature_k: float = 500.0
    md_steps: int = 2000          # per temperature, 0.5 fs steps
    scan_points: int = 17
    minimizer_iterations: int = 0  # 0: until converged
    platform: str = "CPU"
    seed: int = 1

    def __post_init__(self) -> None:   # refused before the minimisation and scans, not after them
        if not (math.isfinite(self.temperature_k) and self.temperature_k > 0):
            raise ValueError(f"the check temperature must be a finite number of kelvin above 0, got {self.temperature_k}")
        if self.md_steps < 0 or self.scan_points < 2:
            raise ValueError("md_steps must be >= 0 and scan_points >= 2")


def _context(model, structure, platform: str):
    import openmm

    from .export import create_torch_force
    from .simulate import particle_system

    system = particle_system(structure.topology)
    system.addForce(create_torch_force(model, structure.topology, dtype="float64"))
    return openmm.Context(system, openmm.VerletIntegrator(0.0005), openmm.Platform.getPlatformByName(platform))


def _energies_kcal(context, frames_nm) -> np.ndarray:
    from openmm import unit

    out = []
    for x in frames_nm:
        context.setPositions(x)
        out.append(context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
    return np.array(out) / KJ_PER_KCAL


def minimisation(context, structure, iterations: int) -> dict:
    import openmm
    from openmm import unit

    from .structures import BondMap

    context.setPositions(structure.positions_nm)
    e0 = context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole) / KJ_PER_KCAL
    openmm.LocalEnergyMinimizer.minimize(context, 1.0, iterations)
    state = context.getState(getEnergy=True, getPositions=True)
    relaxed = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    e1 = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole) / KJ_PER_KCAL
    bonds = BondMap(structure.topology)
    r0, r1 = structure.positions_nm * 10, relaxed * 10
    lengths0 = np.linalg.norm(r0[bonds.bonds[:, 1]] - r0[bonds.bonds[:, 0]], axis=1)
    lengths1 = np.linalg.norm(r1[bonds.bonds[:, 1]] - r1[bonds.bonds[:, 0]], axis=1)
    change = np.abs(lengths1 / lengths0 - 1) if len(lengths0) else np.zeros(0)
    worst = int(change.argmax()) if len(change) else -1
    broken, formed = bonds.changes(r1, structure.box_nm * 10 if structure.box_nm is not None else None)
    names = bonds.names
    ok = not broken and not formed and (len(change) == 0 or change.max() <= BOND_CHANGE_LIMIT)
    return {"passed": bool(ok), "energy_start_kcal_mol": float(e0), "energy_relaxed_kcal_mol": float(e1),
            "largest_bond_change": float(change.max()) if len(change) else 0.0,
            "largest_bond_change_bond": (f"{names[bonds.bonds[worst, 0]]}-{names[bonds.bonds[worst, 1]]}"
                                         if worst >= 0 else None),
            "broken": [f"{names[i]}-{names[j]} {d:.2f} Å" for i, j, d, _ in broken],
            "formed": [f"{names[i]}-{names[j]} {d:.2f} Å" for i, j, d in formed],
            "relaxed_positions_angstrom": r1.tolist()}, relaxed


def bond_scans(context, structure, relaxed_nm, e_relaxed: float, points: int) -> dict:
    from .structures import BondMap

    bonds = BondMap(structure.topology)
    names = bonds.names
    factors = np.linspace(0.9, 2.5, points)
    rows, worst_drop, worst_below = [], 0.0, 0.0
    for i, j in bonds.bonds.tolist():
        # move the end with fewer bonds (a terminal H moves alone), the rest stays
        degree = np.bincount(bonds.bonds.ravel(), minlength=len(names))
        a, b = (i, j) if degree[j] <= degree[i] else (j, i)
        vector = relaxed_nm[b] - relaxed_nm[a]
        frames = []
        for f in factors:
            x = relaxed_nm.copy()
            x[b] = relaxed_nm[a] + f * vector
            frames.append(x)
        e = _energies_kcal(context, frames)
        # a stretch that drives the moving atom into a third one is a collision, not a dissociation: the true
        # energy rises and falls again there, so the scan is judged only up to that point
        others = np.ones(len(names), dtype=bool) if bonds.bonded is None else ~bonds.bonded[b]   # not b's partners
        others[[a, b]] = False
        reach = np.array([np.min(np.linalg.norm(x[others] - x[b], axis=1) * 10.0 /
                                 (bonds.radii[others] + bonds.radii[b])) if others.any() else np.inf
                          for x in frames])
        partners = [c for c in np.flatnonzero(bonds.bonded[b]) if c not in (a, b)] if bonds.bonded is not None else []
        squeeze = np.array([min([np.linalg.norm(x[c] - x[b]) / np.linalg.norm(relaxed_nm[c] - relaxed_nm[b])
                                 for c in partners], default=np.inf) for x in frames])
        collided = (reach < bonds.form_factor) | (squeeze < 0.5)     # ... or pushed through its own partner
        judged = np.ones(len(factors), dtype=bool)
        if collided.any():
            judged[int(np.argmax(collided)):] = False
        beyond = e[(factors >= 1.0) & judged]
        drop = float(np.max(np.maximum.accumulate(beyond) - beyond)) if len(beyond) else 0.0
        below = float(e_relaxed - e[judged].min()) if judged.any() else 0.0
        worst_drop, worst_below = max(worst_drop, drop), max(worst_below, below)
        rows.append({"bond": f"{names[a]}-{names[b]}", "largest_fall_kcal_mol": drop,
                     "lowest_below_relaxed_kcal_mol": below, "energies_kcal_mol": e.tolist(),
                     "judged_to_factor": float(factors[judged][-1]) if judged.any() else None})
    ok = worst_drop <= SCAN_DROP_KCAL and worst_below <= SCAN_DROP_KCAL
    return {"passed": bool(ok), "factors": factors.tolist(), "largest_fall_kcal_mol": worst_drop,
            "lowest_below_relaxed_kcal_mol": worst_below, "bonds": rows}


def molecule_scan(context, relaxed_nm, e_relaxed: float, points: int) -> dict:
    centre = relaxed_nm.mean(axis=0)
    scales = np.linspace(1.0, 2.0, points)
    e = _energies_kcal(context, [centre + s * (relaxed_nm - centre) for s in scales])
    below = float(e_relaxed - e.min())
    return {"passed": bool(below <= SCAN_DROP_KCAL), "scales": scales.tolist(), "energies_kcal_mol": e.tolist(),
            "lowest_below_relaxed_kcal_mol": below}


def md(model, structure_path, temperature: float, steps: int, platform: str, seed: int) -> dict:
    """Langevin MD with the guard; a committee (comma-joined files) also reports its force disagreement."""
    import csv

    from .simulate import SimulationError, SimulationSettings, run_simulation

    with tempfile.TemporaryDirectory() as tmp:
        settings = SimulationSettings(steps=steps, temperature_k=temperature, report_interval=10,
                                      checkpoint_interval=max(steps, 1), platform=platform, seed=seed,
                                      disagreement_warn=0.0)
        result = {"passed": True, "temperature_k": temperature, "steps": steps}
        try:
            run_simulation(structure_path, model, Path(tmp) / "run", settings, progress=False)
        except SimulationError as err:
            result.update(passed=False, stopped=str(err).splitlines()[0])
        state = Path(tmp) / "run" / "state.csv"
        if state.is_file():
            sigma = [float(r["force_disagreement_kj_mol_nm"]) for r in csv.DictReader(open(state))
                     if r.get("force_disagreement_kj_mol_nm")]
            if sigma:
                result["force_disagreement_kj_mol_nm"] = {"mean": float(np.mean(sigma)), "max": float(np.max(sigma)),
                                                          "along_run": sigma}
        return result


def check(model, structure_path, settings: Optional[CheckSettings] = None, log=print) -> dict:
    """Run every check; returns the report (also what `schnet-md check --json` writes)."""
    from .modelfile import model_at
    from .structures import read_structure

    from .committee import committee_members

    settings = settings or CheckSettings()
    members = committee_members(model) if isinstance(model, str) else [model]
    schnet, _ = model_at(members[0], "float64")
    structure = read_structure(structure_path)
    context = _context(members if len(members) > 1 else schnet, structure, settings.platform)
    report = {"model": str(model), "structure": str(structure_path), "settings": settings.__dict__}
    log("minimisation ...")
    report["minimisation"], relaxed = minimisation(context, structure, settings.minimizer_iterations)
    e_relaxed = report["minimisation"]["energy_relaxed_kcal_mol"]
    if not report["minimisation"]["passed"]:
        relaxed = structure.positions_nm          # scan around the input instead of a broken geometry
        e_relaxed = float(_energies_kcal(context, [relaxed])[0])
    log("bond scans ...")
    report["bond_scans"] = bond_scans(context, structure, relaxed, e_relaxed, settings.scan_points)
    report["molecule_scan"] = molecule_scan(context, relaxed, e_relaxed, settings.scan_points)
    report["md"] = []
    for temperature in sorted({300.0, float(settings.temperature_k)}):
        log(f"MD at {temperature:g} K ...")
        report["md"].append(md(",".join(members) if len(members) > 1 else
                               (model if not hasattr(model, "config") else schnet), structure_path, temperature,
                               settings.md_steps, settings.platform, settings.seed))
    parts = [report["minimisation"]["passed"], report["bond_scans"]["passed"], report["molecule_scan"]["passed"],
             *[m["passed"] for m in report["md"]]]
    report["passed"] = all(parts)
    return report


def format_report(report: dict) -> str:
    m, b, s = report["minimisation"], report["bond_scans"], report["molecule_scan"]
    mark = lambda ok: "pass" if ok else "FAIL"  # noqa: E731
    lines = [f"schnet-md check: {report['model']} on {report['structure']}",
             f"  [{mark(m['passed'])}] minimisation: energy {m['energy_start_kcal_mol']:.2f} -> "
             f"{m['energy_relaxed_kcal_mol']:.2f} kcal/mol, largest bond change {100 * m['largest_bond_change']:.1f}% "
             f"({m['largest_bond_change_bond']})"
             + (f"; broken {', '.join(m['broken'][:3])}" if m["broken"] else "")
             + (f"; formed {', '.join(m['formed'][:3])}" if m["formed"] else ""),
             f"  [{mark(b['passed'])}] bond scans (0.9-2.5x): largest fall past equilibrium "
             f"{b['largest_fall_kcal_mol']:.2f} kcal/mol, lowest point {b['lowest_below_relaxed_kcal_mol']:.2f} "
             "kcal/mol below the relaxed minimum",
             f"  [{mark(s['passed'])}] molecule scan (1-2x): lowest point {s['lowest_below_relaxed_kcal_mol']:.2f} "
             "kcal/mol below the relaxed minimum"]
    for r in report["md"]:
        sigma = r.get("force_disagreement_kj_mol_nm")
        lines.append(f"  [{mark(r['passed'])}] MD {r['steps']} steps at {r['temperature_k']:g} K"
                     + (f": {r['stopped']}" if not r["passed"] else "")
                     + (f"; committee force disagreement mean {sigma['mean']:.0f}, max {sigma['max']:.0f} kJ/mol/nm"
                        if sigma else ""))
    lines.append("verdict: " + ("passed" if report["passed"] else "FAILED: do not run production MD with this "
                                "model here (refine it on the failing geometries)"))
    return "\n".join(lines)


def write_json(report: dict, path) -> None:
    runs.atomic_write(path, json.dumps(report, indent=1, default=lambda o: o if not isinstance(o, float)
                                       or math.isfinite(o) else None))
