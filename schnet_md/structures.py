"""Structures: PDB, PDBx/mmCIF or XYZ files read into an OpenMM Topology plus positions (nm)."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import openmm.app as app
from openmm import Vec3, unit

from . import elements as _elements
from .units import NM_PER_ANGSTROM

# Single-bond covalent radii in Å (Cordero et al., Dalton Trans. 2008); C is the sp3 value.
COVALENT_RADII = {1: 0.31, 3: 1.28, 5: 0.84, 6: 0.76, 7: 0.71, 8: 0.66, 9: 0.57, 11: 1.66, 12: 1.41,
                  14: 1.11, 15: 1.07, 16: 1.05, 17: 1.02, 19: 2.03, 20: 1.76, 35: 1.20, 53: 1.39}
BOND_TOLERANCE = 1.2  # a pair is bonded when closer than 1.2 x the sum of covalent radii


@dataclass
class Structure:
    topology: app.Topology
    positions_nm: np.ndarray            # [n_atoms, 3]
    source: str = ""

    @property
    def n_atoms(self) -> int:
        return self.topology.getNumAtoms()

    @property
    def atomic_numbers(self) -> np.ndarray:
        return np.array([a.element.atomic_number for a in self.topology.atoms()], dtype=np.int64)

    @property
    def box_nm(self) -> Optional[np.ndarray]:
        box = self.topology.getPeriodicBoxVectors()
        return None if box is None else np.array(box.value_in_unit(unit.nanometer), dtype=np.float64)

    def openmm_positions(self):
        return [Vec3(*map(float, p)) for p in self.positions_nm] * unit.nanometer


OVERLAP_ANGSTROM = 0.5        # two atoms closer than this are one atom typed twice, not a molecule
FARTHEST_ANGSTROM = 1.0e5     # coordinates beyond 10 µm are a unit mix-up or a broken file


def read_structure(path: str | Path) -> Structure:
    """Read PDB (.pdb), PDBx/mmCIF (.cif, .pdbx) or XYZ (.xyz, extended XYZ Lattice= honoured).

    Residues whose file declares no bonds (a PDB ligand without CONECT records) get bonds from their
    geometry (covalent radii, minimum image in a periodic box), so the topology - and the blow-up guard
    that compares against it - knows the molecule's chemistry. Overlapping atoms, coordinates far out of
    range and files cut short are refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"structure file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".xyz":
        structure = read_xyz(path)
        check_geometry(structure)
        return structure
    if suffix == ".pdb":
        _check_pdb_lines(path)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if suffix == ".pdb":
                f = app.PDBFile(str(path))
            elif suffix in (".cif", ".pdbx"):
                f = app.PDBxFile(str(path))
            else:
                raise ValueError(f"{path}: unknown structure format {suffix!r} (use .pdb, .cif or .xyz)")
        duplicates = [str(w.message) for w in caught if "duplicate atom" in str(w.message)]
        if duplicates:   # OpenMM's reader keeps one of two same-named atoms and only warns: the file is wrong
            raise ValueError(f"{path}: {len(duplicates)} duplicated atom(s) (same name in one residue), e.g. "
                             f"{duplicates[0].replace('WARNING: ', '')}")
        for w in caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    except ValueError as err:
        raise ValueError(f"{path}: cannot read structure: {err}") from None
    except Exception as err:   # OpenMM's readers raise assorted errors on damaged files
        raise ValueError(f"{path}: cannot read structure ({type(err).__name__}: {err})") from None
    positions = np.array(f.getPositions(asNumpy=True).value_in_unit(unit.nanometer), dtype=np.float64)
    for atom in f.topology.atoms():
        if atom.element is None:
            raise ValueError(f"{path}: atom {atom.name} (residue {atom.residue.name} {atom.residue.id}) has "
                             "no recognisable element; set the element column")
    if positions.shape[0] == 0:
        raise ValueError(f"{path}: no atoms")
    _check_finite(positions, path)
    structure = Structure(f.topology, positions, str(path))
    add_missing_bonds(structure)
    check_geometry(structure)
    return structure


def _check_pdb_lines(path: Path) -> None:
    """A PDB atom record ends its coordinates at column 54; a shorter one was cut off."""
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if line.startswith(("ATOM", "HETATM")) and len(line.rstrip()) < 54:
            raise ValueError(f"{path}: line {number} is cut short ({len(line.rstrip())} characters; an atom record "
                             "has its coordinates in columns 31-54): is the file complete?")


