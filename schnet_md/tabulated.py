"""Tabulated filters: each interaction block's filter as a spline of the distance, for faster MD.

In a CFConv the filter W(d) = FilterNetwork(GaussianExpansion(d)) * envelope(d) depends on the pair distance d
alone, so for a trained (frozen) model it is a fixed smooth curve R -> R^F per block. This module samples
it once, in float64, on a uniform grid and replaces the Gaussian expansion and the filter network's two dense
layers (for schnet2017: 301 Gaussians -> 64 -> 64, per pair and block, forward and backward) by a lookup in a
table of cubic Hermite polynomials:

    W(d) ~ c0[k] + t (c1[k] + t (c2[k] + t c3[k])),   k = floor(d / h), t = d / h - k

The spline matches W and dW/dd at every grid point (dW/dd from forward-mode autodiff of the exact filter), so
W and the forces are continuous (energy is conserved in NVE). Its error is checked against the exact filter
between the grid points when the table is built, in W and in dW/dd (which the forces feel, and which converges
one order slower); the spacing shrinks until both are below `tolerance`, relative to their largest magnitudes.
A cutoff is a grid point: W f_cut has a kink in its second derivative there. Beyond the table the filter is
constant, as the exact one is: with a cutoff the envelope is zero there; without one every Gaussian sits at the
expansion's clamp (e^-80) once d is more than sqrt(80 / gamma) beyond the last centre.

Everything stays in TorchScript, so it runs inside openmm-torch's TorchForce on every platform and in CUDA
graphs (`create_torch_force(..., tabulate=True)`, `schnet-md export --tabulate`), and in LAMMPS's pair style
(`export_lammps(..., tabulate=True)`, both ghost modes). It is for MD with frozen weights; training keeps the
network.
"""

from __future__ import annotations

import copy
import math
from typing import List, Tuple

import torch
from torch import Tensor, nn

from .model import SchNet

DEFAULT_TOLERANCE = 1e-6   # largest spline error in W and dW/dd, relative to their largest magnitudes: forces then
# differ from the network's by about float32 rounding (shipped ethanol, aspirin, iso17x)
MAX_INTERVALS = 1 << 16
CHUNK = 4096               # distances per piece when the tables are checked


def filter_extent(model: SchNet) -> float:
    """Distance (Å) beyond which every block's filter is constant: the cutoff, or, without one, the point where
    the last Gaussian reaches the expansion's clamp."""
    if model.cutoff != float("inf"):
        return float(model.cutoff)
    return float(model.expansion.mu.max()) + math.sqrt(80.0 / model.expansion.gamma)


def exact_filters(model: SchNet, distances: Tensor) -> List[Tensor]:
    """W(d) * envelope(d) of every interaction block, [n, F] each, in the dtype of `distances`."""
    return [block_filter(model, b, distances) for b in range(len(model.interactions))]


def block_filter(model: SchNet, block: int, distances: Tensor) -> Tensor:
    """W(d) * envelope(d) of one interaction block, [n, F]."""
    network = model.interactions[block].cfconv.filter_network
    return network(model.expansion(distances)) * model.envelope(distances)[:, None]


def with_slope(function, distances: Tensor):
    """(f(d), df/dd) of a function acting on each distance separately, by forward-mode autodiff."""
    return torch.func.jvp(function, (distances,), (torch.ones_like(distances),))


def hermite_coefficients(values: Tensor, slopes: Tensor, spacing: float) -> Tensor:
    """[n_intervals, 4, F] cubic coefficients in t = (d - d_k) / h from values and dW/dd at the n + 1 nodes."""
    y0, y1 = values[:-1], values[1:]
    m0, m1 = slopes[:-1] * spacing, slopes[1:] * spacing
    return torch.stack([y0, m0, 3.0 * (y1 - y0) - 2.0 * m0 - m1, 2.0 * (y0 - y1) + m0 + m1], dim=1)


def evaluate(coefficients: Tensor, k: Tensor, t: Tensor) -> Tensor:
    c = coefficients.index_select(0, k)
    t = t[:, None]
    return c[:, 0] + t * (c[:, 1] + t * (c[:, 2] + t * c[:, 3]))


