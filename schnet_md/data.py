"""Data sets of labelled structures, read once into the model's units (Å and a declared energy unit).

A `Dataset` stores frames one after another (ragged), so molecules of different sizes batch together:
frame k is atoms offsets[k]:offsets[k+1].
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional

import numpy as np
import torch

from . import units
from .neighbors import batched_all_pairs


class DataError(ValueError):
    """A data file that is missing, malformed or holds values that cannot be trained on."""


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
                       self.energy_unit, self.source, self.sha256)

    def converted(self, energy_unit: str) -> "Dataset":
        """The same frames with energies (and forces) in another unit."""
        f = units.energy_factor(self.energy_unit, energy_unit)
        return Dataset(self.atomic_numbers, self.positions, self.offsets, self.energies * f,
                       None if self.forces is None else self.forces * f, energy_unit, self.source, self.sha256)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    e_key, f_key = ("energies", "forces") if labels == "new" else ("old_energies", "old_forces")
    try:
        with np.load(path) as npz:
            _require(npz, ["nuclear_charges", "coords", e_key, f_key], path)
            z = np.asarray(npz["nuclear_charges"], dtype=np.int64)
            r = np.asarray(npz["coords"], dtype=np.float64)
            e = np.asarray(npz[e_key], dtype=np.float64)
            f = np.asarray(npz[f_key], dtype=np.float64)
    except (OSError, ValueError, EOFError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"{path} is not a readable npz file: {err}") from None
    n_frames, n_atoms = r.shape[0], z.shape[0]
    if r.ndim != 3 or r.shape[1:] != (n_atoms, 3):
        raise DataError(f"{path}: coords has shape {r.shape}, expected (n_frames, {n_atoms}, 3)")
    if e.shape != (n_frames,):
        raise DataError(f"{path}: {e_key} has shape {e.shape}, expected ({n_frames},)")
    if f.shape != r.shape:
        raise DataError(f"{path}: {f_key} has shape {f.shape}, expected {r.shape}")
    data = Dataset(np.tile(z, n_frames), r.reshape(-1, 3), np.arange(n_frames + 1, dtype=np.int64) * n_atoms,
                   e, f.reshape(-1, 3), "kcal/mol", f"{path.name} ({labels} labels)", file_sha256(path))
    validate(data, str(path))
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
        i, j = batched_all_pairs(counts, device)
        yield {
            "atomic_numbers": torch.as_tensor(part.atomic_numbers, device=device),
            "positions": torch.as_tensor(part.positions, dtype=dtype, device=device),
            "energies": torch.as_tensor(part.energies, dtype=dtype, device=device),
            "forces": None if part.forces is None else torch.as_tensor(part.forces, dtype=dtype, device=device),
            "molecule": torch.repeat_interleave(torch.arange(len(counts), device=device),
                                                torch.as_tensor(counts, device=device)),
            "n_molecules": len(counts),
            "pair_i": i,
            "pair_j": j,
        }
