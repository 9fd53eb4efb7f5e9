"""Data sets of labelled structures, read once into the model's units (Å and a declared energy unit).

A `Dataset` stores frames one after another (ragged), so molecules of different sizes batch together:
frame k is atoms offsets[k]:offsets[k+1].
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import units
from .neighbors import batched_unique_pairs, unique_pairs
from .runs import file_sha256

# What a training frame may hold, in Å. The project's data has its closest pair at 0.86 Å (iso17x; rMD17 0.88,
# QM9 0.96), its refinement frames H-H pinches down to 0.64 Å (H2's bond is 0.74 Å), and its farthest
# coordinate at 201 Å (rMD17 benzene, never centred).
MIN_DISTANCE = 0.3      # closer is one site twice: a duplicated atom, or lengths in nm read as Å (C-H 0.109 nm)
MAX_COORDINATE = 1e4    # 50x the farthest in the data, where float32 (training) still resolves 0.001 Å; beyond:
                        # lengths in the wrong unit or scaled

ENERGY_ONLY = "to use the energies alone, pass --energy-only (or energy_only = true under a training config's [data])"

# every array of each npz format, read or not; any other array is named in a note (a misspelt one is not used)
RMD17_ARRAYS = ("nuclear_charges", "coords", "energies", "forces", "old_energies", "old_forces", "old_indices",
                "method")   # (method: in files `schnet-md label` writes)
ISO17X_ARRAYS = ("Z", "R", "E", "F", "mol", "step", "eq", "mol_qm9_index", "mol_smiles")
QM9_ARRAYS = ("Z", "R", "offsets", "U0_Ha", "index")


class DataError(ValueError):
    """A data file that is missing, malformed or holds values that cannot be trained on."""


# Label sets a reader can name, each with the energy zero its energies are measured from (what a model's
# per-element reference energies are fitted to). Two sets differ by more than noise: MD17's and rMD17's
# energies of the same ethanol frames lie ~120 kcal/mol apart.
LABEL_SETS = {
    "rMD17": "PBE/def2-SVP total energies from ORCA (revised MD17)",
    "MD17": "PBE+vdW-TS total energies from FHI-aims (original MD17)",
    "GFN2-xTB": "GFN2-xTB total energies from tblite (iso17x; schnet-md label and sample)",
    "PBE/def2-SVP (PySCF)": "PBE/def2-SVP total energies from PySCF (rMD17's level of theory, another constant)",
    "QM9 U0": "B3LYP/6-31G(2df,p) internal energies at 0 K (QM9)",
    "ASE file": "the energies an ASE-readable file holds (their method is not recorded)",
}
LABEL_SET_OF_METHOD = {"GFN2-xTB": "GFN2-xTB", "PBE/def2-SVP": "PBE/def2-SVP (PySCF)"}   # schnet-md label --method


def compare_labels(model_name: str, trained_on: str, data: "Dataset") -> Optional[Tuple[str, str]]:
    """None when `data` holds the labels a model was trained on; ("note", why it cannot be told) when the model
    or the data do not say; ("mismatch", what differs) when they are other labels, on another energy zero."""
    def named(label_set: str) -> str:
        return f"{label_set} labels ({LABEL_SETS.get(label_set, 'a label set this schnet-md does not know')})"

    if not trained_on:
        return "note", (f"{model_name} does not record the labels it was trained on (a model file from before they "
                        f"were recorded), so whether they are those of {data.source} is not checked")
    if not data.label_set:
        return "note", (f"{data.source} does not say which labels it holds, so whether they are those {model_name} "
                        f"was trained on ({trained_on}) is not checked")
    if data.label_set == trained_on:
        return None
    return "mismatch", f"{model_name} was trained on {named(trained_on)}, but {data.source} holds {named(data.label_set)}"


@dataclass
class Dataset:
    atomic_numbers: np.ndarray          # [n_atoms_total] int64
    positions: np.ndarray               # [n_atoms_total, 3] Å
    offsets: np.ndarray                 # [n_frames + 1] int64
    energies: np.ndarray                # [n_frames] energy_unit
    forces: Optional[np.ndarray]        # [n_atoms_total, 3] energy_unit/Å, or None
    energy_unit: str
    source: str = ""
    sha256: str = ""
    weights: Optional[np.ndarray] = None  # [n_frames] loss weight of each frame (None: all 1)
    label_set: str = ""                 # a key of LABEL_SETS; "" when the file does not say

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_atoms(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def elements(self) -> List[int]:
        return sorted(int(z) for z in np.unique(self.atomic_numbers))

    def frame(self, k: int):
        a, b = self.offsets[k], self.offsets[k + 1]
        return self.atomic_numbers[a:b], self.positions[a:b], self.energies[k], (
            None if self.forces is None else self.forces[a:b])

    def subset(self, indices) -> "Dataset":
        indices = np.asarray(indices, dtype=np.int64)
        counts = self.n_atoms[indices]
        atom_index = np.concatenate([np.arange(self.offsets[k], self.offsets[k + 1]) for k in indices]) \
            if len(indices) else np.zeros(0, dtype=np.int64)
        return Dataset(self.atomic_numbers[atom_index], self.positions[atom_index],
                       np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), self.energies[indices],
                       None if self.forces is None else self.forces[atom_index],
                       self.energy_unit, self.source, self.sha256,
                       None if self.weights is None else self.weights[indices], self.label_set)

    def converted(self, energy_unit: str) -> "Dataset":
        """The same frames with energies (and forces) in another unit."""
        f = units.energy_factor(self.energy_unit, energy_unit)
        return Dataset(self.atomic_numbers, self.positions, self.offsets, self.energies * f,
                       None if self.forces is None else self.forces * f, energy_unit, self.source, self.sha256,
                       self.weights, self.label_set)

    def weighted(self, weights) -> "Dataset":
        """The same frames with per-frame loss weights (e.g. refinement frames far from the data)."""
        weights = np.asarray(weights, dtype=np.float64).reshape(-1)
        if weights.shape != (len(self),) or not np.isfinite(weights).all() or (weights < 0).any():
            raise DataError(f"{self.source}: need {len(self)} finite, non-negative frame weights")
        digest = hashlib.sha256(self.sha256.encode() + weights.tobytes()).hexdigest()  # weights change training
        return Dataset(self.atomic_numbers, self.positions, self.offsets, self.energies, self.forces,
                       self.energy_unit, self.source, digest, weights, self.label_set)


def _npz_names(path: Path) -> List[str]:
    """The array names of an npz file, or a clear error for a missing or damaged one."""
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    try:
        with np.load(path) as npz:
            return list(npz.files)
    except Exception as err:   # OSError, EOFError, zipfile.BadZipFile: a damaged or cut file
        raise _damaged(path, err) from None


def _damaged(path: Path, err: Exception) -> DataError:
    return DataError(f"{path} is not a readable npz file (damaged or cut short?): {err}")


def _read_npz(path: Path, keys, known=(), optional=()) -> dict:
    """The named arrays of an npz file, with clear errors for a missing, unreadable or incomplete file, and a
    one-line note naming the arrays it holds that are neither in `keys` nor in `known` (they are not used).
    `optional`: arrays read too where the file has them."""
    names = _npz_names(path)
    missing = [k for k in keys if k not in names]
    if missing:
        raise DataError(f"{path}: missing key(s) {', '.join(missing)} (has: {', '.join(names)})")
    try:
        with np.load(path) as npz:
            arrays = {k: np.asarray(npz[k]) for k in [*keys, *(k for k in optional if k in names)]}
    except Exception as err:   # OSError, EOFError, zipfile.BadZipFile, zlib.error: a damaged or cut file
        raise _damaged(path, err) from None
    unknown = [k for k in names if k not in keys and k not in known]
    if unknown:
        warnings.warn(f"{path}: array(s) {', '.join(unknown)} ignored: not part of the format (read: "
                      f"{', '.join(keys)})", stacklevel=3)
    return arrays


def read_rmd17(path: str | Path, labels: str = "new", energy_only: bool = False) -> Dataset:
    """Read an rMD17 npz file (Å, kcal/mol). labels='new' gives the revised (rMD17) labels,
    labels='old' the original MD17 labels of the same frames. energy_only: leave the forces out (and need none)."""
    path = Path(path)
    if labels not in ("new", "old"):
        raise ValueError("labels must be 'new' (rMD17) or 'old' (original MD17)")
    e_key, f_key = ("energies", "forces") if labels == "new" else ("old_energies", "old_forces")
    keys = ["nuclear_charges", "coords", e_key] + ([] if energy_only else [f_key])
    arrays = _read_npz(path, keys, RMD17_ARRAYS, optional=["method", "energies", "old_energies"])
    z = arrays["nuclear_charges"]
    r, e = (arrays[k].astype(np.float64) for k in ("coords", e_key))
    f = None if energy_only else arrays[f_key].astype(np.float64)
    if r.ndim != 3 or r.shape[1:] != (z.shape[0], 3):
        raise DataError(f"{path}: coords has shape {r.shape}, expected (n_frames, {z.shape[0]}, 3)")
    if e.shape != (r.shape[0],):
        raise DataError(f"{path}: {e_key} has shape {e.shape}, expected ({r.shape[0]},)")
    if f is not None and f.shape != r.shape:
        raise DataError(f"{path}: {f_key} has shape {f.shape}, expected {r.shape}")
    names = {"atomic_numbers": "nuclear_charges", "positions": "coords", "energies": e_key, "forces": f_key}
    return _from_frames(z, r, e, f, "kcal/mol", f"{path.name} ({labels} labels)", file_sha256(path), str(path),
                        _rmd17_label_set(arrays, labels), names)


def _rmd17_label_set(arrays: dict, labels: str) -> str:
    """rMD17's revised or MD17's original labels, or, in a file `schnet-md label` wrote (one set, stored as both),
    its method; "" for such a file from before the method was recorded."""
    if "method" in arrays:
        return LABEL_SET_OF_METHOD.get(str(arrays["method"]), "")
    if "energies" in arrays and "old_energies" in arrays and np.array_equal(arrays["energies"], arrays["old_energies"]):
        return ""
    return "rMD17" if labels == "new" else "MD17"


ISO17X_SPLITS = ("train", "validation", "train_known", "test_within", "test_other", "eq_known", "eq_other", "all")
ISO17X_SPLIT_ARRAYS = ISO17X_SPLITS[:-1] + ("known_mols", "unknown_mols")    # the last two: isomer ids
# splits that must share no frame: what is trained on (train_known = train + validation, for a final fit) with what
# is validated or tested on
ISO17X_DISJOINT = (("train", "validation"),) + tuple((a, b) for a in ("train", "validation", "train_known")
                                                    for b in ("test_within", "test_other", "eq_known", "eq_other"))


def read_iso17x(path: str | Path, split: str = "train", energy_only: bool = False) -> Dataset:
    """The ISO17-style C7O2H10 set (GFN2-xTB labels; Å, eV). `path` is the iso17x folder or its
    iso17x.npz (splits.npz beside it); `split` names one of its index arrays, or 'all'. energy_only: leave the
    forces out (and need none)."""
    path = Path(path)
    npz_path = path / "iso17x.npz" if path.is_dir() else path
    if split not in ISO17X_SPLITS:
        raise ValueError(f"unknown iso17x split {split!r}; choose one of {', '.join(ISO17X_SPLITS)}")
    arrays = _read_npz(npz_path, ["Z", "R", "E"] + ([] if energy_only else ["F"]), ISO17X_ARRAYS)
    z, r, e = (arrays[k] for k in ("Z", "R", "E"))
    f = None if energy_only else arrays["F"]
    index = np.arange(len(r))
    if split != "all":
        index = _read_splits(npz_path.parent / "splits.npz", split, len(r))
        z, r, e = z[index], r[index], e[index]
        f = None if f is None else f[index]
    return _from_frames(z, r, e, f, "eV", f"{npz_path.name} [{split}]", file_sha256(npz_path), str(npz_path),
                        "GFN2-xTB", {"atomic_numbers": "Z", "positions": "R", "energies": "E", "forces": "F"}, index)


def _read_splits(path: Path, split: str, n_frames: int) -> np.ndarray:
    """The frame indices of `split`, once every index array of the split file is checked: whole numbers (not
    truncated), none negative (numpy would count it from the end), none beyond the data, none repeated, and no
    frame both trained on and validated or tested on."""
    names = _npz_names(path)
    splits = _read_npz(path, [split] + [k for k in ISO17X_SPLITS[:-1] if k in names and k != split],
                       ISO17X_SPLIT_ARRAYS)
    problems, members = [], {}
    for name, index in splits.items():
        if index.ndim != 1:
            problems.append(f"{path}: {name} has shape {index.shape}, expected a flat list of frame indices")
            continue
        checks = [(_not_whole(index), "are not whole numbers"),
                  (index < 0, "are negative (numpy would count them from the end)"),
                  (index >= n_frames, f"lie beyond the last frame of the data ({n_frames - 1})")]
        found = [f"{path}: {name}: {int(bad.sum())} indices {what}, e.g. {_examples(index[bad])}"
                 for bad, what in checks if bad.any()]
        problems += found
        if found:
            continue            # (repeats and shared frames are looked for among valid indices)
        counts = np.bincount(index.astype(np.int64), minlength=n_frames)
        if (counts > 1).any():
            problems.append(f"{path}: {name}: {int((counts > 1).sum())} indices are repeated, e.g. "
                            f"{_examples(np.flatnonzero(counts > 1))}")
        members[name] = counts > 0
    for a, b in ISO17X_DISJOINT:
        if a in members and b in members:
            shared = np.flatnonzero(members[a] & members[b])
            if len(shared):
                problems.append(f"{path}: {a} and {b} share {len(shared)} frames, e.g. {_examples(shared)}: "
                                "training, validation and test frames must differ")
    if problems:
        raise DataError("\n".join(problems))
    return splits[split].astype(np.int64)


def read_qm9(path: str | Path, indices=None) -> Dataset:
    """QM9 U0 energies (Hartree, no forces) of the molecules at `indices` (default: all)."""
    path = Path(path)
    arrays = _read_npz(path, ["Z", "R", "offsets", "U0_Ha"], QM9_ARRAYS)
    z, r, offsets, e = (arrays[k] for k in ("Z", "R", "offsets", "U0_Ha"))
    full = _validated(Dataset(z, r.astype(np.float64), offsets.astype(np.int64), e.astype(np.float64), None,
                              "Hartree", path.name, file_sha256(path), label_set="QM9 U0"),
                      str(path), {"atomic_numbers": "Z", "positions": "R", "energies": "U0_Ha"})
    return full if indices is None else full.subset(indices)


def read_ase(path: str | Path, index: str = ":", energy_unit: str = "eV", energy_only: bool = False) -> Dataset:
    """Any format ASE reads (extended XYZ, ASE db, ...) with energies and forces from its calculator results:
    forces in every frame or in none (energy_only: left out, wherever they are). ASE's units are Å and eV."""
    try:
        import ase.io
    except ImportError:
        raise ImportError("reading ASE formats needs ase: pip install 'schnet-md[ase]'") from None
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    try:
        frames = ase.io.read(str(path), index=index)
    except Exception as err:  # ASE raises many kinds of parse errors
        raise DataError(f"{path}: ASE cannot read it: {err}") from None
    frames = frames if isinstance(frames, list) else [frames]
    if not frames:
        raise DataError(f"{path}: no frames")
    results = [{} if atoms.calc is None else atoms.calc.results for atoms in frames]
    problems = []
    no_energy = np.flatnonzero([r.get("energy") is None for r in results])
    if len(no_energy):
        problems.append(f"{path}: energy missing in {_where(no_energy, len(frames))}")
    no_forces = np.flatnonzero([r.get("forces") is None for r in results])
    has_forces = not energy_only and len(no_forces) == 0
    if not energy_only and 0 < len(no_forces) < len(frames):
        problems.append(f"{path}: forces missing in {_where(no_forces, len(frames))} but present in the others; "
                        f"{ENERGY_ONLY}")
    counts = [len(a) for a in frames]
    data = Dataset(np.concatenate([a.numbers for a in frames]),
                   np.concatenate([a.positions for a in frames]).astype(np.float64),
                   np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                   np.array([r.get("energy") or 0.0 for r in results], dtype=np.float64),  # (0: refused above)
                   np.concatenate([r["forces"] for r in results]).astype(np.float64) if has_forces else None,
                   "eV", path.name, file_sha256(path), label_set="ASE file")
    data = _validated(data, str(path), {"atomic_numbers": "numbers", "energies": "energy"}, problems=problems)
    return data.converted(energy_unit) if energy_unit != "eV" else data


