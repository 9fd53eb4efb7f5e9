"""Data sets of labelled structures, read once into the model's units (Å and a declared energy unit).

A `Dataset` stores frames one after another (ragged), so molecules of different sizes batch together:
frame k is atoms offsets[k]:offsets[k+1].
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import units
from .neighbors import batched_unique_pairs


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


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_npz(path: Path, keys, optional=()) -> dict:
    """The named arrays of an npz file (and those of `optional` it has), with clear errors for a missing,
    unreadable or incomplete file."""
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    try:
        with np.load(path) as npz:
            _require(npz, keys, path)
            return {k: np.asarray(npz[k]) for k in [*keys, *optional] if k in npz.files}
    except DataError:
        raise
    except Exception as err:   # OSError, EOFError, zipfile.BadZipFile, zlib.error: a damaged or cut file
        raise DataError(f"{path} is not a readable npz file (damaged or cut short?): {err}") from None


def _require(npz, keys, path) -> None:
    missing = [k for k in keys if k not in npz.files]
    if missing:
        raise DataError(f"{path}: missing key(s) {', '.join(missing)} (has: {', '.join(npz.files)})")


def read_rmd17(path: str | Path, labels: str = "new") -> Dataset:
    """Read an rMD17 npz file (Å, kcal/mol). labels='new' gives the revised (rMD17) labels,
    labels='old' the original MD17 labels of the same frames."""
    path = Path(path)
    if labels not in ("new", "old"):
        raise ValueError("labels must be 'new' (rMD17) or 'old' (original MD17)")
    e_key, f_key = ("energies", "forces") if labels == "new" else ("old_energies", "old_forces")
    arrays = _read_npz(path, ["nuclear_charges", "coords", e_key, f_key], optional=["method", "energies", "old_energies"])
    z = arrays["nuclear_charges"].astype(np.int64)
    r, e, f = (arrays[k].astype(np.float64) for k in ("coords", e_key, f_key))
    if r.ndim != 3 or r.shape[1:] != (z.shape[0], 3):
        raise DataError(f"{path}: coords has shape {r.shape}, expected (n_frames, {z.shape[0]}, 3)")
    if e.shape != (r.shape[0],):
        raise DataError(f"{path}: {e_key} has shape {e.shape}, expected ({r.shape[0]},)")
    if f.shape != r.shape:
        raise DataError(f"{path}: {f_key} has shape {f.shape}, expected {r.shape}")
    return _from_frames(z, r, e, f, "kcal/mol", f"{path.name} ({labels} labels)", file_sha256(path), str(path),
                        _rmd17_label_set(arrays, labels))


def _rmd17_label_set(arrays: dict, labels: str) -> str:
    """rMD17's revised or MD17's original labels, or, in a file `schnet-md label` wrote (one set, stored as both),
    its method; "" for such a file from before the method was recorded."""
    if "method" in arrays:
        return LABEL_SET_OF_METHOD.get(str(arrays["method"]), "")
    if "energies" in arrays and "old_energies" in arrays and np.array_equal(arrays["energies"], arrays["old_energies"]):
        return ""
    return "rMD17" if labels == "new" else "MD17"


ISO17X_SPLITS = ("train", "validation", "train_known", "test_within", "test_other", "eq_known", "eq_other", "all")


def read_iso17x(path: str | Path, split: str = "train") -> Dataset:
    """The ISO17-style C7O2H10 set (GFN2-xTB labels; Å, eV). `path` is the iso17x folder or its
    iso17x.npz (splits.npz beside it); `split` names one of its index arrays, or 'all'."""
    path = Path(path)
    npz_path = path / "iso17x.npz" if path.is_dir() else path
    if split not in ISO17X_SPLITS:
        raise ValueError(f"unknown iso17x split {split!r}; choose one of {', '.join(ISO17X_SPLITS)}")
    arrays = _read_npz(npz_path, ["Z", "R", "E", "F"])
    z, r, e, f = (arrays[k] for k in ("Z", "R", "E", "F"))
    if split != "all":
        index = _read_npz(npz_path.parent / "splits.npz", [split])[split].astype(np.int64)
        z, r, e, f = z[index], r[index], e[index], f[index]
    return _from_frames(z, r, e, f, "eV", f"{npz_path.name} [{split}]", file_sha256(npz_path), str(npz_path),
                        "GFN2-xTB")


def read_qm9(path: str | Path, indices=None) -> Dataset:
    """QM9 U0 energies (Hartree, no forces) of the molecules at `indices` (default: all)."""
    path = Path(path)
    arrays = _read_npz(path, ["Z", "R", "offsets", "U0_Ha"])
    z, r, offsets, e = (arrays[k] for k in ("Z", "R", "offsets", "U0_Ha"))
    full = Dataset(z.astype(np.int64), r.astype(np.float64), offsets.astype(np.int64), e.astype(np.float64), None,
                   "Hartree", path.name, file_sha256(path), label_set="QM9 U0")
    validate(full, str(path))
    return full if indices is None else full.subset(indices)


def read_ase(path: str | Path, index: str = ":", energy_unit: str = "eV") -> Dataset:
    """Any format ASE reads (extended XYZ, ASE db, ...) with energies (and forces, if every frame has
    them) from its calculator results. ASE's units are Å and eV."""
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
    energies, forces = [], []
    for k, atoms in enumerate(frames):
        if atoms.calc is None or "energy" not in atoms.calc.results:
            raise DataError(f"{path}: frame {k} has no energy")
        energies.append(atoms.calc.results["energy"])
        forces.append(atoms.calc.results.get("forces"))
    has_forces = all(f is not None for f in forces)
    counts = [len(a) for a in frames]
    data = Dataset(np.concatenate([a.numbers for a in frames]).astype(np.int64),
                   np.concatenate([a.positions for a in frames]).astype(np.float64),
                   np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), np.asarray(energies, dtype=np.float64),
                   np.concatenate(forces).astype(np.float64) if has_forces else None,
                   "eV", path.name, file_sha256(path), label_set="ASE file")
    validate(data, str(path))
    return data.converted(energy_unit) if energy_unit != "eV" else data


