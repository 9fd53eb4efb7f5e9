"""SchNet (Schütt et al., NeurIPS 2017), readable against the paper.

    E = sum_i  scale * y_i + shift + E_ref[Z_i]
    y_i = readout(x_i^(T))                              atom-wise readout
    x_i^(t+1) = x_i^(t) + v_i^(t)                       interaction block, residual
    v_i = Dense(ssp(Dense(cfconv(x)_i)))
    cfconv(x)_i = sum_{j != i} Dense_nobias(x)_j * W(r_ij)      continuous-filter convolution
    W(r) = ssp(Dense(ssp(Dense(e(r))))) * f_cut(r)             filter-generating network
    e_k(r) = exp(-gamma (r - mu_k)^2)                            Gaussian expansion
    x_i^(0) = embedding(Z_i)

Forces are -dE/dr by autograd. Lengths are Å; energies are in the model's `energy_unit`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import List, Optional

import torch
from torch import Tensor, nn

from . import elements as _elements
from .neighbors import check_box, minimum_image, unique_pairs

MAX_ATOMIC_NUMBER = 118


def shifted_softplus(x: Tensor) -> Tensor:
    """ssp(x) = ln(0.5 e^x + 0.5): softplus shifted so that ssp(0) = 0."""
    return nn.functional.softplus(x) - math.log(2.0)


class ShiftedSoftplus(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return shifted_softplus(x)


@dataclass
class SchNetConfig:
    """Hyper-parameters of one SchNet; `elements` are the atomic numbers it was built for."""
    elements: List[int]
    n_features: int = 64            # F, width of atom features and filters
    n_interactions: int = 3         # T, interaction blocks
    n_gaussians: int = 301          # K, Gaussians in the distance expansion
    mu_min: float = 0.0             # Å, first Gaussian centre
    mu_max: float = 30.0            # Å, last Gaussian centre
    gamma: float = 10.0             # Å^-2, Gaussian width parameter
    cutoff: Optional[float] = None  # Å; None sums over all pairs
    cutoff_function: str = "none"   # "none" or "cosine"
    energy_unit: str = "kcal/mol"
    preset: str = "custom"
    # Variants found in other SchNet codes (schnetpack 2.x): the paper's values are the defaults.
    n_filters: Optional[int] = None       # filter width; None = n_features (paper)
    filter_activation: str = "ssp"        # "ssp" (paper) or "none" (schnetpack: filter network ends linear)
    readout_activation: str = "ssp"       # "ssp" (paper) or "silu" (schnetpack's Atomwise default)

    def __post_init__(self) -> None:
        self.elements = sorted(int(z) for z in self.elements)
        if not self.elements or len(set(self.elements)) != len(self.elements):
            raise ValueError("elements must be a non-empty list of distinct atomic numbers")
        if any(z < 1 or z > MAX_ATOMIC_NUMBER for z in self.elements):
            raise ValueError(f"atomic numbers must lie in 1..{MAX_ATOMIC_NUMBER}, got {self.elements}")
        if self.cutoff_function not in ("none", "cosine"):
            raise ValueError(f"cutoff_function must be 'none' or 'cosine', got {self.cutoff_function!r}")
        if self.cutoff_function == "cosine" and not (self.cutoff and self.cutoff > 0):
            raise ValueError("a cosine cutoff needs a positive cutoff distance")
        if self.cutoff_function == "none" and self.cutoff is not None:
            raise ValueError("cutoff is set but cutoff_function is 'none'; use cutoff_function='cosine'")
        if self.filter_activation not in ("ssp", "none") or self.readout_activation not in ("ssp", "silu"):
            raise ValueError("filter_activation must be 'ssp' or 'none', readout_activation 'ssp' or 'silu'")
        if self.n_features < 2 or self.n_interactions < 1 or self.n_gaussians < 1:
            raise ValueError("n_features >= 2, n_interactions >= 1 and n_gaussians >= 1 are required")

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS = {
    # NeurIPS 2017: F=64, 3 interactions, mu in 0..30 Å every 0.1 Å, gamma = 10 Å^-2, all pairs.
    "schnet2017": dict(n_features=64, n_interactions=3, n_gaussians=301, mu_min=0.0, mu_max=30.0,
                       gamma=10.0, cutoff=None, cutoff_function="none"),
    # J. Chem. Phys. 2018: F=128, 6 interactions, 25 Gaussians on 0..5 Å, cosine cutoff at 5 Å;
    # gamma = 0.5 / spacing^2 so neighbouring Gaussians overlap at one standard deviation.
    "schnet2018": dict(n_features=128, n_interactions=6, n_gaussians=25, mu_min=0.0, mu_max=5.0,
                       gamma=0.5 / (5.0 / 24) ** 2, cutoff=5.0, cutoff_function="cosine"),
}


def config_from_preset(preset: str, elements: List[int], **overrides) -> SchNetConfig:
    """A config from a named preset, with any field overridden."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    values = dict(PRESETS[preset], preset=preset)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return SchNetConfig(elements=list(elements), **values)