def read_data(path: str | Path, format: str = "auto", labels: str = "new", split: str = "train",
              energy_only: bool = False) -> Dataset:
    """Read a data set, telling its format from the file when format='auto':
    rMD17 npz ('nuclear_charges'), iso17x ('Z','R','E' or its folder), QM9 ('U0_Ha'), else ASE.
    energy_only: leave any forces out (train on energies alone)."""
    path = Path(path)
    if format == "auto":
        format = _detect_format(path)
    if format == "rmd17":
        return read_rmd17(path, labels=labels, energy_only=energy_only)
    if format == "iso17x":
        return read_iso17x(path, split=split, energy_only=energy_only)
    if format == "qm9":
        return read_qm9(path)
    if format == "ase":
        return read_ase(path, energy_only=energy_only)
    raise ValueError(f"unknown data format {format!r}; choose auto, rmd17, iso17x, qm9 or ase")


def _detect_format(path: Path) -> str:
    if path.is_dir():
        if (path / "iso17x.npz").is_file():
            return "iso17x"
        raise DataError(f"{path} is a folder without iso17x.npz")
    if path.suffix == ".npz":
        keys = set(_npz_names(path))
        if "nuclear_charges" in keys:
            return "rmd17"
        if {"Z", "R", "E"} <= keys:
            return "iso17x"
        if "U0_Ha" in keys:
            return "qm9"
        raise DataError(f"{path}: npz keys {sorted(keys)} match no known format (rMD17, iso17x, QM9)")
    return "ase"