def add_missing_bonds(structure: Structure) -> int:
    """Give every residue whose atoms have no bonds at all the bonds its geometry implies; returns how many."""
    top = structure.topology
    bonded = set()
    for a, b in top.bonds():
        bonded.update((a.index, b.index))
    box = structure.box_nm
    added = 0
    for residue in top.residues():
        atoms = list(residue.atoms())
        if len(atoms) < 2 or any(a.index in bonded for a in atoms):
            continue
        idx = np.array([a.index for a in atoms])
        z = [a.element.atomic_number for a in atoms]
        for i, j in infer_bonds(z, structure.positions_nm[idx] * 10.0, None if box is None else box * 10.0):
            top.addBond(atoms[i], atoms[j])
            added += 1
    return added


def check_geometry(structure: Structure) -> None:
    r = structure.positions_nm * 10.0
    far = np.abs(r).max()
    if far > FARTHEST_ANGSTROM:
        k = int(np.abs(r).max(axis=1).argmax())
        raise ValueError(f"{structure.source}: atom {k + 1} sits {far:.3g} Å from the origin: a unit mix-up or a "
                         "damaged file?")
    if len(r) > 1:
        from scipy.spatial import cKDTree

        pairs = cKDTree(r).query_pairs(OVERLAP_ANGSTROM, output_type="ndarray")
        if len(pairs):
            i, j = (int(v) for v in pairs[0])
            d = float(np.linalg.norm(r[i] - r[j]))
            raise ValueError(f"{structure.source}: atoms {i + 1} and {j + 1} overlap ({d:.3f} Å apart; "
                             f"{len(pairs)} such pair(s)): a duplicated atom?")


def read_xyz(path: str | Path) -> Structure:
    """Read the first frame of an XYZ file (Å). An extended-XYZ `Lattice="..."` becomes the box."""
    path = Path(path)
    lines = path.read_text().splitlines()
    try:
        n = int(lines[0].split()[0])
        comment = lines[1]
        rows = [lines[2 + k].split() for k in range(n)]
        symbols = [r[0] for r in rows]
        xyz = np.array([[float(v) for v in r[1:4]] for r in rows], dtype=np.float64)
    except (IndexError, ValueError):
        raise ValueError(f"{path}: not a valid XYZ file (atom count line, comment line, then "
                         "'Element x y z' lines)") from None
    rest = [line for line in lines[2 + n:] if line.strip()]
    if rest and not rest[0].split()[0].isdigit():
        raise ValueError(f"{path}: the count line says {n} atoms, but more atom lines follow ({rest[0].strip()!r}); "
                         "fix the count")
    numbers = [_elements.atomic_number(s) if not s.isdigit() else int(s) for s in symbols]
    _check_finite(xyz, path)
    box = None
    match = re.search(r'Lattice="([^"]+)"', comment)
    if match:
        box = np.array([float(v) for v in match.group(1).split()]).reshape(3, 3) * NM_PER_ANGSTROM
    return Structure(molecule_topology(numbers, xyz, box_nm=box), xyz * NM_PER_ANGSTROM, str(path))


def molecule_topology(atomic_numbers: Sequence[int], positions_angstrom: np.ndarray | None = None,
                      residue_name: str = "MOL", box_nm: np.ndarray | None = None) -> app.Topology:
    """A one-residue Topology with atoms named by element and index (C1, C2, H1, ...); bonds are
    inferred from covalent radii when positions are given."""
    top = app.Topology()
    residue = top.addResidue(residue_name, top.addChain())
    counts: dict = {}
    atoms = []
    for z in atomic_numbers:
        el = app.Element.getByAtomicNumber(int(z))
        counts[el.symbol] = counts.get(el.symbol, 0) + 1
        atoms.append(top.addAtom(f"{el.symbol}{counts[el.symbol]}", el, residue))
    if positions_angstrom is not None:
        box_angstrom = None if box_nm is None else np.asarray(box_nm) * 10.0
        for i, j in infer_bonds(atomic_numbers, positions_angstrom, box_angstrom):
            top.addBond(atoms[i], atoms[j])
    if box_nm is not None:
        top.setPeriodicBoxVectors([Vec3(*map(float, v)) for v in box_nm] * unit.nanometer)
    return top


def infer_bonds(atomic_numbers: Sequence[int], positions_angstrom: np.ndarray,
                box_angstrom: Optional[np.ndarray] = None) -> List[Tuple[int, int]]:
    """Pairs closer than BOND_TOLERANCE x the sum of their covalent radii (minimum image in a box, so a
    molecule wrapped across the box edge keeps its bonds)."""
    from scipy.spatial import cKDTree

    z = np.asarray(atomic_numbers)
    r = np.asarray(positions_angstrom, dtype=np.float64)
    radii = np.array([COVALENT_RADII.get(int(v), 1.5) for v in z])
    reach = BOND_TOLERANCE * 2 * radii.max()
    box = None if box_angstrom is None else np.asarray(box_angstrom, dtype=np.float64)
    if box is None:
        candidates = cKDTree(r).query_pairs(reach, output_type="ndarray")
    elif np.allclose(box, np.diag(np.diag(box))):
        lengths = np.diag(box)
        candidates = cKDTree(r % lengths, boxsize=lengths).query_pairs(reach, output_type="ndarray")
    else:   # triclinic: every pair, by minimum image
        i, j = np.triu_indices(len(r), k=1)
        candidates = np.stack([i, j], axis=1)
    if len(candidates) == 0:
        return []
    i, j = candidates[:, 0], candidates[:, 1]
    d = np.linalg.norm(minimum_image_np(r[j] - r[i], box), axis=1)
    bonded = d < BOND_TOLERANCE * (radii[i] + radii[j])
    pairs = sorted((int(a), int(b)) if a < b else (int(b), int(a)) for a, b in zip(i[bonded], j[bonded]))
    return pairs


