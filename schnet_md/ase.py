"""ASE calculator: `atoms.calc = SchNetCalculator("ethanol")` gives energy (eV), forces (eV/Å) and, for
periodic cells, stress (eV/Å^3, from the strain derivative), so ASE's optimisers, MD and NEB work.

Units convert here, once: the model's energy unit -> eV. ASE's lengths are Å, as the model's."""

from __future__ import annotations

import numpy as np
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes

from .model import energy_forces_strain
from .modelfile import model_at
from .units import energy_factor


class SchNetCalculator(Calculator):
    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, model="ethanol", dtype: str = "float64", device: str = "cpu", **kwargs):
        super().__init__(**kwargs)
        self.model = model_at(model, dtype)[0].to(device)
        self.ev_per_model_energy = energy_factor(self.model.config.energy_unit, "eV")

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        pbc = self.atoms.pbc
        if pbc.any() and not pbc.all():
            raise ValueError("SchNetCalculator needs a cell periodic in all three directions or in none "
                             f"(got pbc={pbc.tolist()})")
        if "stress" in properties and not pbc.all():
            raise PropertyNotImplementedError("stress needs a periodic cell")
        cell = self.atoms.cell.array if pbc.all() else None
        energy, forces, d_strain = energy_forces_strain(self.model, self.atoms.numbers, self.atoms.positions, cell)
        f = self.ev_per_model_energy
        self.results["energy"] = self.results["free_energy"] = energy * f
        self.results["forces"] = forces * f
        if cell is not None:
            sigma = d_strain * f / abs(np.linalg.det(cell))     # stress = (1/V) dE/d(strain)
            self.results["stress"] = np.array([sigma[0, 0], sigma[1, 1], sigma[2, 2],
                                               sigma[1, 2], sigma[0, 2], sigma[0, 1]])