class GaussianExpansion(nn.Module):
    """e_k(d) = exp(-gamma (d - mu_k)^2), k = 1..K.

    The exponent is clamped at -80 (e^-80 ~ 2e-35, below the resolution of float32 and float64 next to
    the nearest Gaussian, which is ~1): CPU exp takes a ~10x slower path for large negative arguments,
    and with 301 Gaussians most arguments are large and negative."""

    def __init__(self, mu_min: float, mu_max: float, n_gaussians: int, gamma: float):
        super().__init__()
        self.register_buffer("mu", torch.linspace(mu_min, mu_max, n_gaussians))
        self.gamma = gamma

    def forward(self, distances: Tensor) -> Tensor:
        return torch.exp(torch.clamp(-self.gamma * (distances[:, None] - self.mu) ** 2, min=-80.0))


class CosineCutoff(nn.Module):
    """f(d) = (cos(pi d / r_c) + 1) / 2 for d < r_c, else 0: smooth, so forces stay continuous."""

    def __init__(self, cutoff: float):
        super().__init__()
        self.cutoff = cutoff

    def forward(self, distances: Tensor) -> Tensor:
        f = 0.5 * (torch.cos(distances * (math.pi / self.cutoff)) + 1.0)
        return f * (distances < self.cutoff).to(distances.dtype)


class NoCutoff(nn.Module):
    def forward(self, distances: Tensor) -> Tensor:
        return torch.ones_like(distances)


class FilterNetwork(nn.Module):
    """Filter-generating network: Dense(K->F) + ssp -> Dense(F->F) + ssp (schnetpack: last layer linear)."""

    def __init__(self, n_gaussians: int, n_filters: int, last_activation: bool = True):
        super().__init__()
        self.dense1 = nn.Linear(n_gaussians, n_filters)
        self.dense2 = nn.Linear(n_filters, n_filters)
        self.last_activation = last_activation

    def forward(self, expansion: Tensor) -> Tensor:
        w = self.dense2(shifted_softplus(self.dense1(expansion)))
        return shifted_softplus(w) if self.last_activation else w


class CFConv(nn.Module):
    """Continuous-filter convolution: x_i <- sum_{j != i} Dense_nobias(x)_j * W(r_ij).

    Pairs come as a full list (every ordered pair (i, j)) or a half list (each unordered pair once).
    W(r_ij) = W(r_ji), so a half list computes each filter once and sends it both ways."""

    def __init__(self, n_features: int, n_gaussians: int, n_filters: int, filter_last_activation: bool = True):
        super().__init__()
        self.in2f = nn.Linear(n_features, n_filters, bias=False)
        self.filter_network = FilterNetwork(n_gaussians, n_filters, filter_last_activation)

    def forward(self, x: Tensor, expansion: Tensor, envelope: Tensor, i: Tensor, j: Tensor,
                half_list: bool = False) -> Tensor:
        return self.convolve(x, self.filter_network(expansion) * envelope[:, None], i, j, half_list)

    def convolve(self, x: Tensor, filters: Tensor, i: Tensor, j: Tensor, half_list: bool = False) -> Tensor:
        """The convolution with given filters W(r_ij) [pairs, F] (the filter network's, or a table's)."""
        h = self.in2f(x)
        out = torch.zeros(x.shape[0], h.shape[1], dtype=x.dtype, device=x.device)
        out = out.index_add(0, i, h.index_select(0, j) * filters)
        if half_list:
            out = out.index_add(0, j, h.index_select(0, i) * filters)
        return out