def read_data(path: str | Path, format: str = "auto", labels: str = "new", split: str = "train") -> Dataset:
    """Read a data set, telling its format from the file when format='auto':
    rMD17 npz ('nuclear_charges'), iso17x ('Z','R','E','F' or its folder), QM9 ('U0_Ha'), else ASE."""
    path = Path(path)
    if format == "auto":
        format = _detect_format(path)
    if format == "rmd17":
        return read_rmd17(path, labels=labels)
    if format == "iso17x":
        return read_iso17x(path, split=split)
    if format == "qm9":
        return read_qm9(path)
    if format == "ase":
        return read_ase(path)
    raise ValueError(f"unknown data format {format!r}; choose auto, rmd17, iso17x, qm9 or ase")


def _detect_format(path: Path) -> str:
    if path.is_dir():
        if (path / "iso17x.npz").is_file():
            return "iso17x"
        raise DataError(f"{path} is a folder without iso17x.npz")
    if path.suffix == ".npz":
        if not path.is_file():
            raise DataError(f"data file {path} does not exist")
        try:
            with np.load(path) as npz:
                keys = set(npz.files)
        except Exception as err:   # OSError, EOFError, zipfile.BadZipFile: a damaged or cut file
            raise DataError(f"{path} is not a readable npz file (damaged or cut short?): {err}") from None
        if "nuclear_charges" in keys:
            return "rmd17"
        if {"Z", "R", "E", "F"} <= keys:
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


def _from_frames(z, r, e, f, energy_unit, source, sha, name, label_set) -> Dataset:
    """A Dataset from equal-size frames: z [n, atoms] (or [atoms]), r and f [n, atoms, 3], e [n]."""
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
    data = Dataset(np.ascontiguousarray(z, dtype=np.int64).reshape(-1), r.reshape(-1, 3).astype(np.float64),
                   np.arange(n_frames + 1, dtype=np.int64) * n_atoms, e.astype(np.float64),
                   None if f is None else f.reshape(-1, 3).astype(np.float64), energy_unit, source, sha,
                   label_set=label_set)
    validate(data, name)
    return data


def validate(data: Dataset, name: str = "data set") -> None:
    """Refuse data that would train silently wrong: NaN/inf values, inconsistent sizes."""
    n_total = int(data.offsets[-1])
    if data.atomic_numbers.shape != (n_total,) or data.positions.shape != (n_total, 3):
        raise DataError(f"{name}: atomic numbers / positions do not match the frame offsets")
    if data.energies.shape != (len(data),):
        raise DataError(f"{name}: {data.energies.shape[0]} energies for {len(data)} frames")
    if data.forces is not None and data.forces.shape != (n_total, 3):
        raise DataError(f"{name}: forces do not match positions")
    for label, arr in (("positions", data.positions), ("energies", data.energies), ("forces", data.forces)):
        if arr is not None and not np.isfinite(arr).all():
            bad = np.argwhere(~np.isfinite(arr.reshape(len(arr), -1)).all(axis=1))[:3, 0]
            raise DataError(f"{name}: {label} contain NaN or infinite values (e.g. at row(s) {bad.tolist()})")
    if (data.atomic_numbers < 1).any() or (data.atomic_numbers > 118).any():
        raise DataError(f"{name}: atomic numbers outside 1..118")


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