class BondMap:
    """The bonds of a topology and the covalent-radius limits that say when chemistry changed: a bond
    is broken beyond `break_factor` x the sum of covalent radii, a non-bonded pair closer than
    `form_factor` x that sum has formed a bond (the criteria the iso17x data set was checked with)."""

    def __init__(self, topology: app.Topology, break_factor: float = 1.5, form_factor: float = 1.1):
        atoms = list(topology.atoms())
        self.names = [f"{a.residue.name}{a.residue.id}:{a.name}" for a in atoms]
        self.radii = np.array([COVALENT_RADII.get(a.element.atomic_number, 1.5) if a.element else 1.5
                               for a in atoms])
        self.bonds = np.array([(b[0].index, b[1].index) for b in topology.bonds()], dtype=np.int64).reshape(-1, 2)
        self.break_limit = break_factor * (self.radii[self.bonds[:, 0]] + self.radii[self.bonds[:, 1]])
        self.form_factor = form_factor
        n = len(atoms)
        self.bonded = None
        if n <= 2000:   # the formed-bond test looks at all pairs: only for systems small enough
            self.bonded = np.eye(n, dtype=bool)
            self.bonded[self.bonds[:, 0], self.bonds[:, 1]] = self.bonded[self.bonds[:, 1], self.bonds[:, 0]] = True

    def changes(self, positions_angstrom: np.ndarray, box_angstrom: Optional[np.ndarray] = None):
        """(broken: [(i, j, distance, limit)], formed: [(i, j, distance)]) for one frame (Å)."""
        r = positions_angstrom
        broken, formed = [], []
        if len(self.bonds):
            d = np.linalg.norm(minimum_image_np(r[self.bonds[:, 1]] - r[self.bonds[:, 0]], box_angstrom), axis=1)
            for k in np.nonzero(d > self.break_limit)[0]:
                broken.append((int(self.bonds[k, 0]), int(self.bonds[k, 1]), float(d[k]), float(self.break_limit[k])))
        if self.bonded is not None:
            v = minimum_image_np((r[None, :, :] - r[:, None, :]).reshape(-1, 3), box_angstrom).reshape(len(r), len(r), 3)
            d = np.linalg.norm(v, axis=-1)
            close = (d < self.form_factor * (self.radii[:, None] + self.radii[None, :])) & ~self.bonded
            for i, j in np.argwhere(np.triu(close)):
                formed.append((int(i), int(j), float(d[i, j])))
        return broken, formed


def minimum_image_np(vectors: np.ndarray, box: Optional[np.ndarray]) -> np.ndarray:
    """numpy twin of schnet_md.neighbors.minimum_image for a reduced box (rows a, b, c), or no box."""
    if box is None:
        return vectors
    for axis in (2, 1, 0):
        vectors = vectors - np.round(vectors[:, axis:axis + 1] / box[axis, axis]) * box[axis]
    return vectors


def select_atoms(structure: Structure, selection: str) -> np.ndarray:
    """Indices of the atoms matched by an mdtraj selection ('resname MOL', 'index 0 to 8', 'all')."""
    import mdtraj

    try:
        indices = mdtraj.Topology.from_openmm(structure.topology).select(selection)
    except Exception as err:  # mdtraj raises its own parser errors
        raise ValueError(f"cannot parse atom selection {selection!r}: {err}") from None
    if len(indices) == 0:
        raise ValueError(f"atom selection {selection!r} matches no atom of {structure.source}")
    return np.asarray(indices, dtype=np.int64)


def write_pdb(topology: app.Topology, positions_nm: np.ndarray, path: str | Path) -> None:
    with open(path, "w") as fh:
        app.PDBFile.writeFile(topology, [Vec3(*map(float, p)) for p in positions_nm] * unit.nanometer, fh,
                              keepIds=True)


def _check_finite(positions: np.ndarray, path) -> None:
    if not np.isfinite(positions).all():
        raise ValueError(f"{path}: coordinates contain NaN or infinite values")