def build_tables(model: SchNet, tolerance: float = DEFAULT_TOLERANCE, spacing: float = 0.05):
    """(spacing Å, [n_intervals, 4, F] float64 coefficients per block, largest relative error) of a grid whose
    spline error between the nodes, in the filters and in their slopes dW/dd (each relative to its largest
    magnitude), stays below `tolerance`: from `spacing`, each try shrinks it by the error's h^3 scaling."""
    model = model.double()
    extent = filter_extent(model)
    with torch.no_grad():
        while True:
            n = int(math.ceil(extent / spacing))
            spacing = extent / n   # the extent a node: W f_cut has a kink in its second derivative at the cutoff
            if n > MAX_INTERVALS:
                raise ValueError(f"the filters need more than {MAX_INTERVALS} table intervals for a relative error "
                                 f"of {tolerance:g}; ask for a larger tolerance")
            nodes = torch.arange(n + 1, dtype=torch.float64) * spacing
            tables = [hermite_coefficients(*with_slope(lambda d: block_filter(model, b, d), nodes), spacing)
                      for b in range(len(model.interactions))]
            # a cubic Hermite spline's error peaks mid-interval in the value and near t = 0.5 -+ 0.29 in the slope
            # (the forces' error: the larger, O(h^3) against O(h^4)); probe every interval there
            probe_t = torch.tensor([0.21, 0.5, 0.79], dtype=torch.float64)
            k = torch.arange(n).repeat_interleave(len(probe_t))
            t = probe_t.repeat(n)
            error = 0.0
            for b, c in enumerate(tables):
                largest = torch.zeros(4, dtype=torch.float64)   # max |W - spline|, |W' - spline'|, |W|, |W'|
                for start in range(0, len(t), CHUNK):            # in chunks: [probes, K] arrays stay small
                    kk, tt = k[start:start + CHUNK], t[start:start + CHUNK]
                    exact, exact_slope = with_slope(lambda x: block_filter(model, b, x), (kk + tt) * spacing)
                    spline, spline_slope = with_slope(lambda x: evaluate(c, kk, x / spacing - kk), (kk + tt) * spacing)
                    largest = torch.maximum(largest, torch.stack([
                        (spline - exact).abs().max(), (spline_slope - exact_slope).abs().max(),
                        exact.abs().max(), exact_slope.abs().max()]))
                error = max(error, float(largest[0] / largest[2].clamp(min=1e-30)),
                            float(largest[1] / largest[3].clamp(min=1e-30)))
            if error <= tolerance:
                return spacing, tables, error
            spacing *= min(0.9, max(0.25, 0.9 * (tolerance / error) ** (1.0 / 3.0)))


class TabulatedInteraction(nn.Module):
    """An interaction block whose CFConv takes its filter from a table (see module docstring)."""

    def __init__(self, interaction, coefficients: Tensor):
        super().__init__()
        self.block = interaction
        self.register_buffer("coefficients", coefficients)

    def forward(self, x: Tensor, k: Tensor, t: Tensor, i: Tensor, j: Tensor, half_list: bool) -> Tensor:
        return self.block.update(self.convolve(x, k, t, i, j, half_list))

    def convolve(self, x: Tensor, k: Tensor, t: Tensor, i: Tensor, j: Tensor, half_list: bool) -> Tensor:
        return self.block.cfconv.convolve(x, evaluate(self.coefficients, k, t), i, j, half_list)


class TabulatedSchNet(nn.Module):
    """A frozen SchNet whose filters come from tables: `atomic_energies` as SchNet's, to the table's tolerance.
    Build it from a model in its final dtype (the tables take it)."""

    def __init__(self, model: SchNet, tolerance: float = DEFAULT_TOLERANCE):
        super().__init__()
        dtype = model.readout.scale.dtype
        spacing, tables, error = build_tables(copy.deepcopy(model), tolerance)
        self.config = model.config
        self.cutoff = model.cutoff
        self.spacing = float(spacing)
        self.n_intervals = int(tables[0].shape[0])
        self.max_relative_error = float(error)
        self.embedding = model.embedding
        self.readout = model.readout
        self.interactions = nn.ModuleList([TabulatedInteraction(block, table.to(dtype))
                                           for block, table in zip(model.interactions, tables)])
        self._model = [model]   # not a submodule: only for species(), outside the TorchScript graph

    def species(self, atomic_numbers: Tensor) -> Tensor:
        return self._model[0].species(atomic_numbers)

    def record(self) -> dict:
        """What an export's metadata says about the tables."""
        return {"kind": "tabulated", "spacing_angstrom": self.spacing, "intervals": self.n_intervals,
                "max_relative_error": self.max_relative_error}

    def grid(self, distances: Tensor) -> Tuple[Tensor, Tensor]:
        """(interval k, position t in it) of each distance; beyond the table its last value, slope zero."""
        x = distances / self.spacing
        k = torch.clamp(torch.floor(x.detach()), max=float(self.n_intervals - 1)).to(torch.long)
        return k, torch.clamp(x - k.to(x.dtype), max=1.0)

    def atomic_energies(self, species: Tensor, vectors: Tensor, i: Tensor, j: Tensor,
                        include_reference: bool = True, half_list: bool = False) -> Tensor:
        k, t = self.grid(torch.linalg.norm(vectors, dim=-1))
        x = self.embedding(species)
        for interaction in self.interactions:
            x = x + interaction(x, k, t, i, j, half_list)
        return self.readout(x, species, include_reference)

