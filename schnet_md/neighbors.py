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
    k = torch.arange(1, max(n_atoms, 1), device=device).repeat(n_atoms)
    j = (i + k) % n_atoms
    return i, j


def unique_pairs(n_atoms: int, device: torch.device) -> Tuple[Tensor, Tensor]:
    """Every unordered pair once (i < j): a half list of n (n - 1) / 2 pairs."""
    ij = torch.triu_indices(n_atoms, n_atoms, 1, device=device)
    return ij[0], ij[1]


def batched_unique_pairs(n_atoms: List[int], device: torch.device) -> Tuple[Tensor, Tensor]:
    """Half list (each pair once) of all intra-molecular pairs, molecules stored one after another."""
    pairs_i: List[Tensor] = []
    pairs_j: List[Tensor] = []
    offset = 0
    for n in n_atoms:
        i, j = unique_pairs(n, device)
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
    a, b, c = box[0], box[1], box[2]
    volume = torch.abs(torch.dot(a, torch.linalg.cross(b, c)))   # triple product: no LU, no host sync
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


# ---- O(N) periodic neighbour search: a cell list with fixed capacities (static shapes, no host sync) -------

def box_too_small(box: Tensor, cutoff: float) -> Tensor:
    """Device flag: some box height is under twice the cutoff (the dense path's minimum image is then wrong)."""
    return box_heights(box.detach()).min() < 2.0 * cutoff