def concatenate(datasets: Sequence[Dataset], source: str = "") -> Dataset:
    """Frames of several data sets in one, in the first one's energy unit (forces needed in all or none) and under
    its label set: the others must have been put on its energy zero (as refine does with new labels)."""
    unit = datasets[0].energy_unit
    parts = [d if d.energy_unit == unit else d.converted(unit) for d in datasets]
    if len({d.forces is None for d in parts}) != 1:
        raise DataError("cannot join data sets with and without forces")
    offsets = [np.zeros(1, dtype=np.int64)]
    for d in parts:
        offsets.append(d.offsets[1:] + offsets[-1][-1])
    digest = hashlib.sha256("".join(d.sha256 for d in parts).encode()).hexdigest()
    weights = None if all(d.weights is None for d in parts) else \
        np.concatenate([np.ones(len(d)) if d.weights is None else d.weights for d in parts])
    return Dataset(np.concatenate([d.atomic_numbers for d in parts]), np.concatenate([d.positions for d in parts]),
                   np.concatenate(offsets), np.concatenate([d.energies for d in parts]),
                   None if parts[0].forces is None else np.concatenate([d.forces for d in parts]), unit,
                   source or " + ".join(d.source for d in parts), digest, weights, parts[0].label_set)


def _from_frames(z, r, e, f, energy_unit, source, sha, name, label_set="", names=None,
                 frame_numbers=None) -> Dataset:
    """A validated Dataset from equal-size frames: z [n, atoms] (or [atoms]), r and f [n, atoms, 3], e [n]."""
    n_frames = r.shape[0]
    n_atoms = r.shape[1] if r.ndim == 3 else -1
    if r.ndim != 3 or r.shape[2] != 3:
        raise DataError(f"{name}: positions have shape {r.shape}, expected (n_frames, n_atoms, 3)")
    z = np.broadcast_to(z, (n_frames, n_atoms)) if z.ndim == 1 else z
    if z.shape != (n_frames, n_atoms):
        raise DataError(f"{name}: atomic numbers have shape {z.shape}, expected ({n_frames}, {n_atoms})")
    if e.shape != (n_frames,):
        raise DataError(f"{name}: energies have shape {e.shape}, expected ({n_frames},)")
    if f is not None and f.shape != r.shape:
        raise DataError(f"{name}: forces have shape {f.shape}, expected {r.shape}")
    data = Dataset(np.ascontiguousarray(z).reshape(-1), r.reshape(-1, 3).astype(np.float64),
                   np.arange(n_frames + 1, dtype=np.int64) * n_atoms, e.astype(np.float64),
                   None if f is None else f.reshape(-1, 3).astype(np.float64), energy_unit, source, sha,
                   label_set=label_set)
    return _validated(data, name, names, frame_numbers)


