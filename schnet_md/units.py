"""Every unit constant schnet-md uses, defined once.

Inside a model, lengths are Å and energies are in the model's own energy unit (the unit of the data it
was trained on, recorded in its metadata). Each boundary converts exactly once:
  * data readers: the data set's units -> the model's units
  * export (OpenMM): nm -> Å on the way in, model unit -> kJ/mol on the way out
  * ASE / LAMMPS adapters: their units -> the model's units and back
"""

from __future__ import annotations

ANGSTROM_PER_NM = 10.0
NM_PER_ANGSTROM = 0.1

KJ_PER_KCAL = 4.184                      # thermochemical calorie, exact
EV_PER_HARTREE = 27.211386245988         # CODATA 2018
KJ_PER_EV = 96.48533212331002            # e * N_A / 1000, CODATA 2018 (exact in SI 2019)
KJ_PER_HARTREE = EV_PER_HARTREE * KJ_PER_EV
MEV_PER_EV = 1000.0

# Energy units a model or data set may declare, each as kJ/mol per unit.
ENERGY_UNITS = {
    "kJ/mol": 1.0,
    "kcal/mol": KJ_PER_KCAL,
    "eV": KJ_PER_EV,
    "meV": KJ_PER_EV / MEV_PER_EV,
    "Hartree": KJ_PER_HARTREE,
}

# Length units, each as Å per unit.
LENGTH_UNITS = {
    "Angstrom": 1.0,
    "nm": ANGSTROM_PER_NM,
    "Bohr": 0.529177210903,               # CODATA 2018
}


def energy_factor(from_unit: str, to_unit: str) -> float:
    """Multiply an energy in `from_unit` by this to get it in `to_unit`."""
    return _lookup(ENERGY_UNITS, from_unit, "energy") / _lookup(ENERGY_UNITS, to_unit, "energy")


def length_factor(from_unit: str, to_unit: str) -> float:
    """Multiply a length in `from_unit` by this to get it in `to_unit`."""
    return _lookup(LENGTH_UNITS, from_unit, "length") / _lookup(LENGTH_UNITS, to_unit, "length")


def _lookup(table: dict, unit: str, kind: str) -> float:
    try:
        return table[unit]
    except KeyError:
        raise ValueError(f"unknown {kind} unit {unit!r}; known: {', '.join(table)}") from None