class Interaction(nn.Module):
    """Interaction block: cfconv -> Dense + ssp -> Dense; the caller adds the result back (residual)."""

    def __init__(self, n_features: int, n_gaussians: int, n_filters: int, filter_last_activation: bool = True):
        super().__init__()
        self.cfconv = CFConv(n_features, n_gaussians, n_filters, filter_last_activation)
        self.dense1 = nn.Linear(n_filters, n_features)
        self.dense2 = nn.Linear(n_features, n_features)

    def forward(self, x: Tensor, expansion: Tensor, envelope: Tensor, i: Tensor, j: Tensor,
                half_list: bool = False) -> Tensor:
        return self.update(self.cfconv(x, expansion, envelope, i, j, half_list))

    def update(self, v: Tensor) -> Tensor:
        """The atom-wise layers after the cfconv: Dense + ssp -> Dense."""
        return self.dense2(shifted_softplus(self.dense1(v)))


class AtomwiseReadout(nn.Module):
    """Atom-wise energy: Dense(F->F/2) + ssp -> Dense(->1), then scale, shift and element reference.

    scale, shift and the per-element reference energies are fitted on the training data (see
    `schnet_md.train.fit_energy_statistics`) so the network only learns an O(1) correction."""

    def __init__(self, n_features: int, n_species: int, silu: bool = False):
        super().__init__()
        self.dense1 = nn.Linear(n_features, n_features // 2)
        self.dense2 = nn.Linear(n_features // 2, 1)
        self.silu = silu
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("shift", torch.tensor(0.0))
        self.register_buffer("reference_energies", torch.zeros(n_species))

    def forward(self, x: Tensor, species: Tensor, include_reference: bool = True) -> Tensor:
        h = self.dense1(x)
        h = nn.functional.silu(h) if self.silu else shifted_softplus(h)
        y = self.dense2(h).squeeze(-1)
        energies = self.scale * y + self.shift
        if include_reference:
            energies = energies + self.reference_energies[species]
        return energies


class SchNet(nn.Module):
    """The SchNet energy model. Call it as `model(atomic_numbers, positions_angstrom[, box_angstrom])`."""

    def __init__(self, config: SchNetConfig):
        super().__init__()
        self.config = config
        n_species = len(config.elements)
        species_of_z = torch.full((MAX_ATOMIC_NUMBER + 1,), -1, dtype=torch.long)
        species_of_z[torch.tensor(config.elements)] = torch.arange(n_species)
        self.register_buffer("species_of_z", species_of_z)
        self.element_symbols: List[str] = [_elements.symbol(z) for z in config.elements]
        self.periodic_table: List[str] = [_elements.symbol(z) for z in range(MAX_ATOMIC_NUMBER + 1)]
        self.cutoff: float = float(config.cutoff) if config.cutoff is not None else float("inf")

        self.embedding = nn.Embedding(n_species, config.n_features)
        self.expansion = GaussianExpansion(config.mu_min, config.mu_max, config.n_gaussians, config.gamma)
        self.envelope = CosineCutoff(config.cutoff) if config.cutoff_function == "cosine" else NoCutoff()
        n_filters = config.n_filters or config.n_features
        self.interactions = nn.ModuleList(
            [Interaction(config.n_features, config.n_gaussians, n_filters, config.filter_activation == "ssp")
             for _ in range(config.n_interactions)])
        self.readout = AtomwiseReadout(config.n_features, n_species, config.readout_activation == "silu")

    def species(self, atomic_numbers: Tensor) -> Tensor:
        """Map atomic numbers to embedding rows; an element the model was not built for is an error."""
        z = atomic_numbers.to(torch.long)
        if bool(((z < 1) | (z > 118)).any()):
            raise ValueError("atomic numbers must lie in 1..118")
        s = self.species_of_z[z]
        if bool((s < 0).any()):
            bad = int(z[s < 0][0])
            raise ValueError("element " + self.periodic_table[bad] + " (atomic number " + str(bad)
                             + ") is not one this model was trained on (" + ", ".join(self.element_symbols) + ")")
        return s

    def atomic_energies(self, species: Tensor, vectors: Tensor, i: Tensor, j: Tensor,
                        include_reference: bool = True, half_list: bool = False) -> Tensor:
        """Per-atom energies from species and pair vectors r_ij = r_j - r_i (Å), the pairs a full list
        (both orders) or, with half_list, each pair once. Without the element reference energies (a
        constant for fixed composition) they are small, so sums stay precise."""
        distances = torch.linalg.norm(vectors, dim=-1)
        expansion = self.expansion(distances)
        envelope = self.envelope(distances)
        x = self.embedding(species)
        for interaction in self.interactions:
            x = x + interaction(x, expansion, envelope, i, j, half_list)
        return self.readout(x, species, include_reference)

    def forward(self, atomic_numbers: Tensor, positions: Tensor, box: Optional[Tensor] = None) -> Tensor:
        """Energy of one system: positions [n, 3] in Å, optional reduced box [3, 3] in Å."""
        if positions.dim() != 2 or positions.shape[1] != 3 or positions.shape[0] != atomic_numbers.shape[0]:
            raise ValueError("positions must have shape [n_atoms, 3] matching atomic_numbers; got "
                             + str(list(positions.shape)) + " for " + str(atomic_numbers.shape[0]) + " atoms")
        if not bool(torch.isfinite(positions).all()):
            raise ValueError("positions contain NaN or infinite values")
        species = self.species(atomic_numbers)
        i, j = unique_pairs(positions.shape[0], positions.device)
        vectors = positions.index_select(0, j) - positions.index_select(0, i)   # (see neighbors.cell_list_pairs)
        if box is not None:
            check_box(box, self.cutoff)
            vectors = minimum_image(vectors, box.to(positions.dtype))
        return self.atomic_energies(species, vectors, i, j, half_list=True).sum()

    @torch.jit.export
    def batch_energy(self, species: Tensor, positions: Tensor, i: Tensor, j: Tensor,
                     molecule: Tensor, n_molecules: int) -> Tensor:
        """Energies [n_molecules] of molecules stored one after another (training and evaluation);
        i, j: the half list of intra-molecular pairs (`data.batches` makes it)."""
        e_atoms = self.atomic_energies(species, positions.index_select(0, j) - positions.index_select(0, i), i, j,
                                       half_list=True)
        return torch.zeros(n_molecules, dtype=e_atoms.dtype, device=e_atoms.device).index_add(0, molecule, e_atoms)


def energy_and_forces(model: SchNet, atomic_numbers: Tensor, positions: Tensor,
                      box: Optional[Tensor] = None):
    """Energy and forces F = -dE/dr of one system, in the model's units (Å, energy_unit)."""
    positions = positions.detach().clone().requires_grad_(True)
    energy = model(atomic_numbers, positions, box)
    (grad,) = torch.autograd.grad(energy, positions)
    return energy.detach(), -grad


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["SchNet", "SchNetConfig", "PRESETS", "config_from_preset", "energy_and_forces",
           "GaussianExpansion", "CosineCutoff", "FilterNetwork", "CFConv", "Interaction",
           "AtomwiseReadout", "shifted_softplus"]


def energy_forces_strain(model: SchNet, atomic_numbers, positions, cell=None):
    """Energy, forces and strain derivative dE/d(epsilon) [3, 3] of one system in the model's units (Å),
    for any cell (rows a, b, c; numpy or None). The cell is rotated and lattice-reduced into the form the
    in-graph minimum image needs (`neighbors.reduced_cell`), and everything is rotated back, so callers
    (ASE, LAMMPS) can pass cells as their engines store them. Returns numpy arrays (float64)."""
    import numpy as np

    from .neighbors import reduced_cell

    parameter = next(model.parameters())
    dtype, device = parameter.dtype, parameter.device
    z = torch.as_tensor(np.asarray(atomic_numbers), device=device)
    positions = np.asarray(positions, dtype=np.float64)
    rotation = np.eye(3)
    lattice = rotated_cell = None
    if cell is not None:
        rotation, lattice_map, _ = reduced_cell(cell)
        rotated_cell = torch.as_tensor(np.asarray(cell) @ rotation, dtype=dtype, device=device)
        lattice = torch.as_tensor(lattice_map, dtype=dtype, device=device)
    r = torch.as_tensor(positions @ rotation, dtype=dtype, device=device).requires_grad_(True)
    strain = torch.zeros(3, 3, dtype=dtype, device=device, requires_grad=True)
    deform = torch.eye(3, dtype=dtype, device=device) + 0.5 * (strain + strain.T)
    box = None if rotated_cell is None else lattice @ (rotated_cell @ deform)
    energy = model(z, r @ deform, box)
    grad_r, grad_strain = torch.autograd.grad(energy, [r, strain], allow_unused=True)
    forces = -grad_r.detach().cpu().double().numpy() @ rotation.T
    d_strain = np.zeros((3, 3)) if grad_strain is None else \
        rotation @ grad_strain.detach().cpu().double().numpy() @ rotation.T
    return float(energy.detach()), forces, d_strain
