"""In-graph neighbour search (TorchScript-compatible).

SchNet sums over neighbours j != i. For a molecule every ordered pair is a neighbour pair and a
cosine cutoff (if any) switches distant pairs off smoothly, so the pair list depends only on the
atom count: it is built once and has a static shape. For a periodic system each pair is taken at its
minimum image, which is exact only while the cutoff is at most half the smallest box height; beyond
that a pair can have two images inside the cutoff, so `check_box` refuses such boxes instead of
dropping pairs silently.

Boxes use OpenMM's convention: rows are the box vectors a, b, c in reduced form
(a = (ax, 0, 0), b = (bx, by, 0), c = (cx, cy, cz), |bx| <= ax/2, |cx| <= ax/2, |cy| <= by/2).
"""

from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor


def all_pairs(n_atoms: int, device: torch.device) -> Tuple[Tensor, Tensor]:
    """Every ordered pair (i, j) with i != j, as two index vectors of length n (n - 1).

    Built from arithmetic only (no masking), so the shapes are static."""
    i = torch.arange(n_atoms, device=device).repeat_interleave(max(n_atoms - 1, 0))
    k = torch.arange(1, n_atoms, device=device).repeat(n_atoms)
    j = (i + k) % n_atoms
    return i, j


def batched_all_pairs(n_atoms: List[int], device: torch.device) -> Tuple[Tensor, Tensor]:
    """All intra-molecular ordered pairs for molecules stored one after another."""
    pairs_i: List[Tensor] = []
    pairs_j: List[Tensor] = []
    offset = 0
    for n in n_atoms:
        i, j = all_pairs(n, device)
        pairs_i.append(i + offset)
        pairs_j.append(j + offset)
        offset += n
    return torch.cat(pairs_i), torch.cat(pairs_j)


def minimum_image(vectors: Tensor, box: Tensor) -> Tensor:
    """Shift difference vectors [n, 3] to their minimum image in a reduced triclinic box [3, 3].

    Subtracting c, then b, then a (each rounded along the one axis the later vectors leave
    untouched) maps any vector into the box centred on the origin; a vector shorter than half the
    smallest box height is already there, so it comes back unchanged."""
    vectors = vectors - torch.round(vectors[:, 2:3] / box[2, 2]) * box[2]
    vectors = vectors - torch.round(vectors[:, 1:2] / box[1, 1]) * box[1]
    vectors = vectors - torch.round(vectors[:, 0:1] / box[0, 0]) * box[0]
    return vectors


def box_heights(box: Tensor) -> Tensor:
    """Distances between opposite faces of the cell spanned by the rows of `box`."""
    volume = torch.abs(torch.linalg.det(box))
    a, b, c = box[0], box[1], box[2]
    areas = torch.stack([
        torch.linalg.norm(torch.linalg.cross(b, c)),
        torch.linalg.norm(torch.linalg.cross(c, a)),
        torch.linalg.norm(torch.linalg.cross(a, b)),
    ])
    return volume / areas


def check_reduced_box(box: Tensor) -> None:
    """Raise a clear error unless `box` is a finite [3, 3] box in OpenMM's reduced triclinic form."""
    box = box.detach()
    if box.shape != (3, 3):
        raise ValueError("box vectors must have shape [3, 3], got " + str(list(box.shape)))
    if not bool(torch.isfinite(box).all()):
        raise ValueError("box vectors contain NaN or infinite values")
    tol = 1e-6 * float(box.abs().max())
    reduced = (
        float(box[0, 1].abs()) <= tol and float(box[0, 2].abs()) <= tol and float(box[1, 2].abs()) <= tol
        and float(box[0, 0]) > 0.0 and float(box[1, 1]) > 0.0 and float(box[2, 2]) > 0.0
        and float(box[1, 0].abs()) <= 0.5 * float(box[0, 0]) + tol
        and float(box[2, 0].abs()) <= 0.5 * float(box[0, 0]) + tol
        and float(box[2, 1].abs()) <= 0.5 * float(box[1, 1]) + tol
    )
    if not reduced:
        raise ValueError(
            "box vectors are not in OpenMM's reduced triclinic form (a along x, b in the xy plane, "
            "|bx| <= ax/2, |cx| <= ax/2, |cy| <= by/2)")


def check_box(box: Tensor, cutoff: float) -> None:
    """Raise a clear error unless `box` is reduced and every height is at least twice the cutoff."""
    check_reduced_box(box)
    box = box.detach()
    if cutoff <= 0.0 or cutoff == float("inf"):
        raise ValueError("a periodic box needs a model with a finite cutoff; this model sums over all pairs "
                         "(no cutoff), which has no periodic meaning")
    h_min = float(box_heights(box).min())
    if cutoff > 0.5 * h_min:
        raise ValueError(
            "the model cutoff (" + str(cutoff) + " Angstrom) is larger than half the smallest box height ("
            + str(0.5 * h_min) + " Angstrom): some pairs would have two periodic images inside the cutoff. "
            "Use a larger box (every box height at least " + str(2.0 * cutoff) + " Angstrom).")


def check_molecule_fits_box(distances: Tensor, box: Tensor) -> None:
    """For a molecule in a periodic box (model without cutoff): minimum-image distances are the
    molecule's own only while all of them stay below half the smallest box height."""
    check_reduced_box(box)
    half = 0.5 * float(box_heights(box.detach()).min())
    if distances.numel() > 0 and float(distances.max()) >= half:
        raise ValueError(
            "the molecule spans " + str(float(distances.max())) + " Angstrom, at least half the smallest box "
            "height (" + str(half) + " Angstrom), so its minimum-image geometry is ambiguous; use a larger box")


def reduced_cell(cell):
    """Bring any right- or left-handed cell (rows a, b, c; numpy) into OpenMM's reduced form.

    Returns (rotation, lattice_map, reduced): `positions @ rotation` and `lattice_map @ cell @ rotation`
    (= `reduced`, lower triangular with |bx| <= ax/2, |cx| <= ax/2, |cy| <= by/2) describe the same
    periodic system in a frame the minimum image understands. `rotation` is orthogonal (a reflection
    for a left-handed cell; distances, hence SchNet energies, do not change), `lattice_map` is an integer
    matrix with determinant +-1 (the same lattice). Forces map back with `forces @ rotation.T`."""
    import numpy as np

    cell = np.asarray(cell, dtype=np.float64)
    q, r = np.linalg.qr(cell.T)                  # cell.T = q r, so cell @ q = r.T is lower triangular
    signs = np.sign(np.diag(r))
    signs[signs == 0] = 1.0
    q, r = q * signs, (r.T * signs).T
    lower = r.T
    lattice = np.eye(3)
    for i, j in ((2, 1), (2, 0), (1, 0)):       # reduce c against b, then c and b against a
        k = np.round(lower[i, j] / lower[j, j])
        lower[i] -= k * lower[j]
        lattice[i] -= k * lattice[j]
    return q, lattice, lower