def _validated(data: Dataset, name: str, names=None, frame_numbers=None, problems=()) -> Dataset:
    """`data` once `validate` passes it, its atomic numbers (whole numbers, perhaps stored as floats) as int64."""
    validate(data, name, names, frame_numbers, problems)
    return replace(data, atomic_numbers=data.atomic_numbers.astype(np.int64))


def validate(data: Dataset, name: str = "data set", names: Optional[dict] = None, frame_numbers=None,
             problems: Sequence[str] = ()) -> None:
    """Refuse data that would train silently wrong, one line per problem in one DataError: sizes that do not
    match, frames without atoms, atomic numbers that are not whole numbers in 1..118, NaN or infinite values,
    coordinates beyond MAX_COORDINATE, atoms closer than MIN_DISTANCE, frames whose forces are all exactly zero.
    `names`: the file's name of each array (atomic_numbers, positions, energies, forces; default those);
    `frame_numbers`: the file's number of each frame (default 0, 1, ...); `problems`: lines the reader found."""
    n_frames, n_total = len(data), int(data.offsets[-1])
    counts = data.n_atoms
    if data.offsets[0] != 0 or (counts < 0).any():
        raise DataError(f"{name}: frame offsets must start at 0 and never decrease")
    if data.atomic_numbers.shape != (n_total,) or data.positions.shape != (n_total, 3):
        raise DataError(f"{name}: atomic numbers / positions do not match the frame offsets")
    if data.energies.shape != (n_frames,):
        raise DataError(f"{name}: {data.energies.shape[0]} energies for {n_frames} frames")
    if data.forces is not None and data.forces.shape != (n_total, 3):
        raise DataError(f"{name}: forces do not match positions")
    key = {"atomic_numbers": "atomic numbers", "positions": "positions", "energies": "energies", "forces": "forces",
           **(names or {})}
    numbers = np.arange(n_frames) if frame_numbers is None else np.asarray(frame_numbers)
    frame_of_atom = np.repeat(np.arange(n_frames), counts)

    def where(frames) -> str:
        return _where(numbers[frames], n_frames)

    def frames_of(atoms) -> np.ndarray:      # the frames that hold any of the atoms in the mask
        return np.flatnonzero(np.bincount(frame_of_atom[atoms], minlength=n_frames))

    lines = list(problems)
    if (counts == 0).any():
        lines.append(f"{name}: no atoms in {where(np.flatnonzero(counts == 0))}")
    z = data.atomic_numbers
    not_whole = _not_whole(z)
    if not_whole.any():
        lines.append(f"{name}: {key['atomic_numbers']} are not whole numbers (e.g. "
                     f"{_examples(np.unique(z[not_whole]))}) in {where(frames_of(not_whole))}: an element's atomic "
                     "number is an integer")
    elif ((z < 1) | (z > 118)).any():
        outside = (z < 1) | (z > 118)
        lines.append(f"{name}: {key['atomic_numbers']} outside 1..118 (e.g. {_examples(np.unique(z[outside]))}) in "
                     f"{where(frames_of(outside))}")
    for field in ("positions", "energies", "forces"):
        values = getattr(data, field)
        if values is not None and not np.isfinite(values).all():
            bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
            frames = frames_of(bad) if field != "energies" else np.flatnonzero(bad)
            lines.append(f"{name}: {key[field]} contain NaN or infinite values in {where(frames)}")
    size = np.abs(data.positions)
    far = ((size > MAX_COORDINATE) & np.isfinite(size)).any(axis=1)
    if far.any():
        lines.append(f"{name}: {key['positions']} hold coordinates beyond {MAX_COORDINATE:g} Å (largest "
                     f"{size[np.isfinite(size)].max():.3g}) in {where(frames_of(far))}: lengths must be in Å, and no "
                     "molecule is that large")
    distance, first, second = closest_pairs(data.positions, data.offsets)
    close = np.flatnonzero(distance < MIN_DISTANCE)
    if len(close):
        k = close[0]
        lines.append(f"{name}: {key['positions']} put atoms closer than {MIN_DISTANCE} Å (atoms {first[k]} and "
                     f"{second[k]}, from 0, of frame {numbers[k]}: {distance[k]:.3f} Å) in {where(close)}: "
                     "overlapping atoms, or lengths not in Å")
    if data.forces is not None:
        moving = np.bincount(frame_of_atom, weights=(data.forces != 0).any(axis=1), minlength=n_frames)
        still = np.flatnonzero((moving == 0) & (counts > 1))     # (a lone atom feels no force)
        if len(still):
            lines.append(f"{name}: {key['forces']} are all exactly zero in {where(still)}: forces never computed "
                         f"would teach a flat surface; {ENERGY_ONLY}")
    if lines:
        raise DataError("\n".join(lines))


