"""Trajectories for analysis: a schnet-md run folder, any trajectory mdtraj reads plus a topology, or an
iso17x reference trajectory ('iso17x:MOL' or 'iso17x:MOL:PATH')."""

from __future__ import annotations

import contextlib
import csv
import ctypes
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import mdtraj
import numpy as np

DEFAULT_ISO17X = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "iso17x"


@dataclass
class LoadedTrajectory:
    traj: mdtraj.Trajectory
    label: str
    state: Optional[dict] = None          # columns of state.csv as arrays, one row per frame
    run_info: dict = field(default_factory=dict)
    reference_energies_ev: Optional[np.ndarray] = None
    time_unit: str = "ps"                  # "frame" when a bare file gave no time step
    files: list = field(default_factory=list)   # what it was read from (a labelling job records them)


def load_trajectory(spec: str | Path, top: Optional[str | Path] = None, label: Optional[str] = None,
                    timestep_ps: Optional[float] = None, need_time: bool = False) -> LoadedTrajectory:
    """A run folder, a trajectory file with its topology, or iso17x:MOL. A bare file's time axis comes
    from timestep_ps (ps between frames) or, beside a run.json, from the run's settings; need_time makes a
    missing time step an error instead of a frame-number axis."""
    spec_s = str(spec)
    if spec_s.startswith("iso17x:"):
        parts = spec_s.split(":")
        if len(parts) < 2 or not parts[1].isdigit():
            raise ValueError(f"{spec_s!r}: use iso17x:MOL with MOL an isomer number (e.g. iso17x:128)")
        return load_iso17x(int(parts[1]), Path(parts[2]) if len(parts) > 2 else DEFAULT_ISO17X, label)
    path = Path(spec)
    if path.is_dir():
        return _load_run(path, label)
    if not path.is_file():
        raise FileNotFoundError(f"trajectory {path} does not exist")
    if top is None:
        raise ValueError(f"{path} needs a topology (--top FILE.pdb)")
    traj = _load(path, top)
    if timestep_ps is None and (path.parent / "run.json").is_file():
        settings = json.loads((path.parent / "run.json").read_text()).get("settings", {})
        if "timestep_fs" in settings and "report_interval" in settings:
            timestep_ps = settings["timestep_fs"] * settings["report_interval"] / 1000.0
    if timestep_ps is not None:
        if not timestep_ps > 0:
            raise ValueError(f"--timestep must be positive (ps between frames), got {timestep_ps}")
        traj.time = np.arange(traj.n_frames) * float(timestep_ps)
    elif need_time:
        raise ValueError(f"{path} carries no reliable time step: give --timestep PS (picoseconds between frames), "
                         "or analyse the run folder")
    else:
        traj.time = np.arange(traj.n_frames, dtype=float)
    return LoadedTrajectory(traj, label or path.stem, time_unit="ps" if timestep_ps is not None else "frame",
                            files=[path, Path(top)])


# What mdtraj's DCD reader (VMD's dcdplugin, C code) prints to stdout on every open; nothing else is dropped.
DCD_CHATTER = ("dcdplugin) detected standard 32-bit DCD file of native endianness",
               "dcdplugin) CHARMM format DCD file (also NAMD 2.1 and later)")


@contextlib.contextmanager
def _without_dcd_chatter():
    """Capture what C code writes to file descriptor 1 meanwhile and pass it on, less DCD_CHATTER."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):   # no usable stdout: nothing to keep clean
        yield
        return
    libc = ctypes.CDLL(None)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 1)
        try:
            yield
        finally:
            libc.fflush(None)         # C stdio buffers what it printed; write it into the capture now
            os.dup2(saved, 1)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode(errors="replace").splitlines(keepends=True)
                    if line.rstrip("\n") not in DCD_CHATTER]
            if kept:
                sys.stdout.write("".join(kept))
                sys.stdout.flush()


def read_trajectory(path: str | Path, top: str | Path) -> mdtraj.Trajectory:
    """mdtraj.load(path, top=top), without the DCD reader's chatter on stdout."""
    with _without_dcd_chatter(), _ascii_path(path) as readable:
        return mdtraj.load(readable, top=str(top))


