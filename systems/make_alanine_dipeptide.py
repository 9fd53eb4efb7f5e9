"""Build systems/alanine-dipeptide/alanine-dipeptide.pdb (ACE-ALA-NME) from standard internal coordinates.

Heavy atoms are placed from textbook peptide geometry (bond lengths, angles, trans peptide bonds,
phi = -70°, psi = 140°), hydrogens added with OpenMM's Modeller and amber14 templates, then the
structure is minimised with amber14 in vacuum. Run: python systems/make_alanine_dipeptide.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openmm
import openmm.app as app
from openmm import unit

HERE = Path(__file__).resolve().parent


def place(a, b, c, bond, angle_deg, dihedral_deg):
    """Position of atom d with |cd| = bond, angle b-c-d and dihedral a-b-c-d (natural extension reference frame)."""
    angle, dihedral = np.radians(angle_deg), np.radians(dihedral_deg)
    bc = (c - b) / np.linalg.norm(c - b)
    n = np.cross(b - a, bc)
    n /= np.linalg.norm(n)
    m = np.cross(n, bc)
    d2 = np.array([-bond * np.cos(angle), bond * np.sin(angle) * np.cos(dihedral), bond * np.sin(angle) * np.sin(dihedral)])
    return c + d2[0] * bc + d2[1] * m + d2[2] * n


def heavy_atoms(phi=-70.0, psi=140.0):
    x = {}
    x["ACE", "CH3"] = np.array([0.0, 0.0, 0.0])
    x["ACE", "C"] = np.array([1.52, 0.0, 0.0])
    x["ALA", "N"] = place(np.array([0.0, 1.0, 0.0]), x["ACE", "CH3"], x["ACE", "C"], 1.33, 116.0, 180.0)
    x["ACE", "O"] = place(x["ALA", "N"], x["ACE", "CH3"], x["ACE", "C"], 1.23, 121.0, 180.0)
    x["ALA", "CA"] = place(x["ACE", "CH3"], x["ACE", "C"], x["ALA", "N"], 1.46, 122.0, 180.0)   # omega
    x["ALA", "C"] = place(x["ACE", "C"], x["ALA", "N"], x["ALA", "CA"], 1.52, 111.0, phi)
    x["ALA", "CB"] = place(x["ALA", "C"], x["ALA", "N"], x["ALA", "CA"], 1.53, 110.0, -122.5)
    x["NME", "N"] = place(x["ALA", "N"], x["ALA", "CA"], x["ALA", "C"], 1.33, 116.0, psi)
    x["ALA", "O"] = place(x["NME", "N"], x["ALA", "CA"], x["ALA", "C"], 1.23, 121.0, 180.0)
    x["NME", "C"] = place(x["ALA", "CA"], x["ALA", "C"], x["NME", "N"], 1.46, 122.0, 180.0)      # omega
    return x


def build() -> Path:
    coords = heavy_atoms()
    top = app.Topology()
    chain = top.addChain()
    atoms = {}
    for resname, names in (("ACE", ["CH3", "C", "O"]), ("ALA", ["N", "CA", "CB", "C", "O"]), ("NME", ["N", "C"])):
        residue = top.addResidue(resname, chain)
        for name in names:
            element = app.element.Element.getBySymbol(name[0])
            atoms[resname, name] = top.addAtom(name, element, residue)
    for a, b in [(("ACE", "CH3"), ("ACE", "C")), (("ACE", "C"), ("ACE", "O")), (("ACE", "C"), ("ALA", "N")),
                 (("ALA", "N"), ("ALA", "CA")), (("ALA", "CA"), ("ALA", "CB")), (("ALA", "CA"), ("ALA", "C")),
                 (("ALA", "C"), ("ALA", "O")), (("ALA", "C"), ("NME", "N")), (("NME", "N"), ("NME", "C"))]:
        top.addBond(atoms[a], atoms[b])
    positions = [openmm.Vec3(*(coords[key] / 10.0)) for key in atoms] * unit.nanometer
    forcefield = app.ForceField("amber14-all.xml")
    modeller = app.Modeller(top, positions)
    modeller.addHydrogens(forcefield)
    system = forcefield.createSystem(modeller.topology, nonbondedMethod=app.NoCutoff)
    simulation = app.Simulation(modeller.topology, system, openmm.VerletIntegrator(0.001),
                                openmm.Platform.getPlatformByName("Reference"))
    simulation.context.setPositions(modeller.positions)
    simulation.minimizeEnergy(tolerance=1.0)
    state = simulation.context.getState(getPositions=True, getEnergy=True)
    out = HERE / "alanine-dipeptide"
    out.mkdir(exist_ok=True)
    with open(out / "alanine-dipeptide.pdb", "w") as fh:
        app.PDBFile.writeFile(modeller.topology, state.getPositions(), fh)
    import mdtraj

    minimised = mdtraj.load(str(out / "alanine-dipeptide.pdb"))
    phi = float(np.degrees(mdtraj.compute_phi(minimised)[1][0, 0]))
    psi = float(np.degrees(mdtraj.compute_psi(minimised)[1][0, 0]))
    (out / "README.md").write_text(
        "# alanine-dipeptide (ACE-ALA-NME, C6H12N2O2, 22 atoms)\n\n"
        "Source: built by `python systems/make_alanine_dipeptide.py` from standard peptide geometry (trans peptide "
        "bonds, phi -70°, psi 140°), hydrogens from OpenMM's Modeller with amber14 templates, minimised with "
        f"amber14 in vacuum (final energy {state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole):.1f} "
        f"kJ/mol; it settles at phi {phi:.0f}°, psi {psi:.0f}°, the C7eq basin). Used by the ML/MM demonstration "
        "(benchmarks/mlmm.py).\n")
    return out / "alanine-dipeptide.pdb"


if __name__ == "__main__":
    print(build())
