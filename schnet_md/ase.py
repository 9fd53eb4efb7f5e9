"""ASE calculator: `atoms.calc = SchNetCalculator("ethanol")` gives energy (eV), forces (eV/Å) and, for
periodic cells, stress (eV/Å^3, from the strain derivative), so ASE's optimisers, MD and NEB work.

Units convert here, once: the model's energy unit -> eV. ASE's lengths are Å, as the model's."""

from __future__ import annotations

import numpy as np
import torch
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes

from .modelfile import load_model
from .model import SchNet
from .neighbors import reduced_cell
from .units import energy_factor


class SchNetCalculator(Calculator):
    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, model="ethanol", dtype: str = "float64", device: str = "cpu", **kwargs):
        super().__init__(**kwargs)
        torch_dtype = {"float32": torch.float32, "float64": torch.float64}[dtype]
        if isinstance(model, SchNet):
            self.model = model.to(torch_dtype).eval()
        else:
            self.model, _ = load_model(model, dtype=torch_dtype)
        self.model.to(device)
        self.dtype, self.device = torch_dtype, torch.device(device)
        self.ev_per_model_energy = energy_factor(self.model.config.energy_unit, "eV")

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        pbc = self.atoms.pbc
        if pbc.any() and not pbc.all():
            raise ValueError("SchNetCalculator needs a cell periodic in all three directions or in none "
                             f"(got pbc={pbc.tolist()})")
        if "stress" in properties and not pbc.all():
            raise PropertyNotImplementedError("stress needs a periodic cell")
        z = torch.as_tensor(self.atoms.numbers, device=self.device)
        positions = np.asarray(self.atoms.positions, dtype=np.float64)
        rotation = np.eye(3)
        cell = lattice = None
        if pbc.all():
            rotation, lattice, _ = reduced_cell(self.atoms.cell.array)
            cell = torch.as_tensor(self.atoms.cell.array @ rotation, dtype=self.dtype, device=self.device)
            lattice = torch.as_tensor(lattice, dtype=self.dtype, device=self.device)
        r = torch.as_tensor(positions @ rotation, dtype=self.dtype, device=self.device).requires_grad_(True)
        strain = torch.zeros(3, 3, dtype=self.dtype, device=self.device, requires_grad=True)
        deform = torch.eye(3, dtype=self.dtype, device=self.device) + 0.5 * (strain + strain.T)
        box = None if cell is None else lattice @ (cell @ deform)
        energy = self.model(z, r @ deform, box)
        wanted = [r] + ([strain] if cell is not None else [])
        grads = torch.autograd.grad(energy, wanted)
        f = self.ev_per_model_energy
        self.results["energy"] = self.results["free_energy"] = float(energy.detach()) * f
        self.results["forces"] = -grads[0].detach().cpu().numpy() @ rotation.T * f
        if cell is not None:
            volume = abs(np.linalg.det(self.atoms.cell.array))
            sigma = rotation @ (grads[1].detach().cpu().numpy() * f / volume) @ rotation.T
            self.results["stress"] = np.array([sigma[0, 0], sigma[1, 1], sigma[2, 2],
                                               sigma[1, 2], sigma[0, 2], sigma[0, 1]])