def closest_pairs(positions: np.ndarray, offsets: np.ndarray):
    """Each frame's closest pair of atoms: its distance (inf for frames of fewer than two atoms) and the two
    atoms' indices within the frame. Frames of one size are taken together, some thousands at a time."""
    counts = np.diff(offsets)
    distance = np.full(len(counts), np.inf)
    first, second = np.zeros(len(counts), dtype=np.int64), np.zeros(len(counts), dtype=np.int64)
    for n in np.unique(counts[counts > 1]):
        i, j = (t.numpy() for t in unique_pairs(int(n), torch.device("cpu")))
        frames = np.flatnonzero(counts == n)
        step = max(1, 2_000_000 // len(i))                    # ~50 MB of pair vectors at a time
        for start in range(0, len(frames), step):
            chunk = frames[start:start + step]
            r = positions[offsets[chunk, None] + np.arange(n)]          # [frames, n, 3]
            d2 = np.zeros((len(chunk), len(i)))
            with np.errstate(invalid="ignore", over="ignore"):       # NaN or huge positions are reported apart
                for axis in range(3):                                 # (3x faster than a sum over the last axis)
                    x = r[:, :, axis]
                    d2 += (x[:, i] - x[:, j]) ** 2
            pair = d2.argmin(axis=1)
            distance[chunk] = np.sqrt(d2[np.arange(len(chunk)), pair])
            first[chunk], second[chunk] = i[pair], j[pair]
    return distance, first, second


def _not_whole(values: np.ndarray) -> np.ndarray:
    """Mask of the entries that are not whole numbers (NaN included); an integer array has none."""
    if values.dtype.kind in "iu":
        return np.zeros(values.shape, dtype=bool)
    if values.dtype.kind != "f":
        return np.ones(values.shape, dtype=bool)
    with np.errstate(invalid="ignore"):
        return ~(np.isfinite(values) & (values == np.round(values)))


def _examples(values, limit: int = 5) -> str:
    values = np.asarray(values).tolist()
    return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values[:limit]) + \
        (", ..." if len(values) > limit else "")


