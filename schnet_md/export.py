"""The OpenMM-facing module: positions (nm) [+ box vectors (nm)] -> energy (kJ/mol).

This is the one place where OpenMM's units meet the model's: nm -> Å on the way in, the model's
energy unit -> kJ/mol on the way out. The module carries the atomic numbers and the indices of the
particles it acts on, so a solute inside a larger system works; every other particle gets no force.
`openmmtorch.TorchForce(path)` loads the written file directly.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import math
import os
import sys
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from . import __version__
from .elements import atom_order, symbol
from .model import SchNet
from .modelfile import EXPORT_METADATA_FILE as METADATA_FILE
from .modelfile import FILE_KINDS, ModelFileError, file_kind, model_at, tensors_sha256, warn_once
from .neighbors import (box_heights, box_too_small, cell_grid, cell_list_pairs, check_box, fitted_cell_list_pairs,
                        check_molecule_fits_box, minimum_image, unique_pairs)
from .units import ANGSTROM_PER_NM, energy_factor

EXPORT_FORMAT_VERSION = 3   # 3: a checksum of every member of the archive; 2: of the metadata and tensors; 1: none


class OpenMMSchNet(nn.Module):
    """forward(positions [n_particles, 3] nm, boxvectors [3, 3] nm optional) -> energy kJ/mol (float64).

    Geometry modes:
      molecule   no box: all pairs, raw vectors;
      periodic   box and a model cutoff: all pairs at their minimum image (cutoff <= half box height), or,
                 with neighbor_list="cells", an O(N) cell list with fixed capacities;
      in_box     box, model without cutoff: a molecule inside a periodic system (e.g. solvated); pair
                 vectors are minimum images, valid while the molecule spans less than half the box.

    check_errors=True raises a clear error on bad input (NaN positions, a box too small, a full pair
    list); that needs the host to look at device values. check_errors=False keeps every check on the
    device and returns a NaN energy instead, so the whole step can be captured in a CUDA graph."""

    # compile-time constants: TorchScript drops the branches they switch off (no host sync left behind)
    __constants__ = ["check_errors", "use_cells", "periodic", "has_cutoff"]

    def __init__(self, model: SchNet, atomic_numbers: Sequence[int], particle_indices: Sequence[int],
                 n_particles: int, periodic: bool, neighbor_list: str = "all_pairs", cells: Sequence[int] = (),
                 max_per_cell: int = 0, capacity: int = 0, check_errors: bool = True):
        super().__init__()
        if len(atomic_numbers) != len(particle_indices):
            raise ValueError(f"{len(atomic_numbers)} atomic numbers for {len(particle_indices)} particles")
        indices = torch.as_tensor(np.asarray(particle_indices, dtype=np.int64))
        if len(indices) == 0 or int(indices.min()) < 0 or int(indices.max()) >= n_particles:
            raise ValueError(f"particle indices must lie in 0..{n_particles - 1}")
        if len(torch.unique(indices)) != len(indices):
            raise ValueError("particle indices contain duplicates")
        if neighbor_list not in ("all_pairs", "cells"):
            raise ValueError(f"neighbor_list must be 'all_pairs' or 'cells', got {neighbor_list!r}")
        self.model = model
        self.register_buffer("species", model.species(torch.as_tensor(np.asarray(atomic_numbers))))
        self.register_buffer("particle_indices", indices)
        # W(r_ij) = W(r_ji): the fixed pair list is a half list (each pair once), halving the filter work
        i, j = unique_pairs(len(indices) if neighbor_list == "all_pairs" else 0, torch.device("cpu"))
        self.register_buffer("pair_i", i)
        self.register_buffer("pair_j", j)
        self.n_particles = int(n_particles)
        self.periodic = bool(periodic)
        self.has_cutoff = model.cutoff != float("inf")
        self.cutoff = float(model.cutoff)
        self.use_cells = neighbor_list == "cells"
        if self.use_cells and not (self.periodic and self.has_cutoff):
            raise ValueError("the cell list is for periodic systems and models with a cutoff")
        if self.use_cells and (len(cells) != 3 or min(cells) < 3 or max_per_cell < 1 or capacity < 1):
            raise ValueError("the cell list needs at least 3 cells per direction (every box height >= 3 cutoffs), "
                             "max_per_cell >= 1 and capacity >= 1; use neighbor_list='all_pairs' for small boxes")
        self.cells: List[int] = [int(c) for c in cells] if self.use_cells else [1, 1, 1]
        self.max_per_cell = int(max_per_cell)
        self.capacity = int(capacity)
        self.check_errors = bool(check_errors)
        self.angstrom_per_nm = ANGSTROM_PER_NM
        self.kj_per_model_energy = energy_factor(model.config.energy_unit, "kJ/mol")
        # The element reference energies are a constant for this composition; adding them in float64
        # after the sum keeps the absolute energy precise in a float32 model (forces are unaffected).
        reference = model.readout.reference_energies.detach().double()[self.species].sum()
        self.reference_energy_kj: float = float(reference) * self.kj_per_model_energy
        self.metadata_sha1: str = ""   # set by save_exported

    def forward(self, positions: Tensor, boxvectors: Optional[Tensor] = None) -> Tensor:
        if positions.dim() != 2 or positions.shape[0] != self.n_particles or positions.shape[1] != 3:
            raise ValueError("this SchNet force was exported for a system of " + str(self.n_particles)
                             + " particles, but got positions of shape " + str(list(positions.shape)))
        dtype = self.model.readout.scale.dtype
        r = positions.index_select(0, self.particle_indices).to(dtype) * self.angstrom_per_nm
        bad = ~torch.isfinite(r).all()
        if self.check_errors:
            if bool(bad):
                raise ValueError("SchNet force: positions contain NaN or infinite values (has the simulation "
                                 "blown up?)")
        pair_i, pair_j = self.pair_i, self.pair_j
        if self.periodic:
            if boxvectors is None:
                raise ValueError("this SchNet force was exported for a periodic system but got no box vectors: call "
                                 "setUsesPeriodicBoundaryConditions(True) on the TorchForce (schnet_md.export."
                                 "load_torch_force(file) returns it configured from the file's metadata)")
            box = boxvectors.to(dtype) * self.angstrom_per_nm
            if self.use_cells and self.check_errors:
                # sized afresh for every box (a barostat's included), so nothing can overflow; a box shrunk below
                # three cutoffs, too small for cells, takes all pairs at their minimum image (exact above two)
                check_box(box, self.cutoff)
                if bool(box_heights(box.detach()).min() >= 3.0 * self.cutoff):
                    pair_i, pair_j, vectors = fitted_cell_list_pairs(r, box, self.cutoff)
                else:
                    pair_i, pair_j = unique_pairs(r.shape[0], r.device)
                    vectors = minimum_image(r.index_select(0, pair_j) - r.index_select(0, pair_i), box)
            elif self.use_cells:
                # graph-safe: fixed capacities, sized at export for the box range it states (cells_hold);
                # outside it the energy is NaN, as for every other bad input of this mode
                pair_i, pair_j, vectors, mask, found, overflow = cell_list_pairs(
                    r, box, self.cutoff, self.cells, self.max_per_cell, self.capacity)
                bad = bad | overflow
            else:
                vectors = minimum_image(r.index_select(0, pair_j) - r.index_select(0, pair_i), box)
                if self.has_cutoff:
                    if self.check_errors:
                        check_box(box, self.cutoff)
                    bad = bad | box_too_small(box, self.cutoff)
                else:
                    distances = torch.linalg.norm(vectors, dim=-1).detach()
                    if self.check_errors:
                        check_molecule_fits_box(distances, box)
                    bad = bad | (distances.max() >= 0.5 * box_heights(box.detach()).min())
        else:
            vectors = r.index_select(0, pair_j) - r.index_select(0, pair_i)
        energy = self.model.atomic_energies(self.species, vectors, pair_i, pair_j, False, half_list=True).sum()
        energy = energy.to(torch.float64) * self.kj_per_model_energy + self.reference_energy_kj
        if not self.check_errors:
            energy = torch.where(bad, torch.full_like(energy, float("nan")), energy)
        return energy


ModelLike = Union[SchNet, str, os.PathLike]


class CommitteeMean(nn.Module):
    """The mean energy (kJ/mol) of several OpenMMSchNet members: a committee's force is its mean force."""

    def __init__(self, members: List[OpenMMSchNet]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.n_members = len(members)
        self.metadata_sha1: str = ""   # set by save_exported

    def forward(self, positions: Tensor, boxvectors: Optional[Tensor] = None) -> Tensor:
        total = torch.zeros((), dtype=torch.float64, device=positions.device)
        for member in self.members:
            total = total + member(positions, boxvectors)
        return total / self.n_members


def inference_copy(model: SchNet) -> SchNet:
    """A copy of `model` for MD: the same energies and forces, less work per step.

    - Weights are frozen: openmm-torch calls energy.backward(), so weights that require grad would get
      (unused) gradients every step.
    - With a cutoff, a Gaussian centred more than sqrt(80 / gamma) beyond it sits at the expansion's clamp,
      e^-80, for every distance inside the cutoff (outside, the envelope zeroes the filter), so it is a
      constant: its column of each filter network's first layer folds into that layer's bias. A
      schnet2017 expansion (301 Gaussians to 30 Å) under a 5 Å cutoff keeps 79 of them."""
    model = copy.deepcopy(model).requires_grad_(False)
    if model.cutoff == float("inf"):
        return model
    expansion = model.expansion
    margin = 0.05   # Å: keeps Gaussians whose exponent rounding could leave it just above the clamp
    keep = expansion.mu < model.cutoff + math.sqrt(80.0 / expansion.gamma) + margin
    if bool(keep.all()):
        return model
    clamp_value = math.exp(-80.0)
    for interaction in model.interactions:
        dense = interaction.cfconv.filter_network.dense1
        folded = nn.Linear(int(keep.sum()), dense.out_features).to(dense.weight)   # same dtype and device
        with torch.no_grad():
            folded.weight.copy_(dense.weight[:, keep])
            folded.bias.copy_(dense.bias + clamp_value * dense.weight[:, ~keep].sum(dim=1))
        interaction.cfconv.filter_network.dense1 = folded.requires_grad_(False)
    expansion.mu = expansion.mu[keep].clone()
    return model


CELL_LIST_MIN_ATOMS = 200   # the cell list wins once a system has a few times more atoms than neighbours (~50)


BOX_SHRINK = 0.1   # the graph-safe cell list holds boxes down to 90 % of the export box per side (NPT: a few %)


def size_cell_list(box_angstrom, cutoff: float, n_atoms: int, positions_angstrom=None, headroom: float = 1.5,
                   shrink: float = BOX_SHRINK):
    """(cells per direction, max atoms per cell, pair capacity) of a fixed-capacity cell list that holds the box
    and every box whose heights shrink by up to the fraction `shrink` (or grow): cells are at least one cutoff
    wide in the smallest of those boxes, and both capacities allow for its density, (1 - shrink)^-3 times the
    given one, with `headroom` on top. The pair capacity (a half list) follows the mean density
    (n^2 2/3 pi rc^3 / V); atoms per cell follow the fullest cell of the given positions (or the mean, doubled,
    without positions)."""
    if not 0 <= shrink < 1:
        raise ValueError(f"box_shrink must lie in [0, 1) (the fraction by which box heights may shrink), got {shrink}")
    box = np.asarray(box_angstrom, dtype=np.float64)
    cells = cell_grid(box * (1.0 - shrink), cutoff)
    n_cells = max(1, int(np.prod(cells)))
    denser = (1.0 - shrink) ** -3
    volume = abs(np.linalg.det(box))
    capacity = int(headroom * denser * n_atoms * n_atoms * (2.0 / 3.0) * np.pi * cutoff ** 3 / volume) + 256
    if positions_angstrom is not None and min(cells) >= 1:
        frac = np.asarray(positions_angstrom) @ np.linalg.inv(box)
        frac -= np.floor(frac)
        idx = np.minimum((frac * cells).astype(int), np.array(cells) - 1)
        fullest = np.bincount((idx[:, 0] * cells[1] + idx[:, 1]) * cells[2] + idx[:, 2], minlength=n_cells).max()
    else:
        fullest = 2 * n_atoms / n_cells
    return cells, int(np.ceil(headroom * denser * fullest)) + 4, capacity


def build_module(model: ModelLike, atomic_numbers: Sequence[int], particle_indices: Sequence[int] | None = None,
                 n_particles: int | None = None, periodic: bool = False, dtype: str = "float32",
                 neighbor_list: str = "auto", box_nm=None, positions_nm=None, capacity: int | None = None,
                 max_per_cell: int | None = None, check_errors: bool = True,
                 n_molecules: int = 1, script: bool = True, tabulate: bool = False,
                 box_shrink: float = BOX_SHRINK) -> Tuple[torch.jit.ScriptModule, dict]:
    """Script an OpenMMSchNet; returns (module, metadata). Atomic numbers are those of the particles
    the model acts on, in the order of `particle_indices` (default: all particles 0..n-1).

    neighbor_list: "all_pairs", "cells", or "auto" (cells for periodic systems of at least 200 atoms whose
    box is at least three cutoffs across). With check_errors the cell list is sized afresh at every call, so it
    holds any box a barostat reaches. The graph-safe module (check_errors=False) has fixed capacities, sized from
    the box (box_nm) and positions_nm (of all particles) for boxes whose heights shrink by up to `box_shrink`
    (a fraction; growing is always fine); capacity / max_per_cell override the sizing. metadata["cells_hold"]
    states the range.

    A list of models is a committee: the module returns the mean of their energies (so the forces are the
    mean forces); see schnet_md.committee.

    tabulate=True replaces each block's filter network by a spline table of the distance (schnet_md.tabulated:
    the same energies and forces to float32 precision, fewer operations per step)."""
    if isinstance(model, (list, tuple)):
        members = [build_module(m, atomic_numbers, particle_indices, n_particles, periodic, dtype, neighbor_list,
                                box_nm, positions_nm, capacity, max_per_cell, check_errors, n_molecules, script=False,
                                tabulate=tabulate, box_shrink=box_shrink)
                   for m in model]
        metadata = dict(members[0][1], committee_size=len(members),
                        committee=[mm.get("model", {}) for _, mm in members])
        mean = CommitteeMean([module for module, _ in members])
        return (torch.jit.script(mean) if script else mean), metadata
    schnet, model_metadata = model_at(model, dtype)
    if n_molecules > 1 and (schnet.cutoff == float("inf") or not periodic):
        warnings.warn(f"the SchNet force acts on {n_molecules} separate molecules at once; with "
                      f"{'no cutoff' if schnet.cutoff == float('inf') else 'a non-periodic system'} every pair of "
                      "them interacts through the model, which is only meaningful if it was trained on such "
                      "clusters (a model of one molecule gives a spurious interaction). Use one force per molecule "
                      "(atoms=) for independent copies.", stacklevel=3)
    schnet = inference_copy(schnet)
    if particle_indices is None:
        particle_indices = list(range(len(atomic_numbers)))
    n_particles = len(atomic_numbers) if n_particles is None else int(n_particles)
    cutoff = schnet.cutoff
    cells, cell_capacity, pair_capacity, cells_hold = [], 0, 0, None
    shrink = 0.0 if check_errors else box_shrink          # (checked modules size their cells at every call)
    if neighbor_list == "auto":
        big_enough = box_nm is not None and cutoff != float("inf") and \
            min(cell_grid(np.asarray(box_nm) * ANGSTROM_PER_NM * (1.0 - shrink), cutoff)) >= 3
        neighbor_list = "cells" if periodic and big_enough and len(particle_indices) >= CELL_LIST_MIN_ATOMS \
            else "all_pairs"
    if neighbor_list == "cells":
        if box_nm is None:
            raise ValueError("the cell list needs the periodic box to size itself (box_nm)")
        if not check_errors:   # keep three cells per side: a box near three cutoffs holds less shrinking
            smallest = float(box_heights(torch.as_tensor(np.asarray(box_nm) * ANGSTROM_PER_NM)).min())
            shrink = max(0.0, min(shrink, 1.0 - 3.0 * cutoff / smallest))
        ml_positions = None if positions_nm is None else \
            np.asarray(positions_nm)[np.asarray(particle_indices)] * ANGSTROM_PER_NM
        cells, cell_capacity, pair_capacity = size_cell_list(np.asarray(box_nm) * ANGSTROM_PER_NM, cutoff,
                                                             len(particle_indices), ml_positions, shrink=shrink)
        cell_capacity = max_per_cell or cell_capacity
        pair_capacity = capacity or pair_capacity
        if check_errors:
            cells_hold = "any box whose heights are at least two cutoffs (the cell list is sized at every call)"
        else:
            cells_hold = {"min_box_heights_angstrom": [c * cutoff for c in cells], "max_atoms_per_cell": cell_capacity,
                          "max_pairs": pair_capacity,
                          "beyond": "a NaN energy; export again with a larger box_shrink, max_per_cell or capacity"}
    filters = {"kind": "network"}
    energy_model = schnet
    if tabulate:
        from .tabulated import TabulatedSchNet

        energy_model = TabulatedSchNet(schnet)
        filters = energy_model.record()
    module = OpenMMSchNet(energy_model, atomic_numbers, particle_indices, n_particles, periodic, neighbor_list, cells,
                          cell_capacity, pair_capacity, check_errors)
    if script:
        module = torch.jit.script(module)
    metadata = {
        "format": "schnet-md/openmm-force",
        "format_version": EXPORT_FORMAT_VERSION,
        "schnet_md_version": __version__,
        "preset": schnet.config.preset,
        "cutoff_angstrom": schnet.config.cutoff,
        "gaussians_in_export": int(schnet.expansion.mu.numel()),
        "filters": filters,
        "model_elements": schnet.config.elements,
        "atomic_numbers": [int(z) for z in atomic_numbers],
        "particle_indices": [int(k) for k in particle_indices],
        "n_particles": n_particles,
        "periodic": bool(periodic),
        "precision": dtype,
        "neighbor_list": neighbor_list,
        "cells": cells, "max_per_cell": cell_capacity, "pair_capacity": pair_capacity, "cells_hold": cells_hold,
        "check_errors": bool(check_errors),
        "units": {"positions": "nm", "box": "nm", "energy": "kJ/mol"},
        "model_energy_unit": schnet.config.energy_unit,
        "training_data_sha256": model_metadata.get("training", {}).get("data_sha256"),
        "model": model_metadata,
    }
    return module, metadata


def count_molecules(topology, indices) -> int:
    """Connected components of the topology's bonds among `indices` (1 when it declares no bonds there: then
    nothing is known about molecules)."""
    import networkx as nx

    chosen = set(int(k) for k in indices)
    edges = [(a.index, b.index) for a, b in topology.bonds() if a.index in chosen and b.index in chosen]
    if not edges:
        return 1
    graph = nx.Graph()
    graph.add_nodes_from(chosen)
    graph.add_edges_from(edges)
    return nx.number_connected_components(graph)


def _topology_atoms(topology, atoms: Sequence[int] | None):
    from openmm import unit

    z = np.array([a.element.atomic_number if a.element is not None else 0 for a in topology.atoms()])
    indices = np.arange(len(z)) if atoms is None else np.asarray(atoms, dtype=np.int64)
    if (z[indices] == 0).any():
        raise ValueError("some selected atoms have no element in the topology")
    box = topology.getPeriodicBoxVectors()
    box_nm = None if box is None else np.array(box.value_in_unit(unit.nanometer))
    return z[indices], indices, len(z), box_nm


def _drop_simtk_notice(record: logging.LogRecord) -> bool:
    return "importing 'simtk.openmm' is deprecated" not in record.getMessage()


def openmm_torch():
    """Import openmmtorch so its kernels work, whatever was imported first.

    The openmmtorch plugins link torch's libraries (libtorch_cuda, libnvrtc), which only resolve once
    torch is loaded. If `import openmm` ran before `import torch`, OpenMM has already tried and failed to
    load them; load those plugin libraries again now that torch is in the process."""
    import openmm

    if "openmmtorch" not in sys.modules:
        # openmmtorch 1.5's SWIG module imports simtk.openmm, which logs a deprecation notice through the
        # root logger on every run (fixed upstream after 1.5); drop that one record, nothing else.
        root = logging.getLogger()
        root.addFilter(_drop_simtk_notice)
        try:
            import openmmtorch  # noqa: F401
        finally:
            root.removeFilter(_drop_simtk_notice)
    import openmmtorch

    for failure in openmm.Platform.getPluginLoadFailures():
        if "Error loading library " not in failure:
            continue
        library = failure.split("Error loading library ", 1)[1].split(": ", 1)[0]
        if "OpenMMTorch" in library and Path(library).is_file() and "OpenCL" not in library:
            try:
                openmm.Platform.loadPluginLibrary(library)
            except Exception:  # a platform this machine lacks (e.g. CUDA without a GPU) stays unavailable
                pass
    return openmmtorch


def _targets(topology_or_atomic_numbers, atoms):
    if hasattr(topology_or_atomic_numbers, "atoms"):
        return _topology_atoms(topology_or_atomic_numbers, atoms)
    all_z = np.asarray(topology_or_atomic_numbers, dtype=np.int64)
    indices = np.arange(len(all_z)) if atoms is None else np.asarray(atoms, dtype=np.int64)
    return all_z[indices], indices, len(all_z), None


def create_torch_force(model: ModelLike, topology_or_atomic_numbers, atoms: Sequence[int] | None = None,
                       periodic: bool | None = None, dtype: str = "float32", neighbor_list: str = "auto",
                       positions=None, box=None, capacity: int | None = None, max_per_cell: int | None = None,
                       cuda_graphs: bool = False, tabulate: bool = False, box_shrink: float = BOX_SHRINK):
    """A ready `openmmtorch.TorchForce` for `model` acting on `atoms` of an OpenMM Topology (default:
    all of them), or on a list of atomic numbers (one per particle). Periodicity follows the
    topology's box unless given. cuda_graphs=True turns on openmm-torch's CUDA graphs and exports the
    graph-safe module (bad input gives a NaN energy instead of an exception; see OpenMMSchNet). tabulate=True
    takes the filters from spline tables (schnet_md.tabulated): faster, the same forces to float32 precision.

    `model` may also be a file written by `export_model`: it is used as exported, after checking that its
    particles and elements are those of the topology (the error names the first atom that differs)."""
    openmmtorch = openmm_torch()
    if isinstance(model, (str, os.PathLike)) and file_kind(model) == "openmm-force":
        fixed = [name for name, given in (("dtype", dtype != "float32"), ("neighbor_list", neighbor_list != "auto"),
                                          ("positions", positions is not None), ("box", box is not None),
                                          ("capacity", capacity is not None), ("max_per_cell", max_per_cell is not None),
                                          ("tabulate", tabulate)) if given]
        if fixed:
            raise ValueError(f"{model} is an exported force, so {', '.join(fixed)} cannot change here (set when it "
                             "was exported); export it again to change them")
        _, metadata = load_exported(model)
        check_atoms(model, metadata, topology_or_atomic_numbers, atoms)
        if periodic is not None and periodic != metadata["periodic"]:
            raise ValueError(f"{model} was exported for a {'periodic' if metadata['periodic'] else 'non-periodic'} "
                             "system; export it again for this one")
        if cuda_graphs and metadata["check_errors"]:
            raise ValueError(f"{model} was exported with error checks, which a CUDA graph cannot capture; export it "
                             "again with cuda_graphs=True")
        periodic = metadata["periodic"]
        force = openmmtorch.TorchForce(str(model))
    else:
        z, indices, n_particles, box_nm = _targets(topology_or_atomic_numbers, atoms)
        periodic = box_nm is not None if periodic is None else periodic
        box_nm = box_nm if box is None else _nm(box)
        n_molecules = count_molecules(topology_or_atomic_numbers, indices) \
            if hasattr(topology_or_atomic_numbers, "bonds") else 1
        module, _ = build_module(model, z, indices, n_particles, periodic, dtype, neighbor_list, box_nm,
                                 None if positions is None else _nm(positions), capacity, max_per_cell,
                                 check_errors=not cuda_graphs, n_molecules=n_molecules, tabulate=tabulate,
                                 box_shrink=box_shrink)
        force = openmmtorch.TorchForce(module)
    return _configured(force, periodic, cuda_graphs)


def _configured(force, periodic: bool, cuda_graphs: bool):
    force.setUsesPeriodicBoundaryConditions(periodic)
    force.setOutputsForces(False)
    if cuda_graphs:
        force.setProperty("useCUDAGraphs", "true")
    return force


def load_torch_force(path: str | os.PathLike):
    """An `openmmtorch.TorchForce` from a file of `export_model` / `schnet-md export`, configured from the file's
    own checked metadata: periodic boundary conditions for a periodic export, CUDA graphs for a graph-safe one.
    Its particles are not checked here (no topology): create_torch_force(path, topology) does that."""
    _, metadata = load_exported(path)
    return _configured(openmm_torch().TorchForce(str(path)), bool(metadata["periodic"]),
                       not metadata["check_errors"])


def expected_atoms(metadata: dict) -> str:
    """The particles an exported OpenMM force expects, e.g. '9 particles: C2 H6 O1 in this order: C C O H ...'."""
    n, indices = metadata["n_particles"], metadata["particle_indices"]
    where = "" if indices == list(range(n)) else f", the model's atoms at particles {_ranges(indices)}"
    return f"{n} particles{where}: {atom_order(metadata['atomic_numbers'])}"


def _ranges(indices: Sequence[int]) -> str:
    """'0-8, 12, 15-16' for [0, 1, ..., 8, 12, 15, 16]."""
    runs: List[List[int]] = []
    for k in indices:
        if runs and k == runs[-1][1] + 1:
            runs[-1][1] = k
        else:
            runs.append([k, k])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def check_atoms(path, metadata: dict, topology_or_atomic_numbers, atoms: Sequence[int] | None = None) -> None:
    """Refuse an exported OpenMM force that does not fit the system at hand (an OpenMM Topology or one atomic
    number per particle): another particle count, other particles selected, or another element order. A bare
    `TorchForce(path)` cannot tell; the error names the first atom that differs."""
    if metadata.get("format") != "schnet-md/openmm-force":
        raise ModelFileError(f"{path} is not an exported OpenMM force (format {metadata.get('format')!r})")
    if hasattr(topology_or_atomic_numbers, "atoms"):
        system = list(topology_or_atomic_numbers.atoms())
        z = [a.element.atomic_number if a.element is not None else 0 for a in system]
        names = [f"atom {a.index} ({a.residue.name}{a.residue.id}:{a.name})" for a in system]
    else:
        z = [int(k) for k in topology_or_atomic_numbers]
        names = [f"particle {k}" for k in range(len(z))]
    expected = expected_atoms(metadata)
    if len(z) != metadata["n_particles"]:
        raise ValueError(f"{path} was exported for {expected}, but the system has {len(z)} particles")
    if atoms is not None and [int(k) for k in atoms] != metadata["particle_indices"]:
        raise ValueError(f"{path} acts on other particles than the {len(atoms)} selected: it expects {expected}")
    for k, wanted in zip(metadata["particle_indices"], metadata["atomic_numbers"]):
        if z[k] != wanted:
            raise ValueError(f"{path} does not fit this system: {names[k]} is {symbol(z[k])} here but {symbol(wanted)} "
                             f"in the force, which expects {expected}; export it again for this structure")


def molecule_bonds(topology, atoms=None, force_group: int = 0):
    """A zero-energy force listing the bonds among `atoms` (default: all). OpenMM learns which atoms form a
    molecule from the bonds its forces declare. A SchNet force declares none (and createMixedSystem removes the
    ML region's MM bonds), so getState(enforcePeriodicBox=True) - as DCD writers use it - would wrap each atom
    into the box on its own, splitting molecules across the boundary in the output (the dynamics are
    unaffected). Add it to periodic systems."""
    import openmm

    chosen = set(range(topology.getNumAtoms())) if atoms is None else set(atoms)
    force = openmm.CustomBondForce("0")
    force.setName("SchNet molecule bonds (zero energy; keeps molecules whole in periodic output)")
    for a, b in topology.bonds():
        if a.index in chosen and b.index in chosen:
            force.addBond(a.index, b.index, [])
    force.setUsesPeriodicBoundaryConditions(True)
    force.setForceGroup(force_group)
    return force


def _nm(value) -> np.ndarray:
    from openmm import unit

    if unit.is_quantity(value):
        value = value.value_in_unit(unit.nanometer)
    return np.asarray(value, dtype=np.float64)


class SchNetComputation:
    """The computation of an `openmm.PythonForce`: State (nm) -> (energy kJ/mol, forces kJ/mol/nm).

    It pickles (PythonForce serialises and clones through pickle) by keeping the plain OpenMMSchNet
    module and rebuilding the TorchScript (or torch.compile) version after loading."""

    def __init__(self, module: OpenMMSchNet, periodic: bool, compile: bool = False, device: str = "cpu",
                 fused: bool = False):
        self.module = module
        self.periodic = periodic
        self.compile = compile
        self.device = device
        self.fused = fused
        self._build()

    def _build(self) -> None:
        # a copy on the device runs; self.module stays on the CPU for pickling (Module.to() would move it in
        # place, under the running copy's feet when OpenMM pickles the force to build a Context)
        running = copy.deepcopy(self.module).to(self.device)
        if self.fused:                      # the Triton CFConv (schnet_md.fused), eager
            from .fused import FusedSchNet

            running.model = FusedSchNet(running.model)
            self._run = running
        else:
            self._run = torch.compile(running) if self.compile else torch.jit.script(running)

    def __getstate__(self):
        return {"module": self.module, "periodic": self.periodic, "compile": self.compile, "device": self.device,
                "fused": self.fused}

    def __setstate__(self, state):
        self.__dict__.update({"fused": False} | state)
        self._build()

    def __call__(self, state):
        from openmm import unit

        positions = torch.from_numpy(np.ascontiguousarray(
            state.getPositions(asNumpy=True).value_in_unit(unit.nanometer))).to(self.device).requires_grad_(True)
        box = None
        if self.periodic:
            box = torch.from_numpy(np.ascontiguousarray(
                state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(unit.nanometer))).to(self.device)
        energy = self._run(positions, box)
        (grad,) = torch.autograd.grad(energy, positions)
        return float(energy.detach()), -grad.cpu().numpy()


def create_python_force(model: ModelLike, topology_or_atomic_numbers, atoms: Sequence[int] | None = None,
                        periodic: bool | None = None, dtype: str = "float32", compile: bool = False,
                        device: str = "cpu", neighbor_list: str = "auto", positions=None, capacity: int | None = None,
                        fused: bool = False, tabulate: bool = False):
    """The same model as `create_torch_force`, through OpenMM's own `PythonForce` (OpenMM >= 8.5): no
    openmm-torch needed, serialisable and clonable; optionally `torch.compile`d (on CUDA, inductor fuses the
    elementwise passes into Triton kernels). `device` is where the model runs ("cuda" on a GPU, whatever
    the OpenMM platform): positions and forces cross to Python and the device every step, so it is slower per
    step than TorchForce for small molecules. fused=True (CUDA, float32) runs every CFConv as one Triton kernel
    (`schnet_md.fused`; for large systems, where the CFConv's passes over pairs dominate; its filter products in
    TF32, forces within ~0.2 % of the largest, and 15x less memory than TorchScript on a 24k-atom box).
    tabulate=True: spline tables for the filters, as in `create_torch_force`."""
    import openmm

    if not hasattr(openmm, "PythonForce"):
        raise RuntimeError(f"OpenMM {openmm.__version__} has no PythonForce (needs OpenMM >= 8.5)")
    if fused and (compile or dtype != "float32"):
        raise ValueError("fused=True runs the Triton CFConv in float32 without torch.compile")
    if fused and tabulate:
        raise ValueError("fused=True and tabulate=True are two ways to compute the filters: choose one")
    z, indices, n_particles, box_nm = _targets(topology_or_atomic_numbers, atoms)
    periodic = box_nm is not None if periodic is None else periodic
    n_molecules = count_molecules(topology_or_atomic_numbers, indices) \
        if hasattr(topology_or_atomic_numbers, "bonds") else 1
    # The computation sees every particle's position (OpenMM 8.5's PythonForce has no particle subset) and
    # the module picks its own, as the TorchForce does; the other particles get zero force.
    module, _ = build_module(model, z, indices, n_particles, periodic, dtype, neighbor_list, box_nm,
                             None if positions is None else _nm(positions), capacity, n_molecules=n_molecules,
                             script=False, tabulate=tabulate)
    force = openmm.PythonForce(SchNetComputation(module, periodic, compile, device, fused))
    force.setUsesPeriodicBoundaryConditions(periodic)
    return force


def export_model(model: ModelLike, structure, out: str | Path, atoms: Sequence[int] | None = None,
                 dtype: str = "float32", periodic: bool | None = None, neighbor_list: str = "auto",
                 capacity: int | None = None, max_per_cell: int | None = None, cuda_graphs: bool = False,
                 tabulate: bool = False, box_shrink: float = BOX_SHRINK) -> Path:
    """Write the TorchScript force for `structure` (a schnet_md Structure or OpenMM Topology); tabulate=True
    takes the filters from spline tables (schnet_md.tabulated); box_shrink: see build_module (graph-safe
    exports only)."""
    topology = getattr(structure, "topology", structure)
    z, indices, n_particles, box_nm = _topology_atoms(topology, atoms)
    periodic = box_nm is not None if periodic is None else periodic
    positions_nm = getattr(structure, "positions_nm", None)
    module, metadata = build_module(model, z, indices, n_particles, periodic, dtype, neighbor_list, box_nm,
                                    positions_nm, capacity, max_per_cell, check_errors=not cuda_graphs,
                                    n_molecules=count_molecules(topology, indices), tabulate=tabulate,
                                    box_shrink=box_shrink)
    return save_exported(module, metadata, out)


def metadata_sha1(text: bytes) -> str:
    """The checksum of an export's metadata. SHA-1 because libtorch ships it (c10::sha1), so the LAMMPS pair style
    checks the same digest without a hash of its own; it tells a damaged or edited file, not a forged one."""
    return hashlib.sha1(text).hexdigest()


ARCHIVE_DIGEST_FILE = "schnet_md.sha1"   # extra file: the checksum of every other member of the archive


def archive_sha1(source) -> str:
    """SHA-1 over the members of a TorchScript archive (its code, constants, module attributes such as unit
    factors, and tensors), each as name, size and bytes in name order, leaving out the extra files and torch's
    random serialization id. The LAMMPS pair style computes the same digest. A damaged member whose zip CRC no
    longer matches counts as damaged."""
    digest = hashlib.sha1()
    with zipfile.ZipFile(source) as archive:
        members = sorted((name.split("/", 1)[1], name) for name in archive.namelist() if "/" in name)
        for relative, name in members:
            if relative.startswith("extra/") or relative == ".data/serialization_id":
                continue
            data = archive.read(name)
            digest.update(relative.encode() + b"\0" + len(data).to_bytes(8, "little"))
            digest.update(data)
    return digest.hexdigest()


def save_exported(module: torch.jit.ScriptModule, metadata: dict, out: str | Path) -> Path:
    """Write a scripted OpenMM or LAMMPS module with its metadata (the TorchScript extra file METADATA_FILE),
    atomically. The module holds the checksum of the metadata, and the extra file ARCHIVE_DIGEST_FILE the checksum
    of everything else in the archive (weights, code, attributes), so a file edited or damaged anywhere that
    matters is refused by load_exported (and by the pair style)."""
    from .runs import atomic_write

    text = json.dumps(dict(metadata, tensors_sha256=tensors_sha256(module.state_dict())))
    module.metadata_sha1 = metadata_sha1(text.encode())
    draft = io.BytesIO()
    torch.jit.save(module, draft, _extra_files={METADATA_FILE: text})
    digest = archive_sha1(io.BytesIO(draft.getvalue()))
    out = atomic_write(out, writer=lambda fh: torch.jit.save(
        module, fh, _extra_files={METADATA_FILE: text, ARCHIVE_DIGEST_FILE: digest}))
    if archive_sha1(out) != digest:     # torch wrote the module differently the second time: never ship that
        out.unlink()
        raise RuntimeError(f"{out}: the saved module does not reproduce its checksum; nothing was written")
    return out


def torchscript_message(text: str) -> str:
    """The message of an error raised inside a TorchScript module, without the interpreter's traceback."""
    marker = "builtins."
    if marker in text:
        last = text.rsplit(marker, 1)[1]
        return last.split(": ", 1)[1].strip() if ": " in last else last.strip()
    return text.strip()


def load_exported(path: str | Path) -> Tuple[torch.jit.ScriptModule, dict]:
    """Load an exported module (OpenMM force or LAMMPS) and its metadata, with a clear error for a damaged,
    edited or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"exported force file {path} does not exist")
    kind = file_kind(path)
    if kind not in ("openmm-force", "lammps-module", "torchscript", "unknown"):
        what = FILE_KINDS.get(kind, "a torch archive (a schnet-md model file?)")
        raise ModelFileError(f"{path} is {what}, not an exported force: write one with "
                             "`schnet-md export MODEL --structure FILE --out FORCE.pt`")
    extra = {METADATA_FILE: "", ARCHIVE_DIGEST_FILE: ""}
    try:
        module = torch.jit.load(str(path), _extra_files=extra, map_location="cpu")
    except (RuntimeError, ValueError) as err:
        raise ModelFileError(f"{path} is not a readable TorchScript force file (damaged or truncated?): "
                             f"{str(err).splitlines()[0]}") from None
    text = extra[METADATA_FILE]
    text = text.encode() if isinstance(text, str) else text
    if not text:
        raise ModelFileError(f"{path} is TorchScript but not a schnet-md export (no {METADATA_FILE})")
    try:
        metadata = json.loads(text)
        version = int(metadata["format_version"])
    except (ValueError, TypeError, KeyError):
        raise ModelFileError(f"{path} is damaged: its metadata ({METADATA_FILE}) is not readable; export it again") \
            from None
    if version < 2:
        warn_once(path, f"{path} was exported before exports carried a checksum (format {version}): its metadata "
                        "and weights are not checked; export it again to have them checked")
        return module, metadata
    recorded = extra[ARCHIVE_DIGEST_FILE]
    recorded = recorded.decode() if isinstance(recorded, bytes) else recorded
    if recorded or version >= 3:
        try:
            intact = recorded == archive_sha1(path)
        except (zipfile.BadZipFile, zlib.error, OSError):
            intact = False
        if not intact:
            raise ModelFileError(f"{path} is damaged: its contents (weights, code or settings such as unit factors) "
                                 "do not match the checksum written with them (edited or damaged?); export it again")
    else:
        warn_once(path, f"{path} was exported before exports carried a checksum of all their contents: only its "
                        "metadata and weights are checked; export it again to have everything checked")
    if getattr(module, "metadata_sha1", None) != metadata_sha1(text):
        raise ModelFileError(f"{path} is damaged: its metadata ({METADATA_FILE}) does not match the checksum inside "
                             "the module (edited or damaged?); export it again")
    if metadata.get("tensors_sha256") != tensors_sha256(module.state_dict()):
        raise ModelFileError(f"{path} is damaged: its weights do not match the checksum in its metadata (a copy "
                             "altered or damaged?); export it again")
    return module, metadata