@contextlib.contextmanager
def _ascii_path(path: str | Path):
    """`path`, or a link to it under an ASCII name: mdtraj's DCD reader encodes file names as ASCII and fails on
    any other character (a folder named résultats/)."""
    path = str(path)
    if path.isascii():
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="schnet-md-") as folder:
        link = Path(folder) / ("trajectory" + Path(path).suffix)
        link.symlink_to(Path(path).resolve())
        yield str(link)


def _load(path: Path, top) -> mdtraj.Trajectory:
    top_path = Path(top)
    if not top_path.is_file():
        raise FileNotFoundError(f"topology {top_path} does not exist")
    n_top = mdtraj.load_topology(str(top_path)).n_atoms
    try:
        traj = read_trajectory(path, top_path)
    except (ValueError, OSError, IOError) as err:
        raise ValueError(f"cannot read {path} with topology {top_path} ({n_top} atoms): {err}") from None
    if traj.n_atoms != n_top:
        raise ValueError(f"{path} has {traj.n_atoms} atoms per frame but {top_path} has {n_top}")
    if traj.n_frames == 0:
        raise ValueError(f"{path} holds no frames")
    return traj


def _load_run(folder: Path, label: Optional[str]) -> LoadedTrajectory:
    traj_path, top_path = folder / "trajectory.dcd", folder / "topology.pdb"
    for p in (traj_path, top_path):
        if not p.is_file():
            raise FileNotFoundError(f"{folder} is not a schnet-md run folder: {p.name} is missing")
    traj = _load(traj_path, top_path)
    info = json.loads((folder / "run.json").read_text()) if (folder / "run.json").is_file() else {}
    state = None
    if (folder / "state.csv").is_file():
        with open(folder / "state.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        state = {k: np.array([float(r[k]) if r[k] != "" else np.nan for r in rows]) for k in (rows[0] if rows else {})}
        if state and len(state["step"]) == traj.n_frames:
            traj.time = state["time_ps"].copy()
        elif state:
            raise ValueError(f"{folder}: state.csv has {len(state['step'])} rows for {traj.n_frames} frames")
    return LoadedTrajectory(traj, label or folder.name, state, info, files=[traj_path, top_path])


def load_iso17x(mol: int, folder: Path = DEFAULT_ISO17X, label: Optional[str] = None) -> LoadedTrajectory:
    """The GFN2-xTB reference MD of iso17x isomer `mol` (1,000 frames, 2.5 ps at 500 K)."""
    from ..structures import molecule_topology

    npz_path = Path(folder) / "iso17x.npz"
    if not npz_path.is_file():
        raise FileNotFoundError(f"iso17x data not found at {npz_path}")
    with np.load(npz_path) as npz:
        frames = np.nonzero(npz["mol"] == mol)[0]
        if len(frames) == 0:
            raise ValueError(f"iso17x has no isomer {mol}")
        steps, eq = npz["step"][frames], npz["eq"][frames]
        z, r, e = npz["Z"][frames[0]], npz["R"][frames], npz["E"][frames]
    eq_positions = r[np.nonzero(eq)[0][0]].astype(np.float64)
    md = np.nonzero(~eq)[0]
    md = md[np.argsort(steps[md])]
    topology = mdtraj.Topology.from_openmm(molecule_topology(z.tolist(), eq_positions))
    traj = mdtraj.Trajectory(r[md] / 10.0, topology, time=steps[md] * 0.5e-3)   # Å -> nm; 0.5 fs steps -> ps
    return LoadedTrajectory(traj, label or f"iso17x mol {mol} (GFN2-xTB)", reference_energies_ev=e[md],
                            files=[npz_path])