def cell_grid(box, cutoff: float) -> List[int]:
    """Cells per box direction for a box (numpy or tensor, Å): as many as fit with planes >= cutoff apart."""
    heights = box_heights(torch.as_tensor(box, dtype=torch.float64))
    return [int(h // cutoff) for h in heights.tolist()]


def cell_list_pairs(positions: Tensor, box: Tensor, cutoff: float, n_cells: List[int], max_per_cell: int,
                    capacity: int) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Pairs (i, j), i < j, closer than `cutoff` in a periodic reduced box, found through a cell list: a half
    list (each pair once), as `SchNet.atomic_energies(..., half_list=True)` takes it.

    Every shape is fixed by (n_atoms, n_cells, max_per_cell, capacity), and nothing is copied to the host,
    so the search can be captured in a CUDA graph. Returns (i, j, vectors r_j - r_i at the minimum image,
    mask of real pairs, number of pairs found, overflow flag). Entries past the found pairs are padding:
    i = j = 0 and a vector longer than the cutoff, so a cutoff envelope gives them exactly zero weight.
    The overflow flag is set when a cell holds more than `max_per_cell` atoms, more than `capacity` pairs
    are found, or the box has shrunk so that cells are narrower than the cutoff: then pairs may be
    missing and the caller must not trust the result."""
    n = positions.shape[0]
    device = positions.device
    # filled on the device: torch.tensor(n_cells) would copy from the host, which CUDA-graph capture forbids
    grid = torch.stack([torch.full((), c, dtype=torch.long, device=device) for c in n_cells])
    total_cells = n_cells[0] * n_cells[1] * n_cells[2]
    frac = positions @ torch.linalg.inv_ex(box)[0]   # inv_ex: no singularity check on the host
    # non-finite input (flagged by the caller) must still give valid indices, not an out-of-range crash
    frac = torch.nan_to_num(frac - torch.floor(frac), nan=0.0, posinf=0.0, neginf=0.0)
    cell3 = torch.clamp((frac * grid).to(torch.long), min=0)
    cell3 = torch.minimum(cell3, grid - 1)
    cell = (cell3[:, 0] * n_cells[1] + cell3[:, 1]) * n_cells[2] + cell3[:, 2]
    order = torch.argsort(cell)
    sorted_cell = cell[order]
    cell_ids = torch.arange(total_cells, device=device)
    start = torch.searchsorted(sorted_cell, cell_ids)
    count = torch.searchsorted(sorted_cell, cell_ids, right=True) - start
    slot = torch.arange(max_per_cell, device=device)
    table = torch.where(slot[None, :] < count[:, None],
                        order[torch.clamp(start[:, None] + slot[None, :], max=n - 1)],
                        torch.full((1, 1), -1, dtype=torch.long, device=device))
    # the 27 cells around each cell, with periodic wrap
    shifts = torch.stack(torch.meshgrid(torch.arange(-1, 2, device=device), torch.arange(-1, 2, device=device),
                                        torch.arange(-1, 2, device=device), indexing="ij"), dim=-1).reshape(27, 3)
    c3 = torch.stack([cell_ids // (n_cells[1] * n_cells[2]), (cell_ids // n_cells[2]) % n_cells[1],
                      cell_ids % n_cells[2]], dim=1)
    moved = c3[:, None, :] + shifts[None, :, :]                                                 # [cells, 27, 3]
    nb3 = moved % grid
    neighbour_cells = (nb3[:, :, 0] * n_cells[1] + nb3[:, :, 1]) * n_cells[2] + nb3[:, :, 2]   # [cells, 27]
    # Candidates are screened on positions folded into the cell plus the translation of the neighbour cell's
    # periodic image: with >= 3 cells per direction a pair within the cutoff lies in adjacent cells, at that
    # image. (Cheaper than a minimum image of every candidate; the kept pairs get theirs below.)
    translation = torch.div(moved, grid, rounding_mode="floor").to(positions.dtype) @ box.detach()
    translation = translation[cell].permute(2, 0, 1)                                          # [3, n, 27]
    folded = (frac @ box.detach()).detach().t().contiguous()                                   # [3, n]
    candidates = table[neighbour_cells[cell]]                                                  # [n, 27, M]
    j_safe = torch.clamp(candidates, min=0)
    squared = torch.zeros(candidates.shape, dtype=positions.dtype, device=device)
    for axis in range(3):    # one coordinate at a time keeps every array contiguous over the candidates
        x = folded[axis]
        v = x[j_safe] - x[:, None, None] + translation[axis][:, :, None]
        squared = squared + v * v
    i_all = torch.arange(n, device=device)[:, None, None]
    # i < j keeps each pair once: with >= 3 cells per direction j is a candidate of i exactly once
    within = ((candidates > i_all) & (squared < cutoff * cutoff)).reshape(-1)
    i_all = i_all.expand(n, 27, max_per_cell)
    # compaction into `capacity` slots: write position = running count (one trash slot at the end)
    within_long = within.to(torch.long)
    found = within_long.sum()
    rank = torch.cumsum(within_long, 0)
    where_to = torch.where(within & (rank <= capacity), rank - 1, torch.full_like(within_long, capacity))
    pair_i = torch.zeros(capacity + 1, dtype=torch.long, device=device).scatter(0, where_to, i_all.reshape(-1))[:capacity]
    pair_j = torch.zeros(capacity + 1, dtype=torch.long, device=device).scatter(0, where_to, j_safe.reshape(-1))[:capacity]
    mask = torch.arange(capacity, device=device) < found
    # index_select, not positions[pair_j]: on CUDA the backward of advanced indexing sorts the indices and
    # accumulates rows of 3 floats serially (70 ms for ~1M pairs on an H100), index_select's is an index_add
    vectors = minimum_image(positions.index_select(0, pair_j) - positions.index_select(0, pair_i), box)
    padding = torch.cat([torch.full_like(vectors[:, :1], 2.0 * cutoff), torch.zeros_like(vectors[:, 1:])], dim=1)
    vectors = torch.where(mask[:, None], vectors, padding)
    plane_gap = box_heights(box.detach()) / grid
    overflow = (count.max() > max_per_cell) | (found > capacity) | (plane_gap.min() < cutoff)
    return pair_i, pair_j, vectors, mask, found, overflow


def fitted_cell_list_pairs(positions: Tensor, box: Tensor, cutoff: float) -> Tuple[Tensor, Tensor, Tensor]:
    """The cell list sized afresh for this box and these positions: (i, j, vectors) of exactly the pairs
    found, each once. For engines that may look at device values every step (CPU, or CUDA without graphs),
    so a box that shrinks or grows (a barostat) never outgrows the grid. Needs every box height >= 3 cutoffs;
    below that, but >= 2 cutoffs, the caller takes all pairs at their minimum image instead."""
    heights: List[float] = box_heights(box.detach()).tolist()
    n_cells = [int(h // cutoff) for h in heights]
    grid = torch.tensor(n_cells, dtype=torch.long, device=positions.device)
    frac = positions.detach() @ torch.linalg.inv(box.detach())
    frac = frac - torch.floor(frac)
    cell3 = torch.minimum(torch.clamp((frac * grid).to(torch.long), min=0), grid - 1)
    cell = (cell3[:, 0] * n_cells[1] + cell3[:, 1]) * n_cells[2] + cell3[:, 2]
    fullest = int(torch.bincount(cell, minlength=n_cells[0] * n_cells[1] * n_cells[2]).max())
    n = positions.shape[0]
    i, j, vectors, mask, found, overflow = cell_list_pairs(positions, box, cutoff, n_cells, fullest,
                                                           n * 27 * fullest)   # every candidate: never overflows
    k = int(found)
    return i[:k], j[:k], vectors[:k]
