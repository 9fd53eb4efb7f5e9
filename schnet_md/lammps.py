"""The LAMMPS-facing module, for `pair_style schnet` (plugins/lammps/schnet_md_lammps/pair_schnet.cpp).

LAMMPS hands the pair style the species of its local and ghost atoms and a full neighbour list; the pair
style gives this module the species and the pair vectors r_j - r_i (Å) of that list, and the module turns
them into per-atom energies in the model's unit. The pair style sums the energies of its local atoms, adds
the element reference energies in double precision, takes the gradient with respect to each pair vector by
autograd (forces, and per-atom virials from those per-pair terms) and converts the energy unit to LAMMPS's
(`energy_to_ev` for `units metal`, `energy_to_kcal_mol` for `units real`): that conversion happens there,
once. It reads these numbers, the elements and their masses from the export's metadata
(export.save_exported: checksummed).

Two ways to be exact across MPI ranks, chosen in the pair style (`ghost deep | exchange`):
  deep      `forward` on all local + ghost atoms, the ghost shell T cutoffs deep (T interaction blocks);
  exchange  `embed`, then per block `interact` on local atoms, with the pair style sending the new
            features to the ghost copies between blocks (and their gradients back in the backward
            pass), so one cutoff of ghosts suffices; `readout` at the end.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from . import __version__
from .elements import mass
from .model import SchNet
from .units import energy_factor

LAMMPS_FORMAT = "schnet-md/lammps"
LAMMPS_FORMAT_VERSION = 3     # 3: pair vectors in, not positions (2: checksummed metadata; 1: module attributes)


class LAMMPSSchNet(nn.Module):
    """Per-atom SchNet energies for LAMMPS; pair vectors r_j - r_i in Å, pairs (i, j) a full list (both orders)."""

    def __init__(self, model: SchNet):
        super().__init__()
        from .export import inference_copy

        self.model = inference_copy(model)
        self.metadata_sha1: str = ""   # set by save_exported; the pair style checks it

    def forward(self, species: Tensor, vectors: Tensor, i: Tensor, j: Tensor) -> Tensor:
        """Energies [n_atoms] (without the element references) of every atom given."""
        return self.model.atomic_energies(species, vectors, i, j, include_reference=False, half_list=False)

    @torch.jit.export
    def embed(self, species: Tensor) -> Tensor:
        """x^(0) [n_atoms, F]: depends on the species only, so ghosts get it without communication."""
        return self.model.embedding(species)

    @torch.jit.export
    def interact(self, block: int, x: Tensor, vectors: Tensor, i: Tensor, j: Tensor, n_local: int) -> Tensor:
        """x^(t+1) = x^(t) + v^(t) of interaction block `block` for the first n_local atoms (every pair's i is
        one of them); ghost atoms get theirs from their owners, so no work is spent on them here."""
        distances = torch.linalg.norm(vectors, dim=-1)
        expansion = self.model.expansion(distances)
        envelope = self.model.envelope(distances)
        out = x.narrow(0, 0, n_local)
        for k, interaction in enumerate(self.model.interactions):
            if k == block:
                messages = interaction.cfconv(x, expansion, envelope, i, j, False).narrow(0, 0, n_local)
                out = out + interaction.update(messages)
        return out

    @torch.jit.export
    def readout(self, x: Tensor, species: Tensor) -> Tensor:
        """Per-atom energies (without element references) from the last features."""
        return self.model.readout(x, species, False)


class TabulatedLAMMPSSchNet(LAMMPSSchNet):
    """The same module with every block's filter taken from spline tables (schnet_md.tabulated)."""

    def __init__(self, model: SchNet):
        super().__init__(model)
        from .tabulated import TabulatedSchNet

        self.tables = TabulatedSchNet(self.model)

    def forward(self, species: Tensor, vectors: Tensor, i: Tensor, j: Tensor) -> Tensor:
        return self.tables.atomic_energies(species, vectors, i, j, include_reference=False, half_list=False)

    @torch.jit.export
    def interact(self, block: int, x: Tensor, vectors: Tensor, i: Tensor, j: Tensor, n_local: int) -> Tensor:
        k, t = self.tables.grid(torch.linalg.norm(vectors, dim=-1))
        out = x.narrow(0, 0, n_local)
        for b, interaction in enumerate(self.tables.interactions):
            if b == block:
                out = out + interaction.block.update(interaction.convolve(x, k, t, i, j, False).narrow(0, 0, n_local))
        return out


def export_lammps(model, out: str | Path, dtype: str = "float64", tabulate: bool = False) -> Path:
    """Write the TorchScript file `pair_coeff * * FILE C H O` loads (float64 by default: LAMMPS runs in
    double precision; float32 is faster). tabulate=True takes the filters from spline tables
    (schnet_md.tabulated: fewer operations per step, forces equal to ~1e-6 of the largest)."""
    from .export import save_exported
    from .modelfile import model_at

    schnet, metadata = model_at(model, dtype)
    lammps_module = TabulatedLAMMPSSchNet(schnet) if tabulate else LAMMPSSchNet(schnet)
    module = torch.jit.script(lammps_module)
    filters = lammps_module.tables.record() if tabulate else {"kind": "network"}
    config = schnet.config
    # what pair_schnet.cpp reads; species k of the module is elements[k]
    info = {"format": LAMMPS_FORMAT, "format_version": LAMMPS_FORMAT_VERSION, "schnet_md_version": __version__,
            "elements": config.elements, "element_symbols": list(schnet.element_symbols),
            "element_masses": [mass(z) for z in config.elements],
            "reference_energies": lammps_module.model.readout.reference_energies.double().tolist(),
            "cutoff_angstrom": config.cutoff, "n_interactions": config.n_interactions,
            "n_features": config.n_features, "precision": dtype, "filters": filters,
            "model_energy_unit": config.energy_unit, "energy_to_ev": energy_factor(config.energy_unit, "eV"),
            "energy_to_kcal_mol": energy_factor(config.energy_unit, "kcal/mol"), "model": metadata}
    return save_exported(module, info, out)
