"""Element symbols and atomic numbers (the periodic table is OpenMM's, so names match topologies)."""

from __future__ import annotations

from typing import Iterable, Sequence

from openmm import unit
from openmm.app import element as _element


def symbol(z: int) -> str:
    """Chemical symbol of atomic number `z`, e.g. 8 -> 'O'."""
    try:
        return _element.Element.getByAtomicNumber(int(z)).symbol
    except (KeyError, AttributeError):
        return f"Z={int(z)}"


def mass(z: int) -> float:
    """Standard atomic mass of atomic number `z` in g/mol (dalton), e.g. 8 -> 15.999."""
    return _element.Element.getByAtomicNumber(int(z)).mass.value_in_unit(unit.dalton)


def atomic_number(sym: str) -> int:
    """Atomic number of a chemical symbol (case-insensitive), with a clear error for unknown ones."""
    try:
        return _element.Element.getBySymbol(sym.strip().capitalize()).atomic_number
    except KeyError:
        raise ValueError(f"unknown element symbol {sym!r}") from None


def _hill_counts(numbers: Iterable[int]) -> dict:
    """{symbol: count} in Hill order: C, H, then alphabetical (alphabetical throughout without carbon)."""
    counts: dict[str, int] = {}
    for z in numbers:
        counts[symbol(z)] = counts.get(symbol(z), 0) + 1
    order = (["C", "H"] if "C" in counts else []) + sorted(k for k in counts if k not in ("C", "H") or "C" not in counts)
    return {s: counts[s] for s in order}


def formula(numbers: Iterable[int]) -> str:
    """Hill-order formula, e.g. [6, 6, 8, 1, ...] -> 'C2H6O'."""
    return "".join(f"{s}{n if n > 1 else ''}" for s, n in _hill_counts(numbers).items())


ORDER_SHOWN = 100   # atoms listed one by one in atom_order; longer sequences end with "..."


def atom_order(numbers: Sequence[int]) -> str:
    """The elements and their order, e.g. 'C2 H6 O1 in this order: C C O H H H H H H'."""
    counts = " ".join(f"{s}{n}" for s, n in _hill_counts(numbers).items())
    shown = " ".join(symbol(z) for z in numbers[:ORDER_SHOWN])
    return f"{counts} in this order: {shown}" + (f" ... ({len(numbers)} in all)" if len(numbers) > ORDER_SHOWN else "")