def _where(frames, n_frames: int) -> str:
    """'frame(s) 3, 17 (2 of 1000)': which frames, by the file's numbers."""
    return f"frame(s) {_examples(frames)} ({len(frames)} of {n_frames})"


def batches(data: Dataset, indices: np.ndarray, batch_size: int, dtype: torch.dtype = torch.float32,
            device: torch.device = torch.device("cpu")) -> Iterator[dict]:
    """Yield batches of frames (in the order of `indices`) as tensors ready for `SchNet.batch_energy`."""
    for start in range(0, len(indices), batch_size):
        idx = indices[start:start + batch_size]
        part = data.subset(idx)
        counts = part.n_atoms.tolist()
        i, j = batched_unique_pairs(counts, device)
        yield {
            "atomic_numbers": torch.as_tensor(part.atomic_numbers, device=device),
            "positions": torch.as_tensor(part.positions, dtype=dtype, device=device),
            "energies": torch.as_tensor(part.energies, dtype=dtype, device=device),
            "forces": None if part.forces is None else torch.as_tensor(part.forces, dtype=dtype, device=device),
            "weights": None if part.weights is None else torch.as_tensor(part.weights, dtype=dtype, device=device),
            "molecule": torch.repeat_interleave(torch.arange(len(counts), device=device),
                                                torch.as_tensor(counts, device=device)),
            "n_molecules": len(counts),
            "pair_i": i,
            "pair_j": j,
        }
