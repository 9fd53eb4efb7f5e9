"""Reference labels for new molecules: GFN2-xTB energies and forces (tblite) or DFT at rMD17's level of theory
(PBE/def2-SVP through PySCF, method "PBE/def2-SVP"), and reference MD sampling (xTB).

Both write the rMD17 npz format the trainer reads (`nuclear_charges`, `coords` Å, `energies` kcal/mol,
`forces` kcal/mol/Å, `old_indices` = frame numbers): tblite speaks eV, and the writer converts once.
Work is split over worker processes (one OpenMP thread each) and kept in OUT.parts/ as it finishes, so
an interrupted run resumes where it stopped: OUT.parts/job.json records what the job labels (its settings, the
frames' SHA-256 and the input files by path, size and SHA-256) with a run id, and a rerun that would label
something else is refused, naming what differs. One process at a time writes OUT and OUT.parts/ (OUT's lock), and
every file is written whole or not at all (runs.atomic_write).
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import shutil
import signal
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from . import runs
from .units import energy_factor

KCAL_PER_EV = energy_factor("eV", "kcal/mol")
CHUNK = 50   # most frames per resumable unit of labelling work (fewer when that leaves a worker idle)


def _xtb_calculator(method: str = "GFN2-xTB", charge: int = 0, multiplicity: int = 1):
    try:
        from tblite.ase import TBLite
    except ImportError:
        raise ImportError("reference labels need tblite: pip install 'schnet-md[xtb]'") from None
    return TBLite(method=method, charge=charge, multiplicity=multiplicity, verbosity=0)


def xtb_energy_forces(numbers, positions_angstrom, method: str = "GFN2-xTB", charge: int = 0, calc=None):
    """(energy eV, forces eV/Å) of one structure."""
    from ase import Atoms

    atoms = Atoms(numbers=numbers, positions=positions_angstrom)
    atoms.calc = calc or _xtb_calculator(method, charge)
    return float(atoms.get_potential_energy()), np.array(atoms.get_forces())


DFT_METHODS = {"PBE/def2-SVP": ("pbe", "def2-svp")}     # rMD17's level of theory
EV_PER_HARTREE = energy_factor("Hartree", "eV")
BOHR_PER_ANGSTROM = 1.0 / 0.529177210903


def dft_energy_forces(numbers, positions_angstrom, method: str = "PBE/def2-SVP", charge: int = 0):
    """(energy eV, forces eV/Å) of one structure by Kohn-Sham DFT in PySCF: tight SCF, a dense grid (rMD17 used
    'very tight SCF, dense grid'), no density fitting."""
    try:
        from pyscf import dft, gto
    except ImportError:
        raise ImportError("DFT labels need PySCF: pip install 'schnet-md[dft]'") from None
    xc, basis = DFT_METHODS[method]
    mol = gto.M(atom=[(int(z), tuple(map(float, r))) for z, r in zip(numbers, positions_angstrom)], unit="Angstrom",
                basis=basis, charge=charge, spin=(int(sum(numbers)) - charge) % 2, verbose=0)
    mf = dft.RKS(mol) if mol.spin == 0 else dft.UKS(mol)
    mf.xc = xc
    mf.grids.level = 5
    mf.conv_tol = 1e-10
    energy = mf.kernel()
    if not mf.converged:
        # stretched bonds (what refinement labels) defeat plain DIIS now and then; a level shift, then second-order
        # SCF from there, reach the same self-consistent solution
        mf.level_shift = 0.3
        mf.max_cycle = 200
        energy = mf.kernel(dm0=mf.make_rdm1())
        if not mf.converged:
            mf = mf.newton()
            energy = mf.kernel(dm0=mf.make_rdm1())
    if not mf.converged:
        raise RuntimeError("SCF did not converge")
    gradient = mf.nuc_grad_method().kernel()                  # Hartree/Bohr
    return float(energy) * EV_PER_HARTREE, -np.asarray(gradient) * EV_PER_HARTREE * BOHR_PER_ANGSTROM


def _energy_forces(numbers, r, method, charge, calc):
    if method in DFT_METHODS:
        return dft_energy_forces(numbers, r, method, charge)
    return xtb_energy_forces(numbers, r, method, charge, calc)


PR_SET_PDEATHSIG = 1      # Linux prctl: the signal a process gets when its parent ends


def _worker_init(parent: int = 0) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    if not parent:
        return
    # The kernel kills this worker when the command's process ends, however it ends (kill -9 included). A worker
    # left running would go on through the queued work, writing parts after the command's lock is gone, beside a
    # resumed run.
    try:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):     # not Linux: workers end when they next find the pool gone
        return
    if os.getppid() != parent:            # the command ended before prctl took effect
        os._exit(1)


def _pool(processes: int):
    """Worker processes (spawned, one OpenMP thread each) that end with this process."""
    return mp.get_context("spawn").Pool(processes, initializer=_worker_init, initargs=(os.getpid(),))


def _parts(out: Path, command: str, overwrite: bool) -> Path:
    """OUT.parts/, where `command` keeps its resumable work beside OUT (covered by OUT's lock). An OUT without it
    was not made by a labelling or sampling run (a file of the user's): refused unless `overwrite`, which removes
    everything of an earlier run first (OUT, OUT.parts/, OUT.json, OUT.failed.json)."""
    parts = Path(str(out) + ".parts")
    if overwrite:
        if parts.exists():
            shutil.rmtree(parts)
        for path in (out, Path(str(out) + ".json"), Path(str(out) + ".failed.json")):
            path.unlink(missing_ok=True)
    elif out.exists() and not parts.is_dir():
        raise runs.RunFolderError(f"{out} exists but no {command} run made it (there is no {parts.name} beside it); "
                                  "pass --overwrite to replace it, or choose another --out")
    parts.mkdir(parents=True, exist_ok=True)
    return parts


NEW_JOB = "--overwrite, or another --out"


def _recorded_job(parts: Path) -> dict:
    path = parts / "job.json"
    return runs.read_json(path, "record of the job its parts belong to") if path.is_file() else {}


def _job(parts: Path, out: Path, settings: dict, inputs: Sequence = (), **first) -> dict:
    """The record of the job in `parts` (job.json). A new job records `settings`, its input files (path, size,
    SHA-256), a run id and `first` (how the work is cut); a resumed one must have been started with the same
    settings and inputs, else it is refused, naming what differs. Records of older versions lack some of these:
    they are recorded now."""
    settings = settings | {"input_files": [str(Path(p).resolve()) for p in inputs]}
    job = _recorded_job(parts)
    if not job:
        job = {"run_id": runs.new_run_id(), **settings, **first, "inputs": [runs.input_record(p) for p in inputs]}
    else:
        runs.require_inputs(job.get("inputs", []), out, NEW_JOB)
        runs.require_settings(job, {key: value for key, value in settings.items() if key in job}, out, NEW_JOB)
        if set(settings) <= set(job) and "run_id" in job and "inputs" in job:
            return job
        job = {"run_id": runs.new_run_id(), **settings, "inputs": [runs.input_record(p) for p in inputs]} | job
    runs.write_json(parts / "job.json", job)
    return job


def _label_chunk(task):
    from ase.calculators.calculator import CalculationFailed

    numbers, coords, method, charge, out = task
    calc = None if method in DFT_METHODS else _xtb_calculator(method, charge)
    energies, forces = [], []
    for r in coords:
        try:
            e, f = _energy_forces(numbers, r, method, charge, calc)
        except (CalculationFailed, RuntimeError):   # e.g. SCF not converged on a broken geometry: flag the frame
            e, f = float("nan"), np.full((len(numbers), 3), np.nan)
            if calc is not None:
                calc = _xtb_calculator(method, charge)    # no stale wavefunction guess for the next frame
        energies.append(e)
        forces.append(f)
    runs.atomic_write(out, writer=lambda fh: np.savez(fh, energies_ev=np.array(energies), forces_ev=np.array(forces)))
    return out


def label_frames(numbers: Sequence[int], coords_angstrom: np.ndarray, out: str | Path, method: str = "GFN2-xTB",
                 charge: int = 0, workers: int = 0, indices: Optional[np.ndarray] = None, inputs: Sequence = (),
                 overwrite: bool = False) -> Path:
    """Label frames [n, atoms, 3] (Å) of one molecule; writes `out` (rMD17 npz). Resumable from OUT.parts/ when
    the same frames are labelled with the same method and charge, and `inputs` (the files the frames were read
    from) are unchanged; anything else is refused, naming what differs. `overwrite` starts afresh, also over an
    OUT that no labelling made. Frames the method fails on, or that put two atoms closer than data.MIN_DISTANCE,
    are left out, and said so."""
    out = Path(out)
    numbers = np.asarray(numbers, dtype=np.int64)
    coords = np.asarray(coords_angstrom, dtype=np.float64)
    if coords.ndim != 3 or coords.shape[1:] != (len(numbers), 3):
        raise ValueError(f"coordinates have shape {coords.shape}, expected (frames, {len(numbers)}, 3)")
    if not np.isfinite(coords).all():
        raise ValueError("coordinates contain NaN or infinite values")
    with runs.exclusive(out, "label", file=True):
        parts = _parts(out, "label", overwrite)
        workers = workers or max(1, (os.cpu_count() or 1))
        job = _job(parts, out, {"command": "label", "method": method, "charge": charge, "n_frames": len(coords),
                                "frames_sha256": runs.arrays_sha256(numbers, coords)}, inputs,
                   chunk=max(1, min(CHUNK, -(-len(coords) // workers))),     # every worker gets work
                   layout="strided")  # chunk k holds frames k, k + n_chunks, ...: slow frames that come together spread
        chunk = int(job.get("chunk", CHUNK))                 # a resume keeps the chunks already cut
        n_chunks = -(-len(coords) // chunk)
        members = [np.arange(k, len(coords), n_chunks) if job.get("layout") == "strided" else
                   np.arange(k * chunk, min((k + 1) * chunk, len(coords))) for k in range(n_chunks)]
        tasks = [(numbers.tolist(), coords[frames], method, charge, parts / f"chunk{k:05d}.npz")
                 for k, frames in enumerate(members) if not (parts / f"chunk{k:05d}.npz").exists()]
        if tasks:
            if workers == 1:
                _worker_init()
                for t in tasks:
                    _label_chunk(t)
            else:
                with _pool(min(workers, len(tasks))) as pool:
                    for _ in pool.imap_unordered(_label_chunk, tasks):
                        pass
        energies = np.empty(len(coords))
        forces = np.empty((len(coords), len(numbers), 3))
        for k, frames in enumerate(members):
            with np.load(parts / f"chunk{k:05d}.npz") as c:
                energies[frames], forces[frames] = c["energies_ev"], c["forces_ev"]
        indices = np.arange(len(coords)) if indices is None else np.asarray(indices)
        ok = np.isfinite(energies) & np.isfinite(forces.reshape(len(forces), -1)).all(axis=1)
        failed = Path(str(out) + ".failed.json")
        if not ok.all():   # kept out of the data set, and said so (frame numbers in the input order)
            if not ok.any():
                raise RuntimeError(f"{method} failed on every one of the {len(coords)} frames")
            runs.write_json(failed, {"method": method, "failed_frames": np.flatnonzero(~ok).tolist()})
            print(f"warning: {method} failed (e.g. SCF not converged) on {int((~ok).sum())} of {len(coords)} frames "
                  f"{np.flatnonzero(~ok)[:10].tolist()}...; they are left out of {out} (listed in {failed.name})")
        elif failed.exists():
            failed.unlink()
        from .data import MIN_DISTANCE, closest_pairs

        # labelled, but no training set takes them (data.validate): e.g. the end of a minimisation that fused atoms
        fused = ok & (closest_pairs(coords.reshape(-1, 3), np.arange(len(coords) + 1) * len(numbers))[0]
                      < MIN_DISTANCE)
        if fused.any():
            if fused.sum() == ok.sum():
                raise RuntimeError(f"every frame labelled puts two atoms closer than {MIN_DISTANCE} Å; none can be "
                                   "trained on")
            print(f"warning: {int(fused.sum())} of {len(coords)} frames put two atoms closer than {MIN_DISTANCE} Å "
                  f"{np.flatnonzero(fused)[:10].tolist()}...; they are left out of {out}")
            ok &= ~fused
        write_rmd17(out, numbers, coords[ok], energies[ok] * KCAL_PER_EV, forces[ok] * KCAL_PER_EV, indices[ok],
                    method)
    return out


def write_rmd17(path, numbers, coords, energies_kcal, forces_kcal, indices, method: str = "") -> None:
    """An rMD17-format file holding one label set (as both new and old labels); `method` names it, so a model
    trained on the file records its labels (data.LABEL_SETS)."""
    runs.atomic_write(path, writer=lambda fh: np.savez(
        fh, nuclear_charges=np.asarray(numbers, dtype=np.uint8), coords=np.asarray(coords),
        energies=np.asarray(energies_kcal), forces=np.asarray(forces_kcal),
        old_indices=np.asarray(indices, dtype=np.int64), old_energies=np.asarray(energies_kcal),
        old_forces=np.asarray(forces_kcal), **({"method": np.asarray(method)} if method else {})))


def frames_from(spec: str, top: Optional[str] = None):
    """(atomic numbers, coords Å [n, atoms, 3], the files they were read from) from a structure file, a run
    folder or a trajectory + topology."""
    path = Path(spec)
    if path.suffix.lower() in (".pdb", ".xyz", ".cif", ".pdbx") and top is None:
        from .structures import read_structure

        s = read_structure(path)
        return s.atomic_numbers, s.positions_nm[None] * 10.0, [path]
    from .analysis.load import load_trajectory

    loaded = load_trajectory(spec, top)
    z = np.array([a.element.atomic_number for a in loaded.traj.topology.atoms])
    return z, loaded.traj.xyz.astype(np.float64) * 10.0, loaded.files


# ---- reference MD: GFN2-xTB Langevin dynamics in ASE, every saved frame labelled on the way ----------

def _sample_one(task):
    (numbers, start, temperature_k, timestep_fs, steps, every, friction_per_fs, seed, method, charge, out) = task
    from ase import Atoms, units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary

    out = Path(out)
    atoms = Atoms(numbers=numbers, positions=start)
    atoms.calc = _xtb_calculator(method, charge)
    rng = np.random.default_rng(seed)
    coords: List[np.ndarray] = []
    energies: List[float] = []
    forces: List[np.ndarray] = []
    done = 0
    if out.exists():   # resume: positions, velocities and frames so far
        saved = np.load(out)
        coords, energies, forces = list(saved["coords"]), list(saved["energies_ev"]), list(saved["forces_ev"])
        atoms.positions, done = saved["last_positions"], int(saved["steps_done"])
        atoms.set_velocities(saved["last_velocities"])
        rng = np.random.default_rng([seed, done])
    else:
        MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_k, rng=rng)
        Stationary(atoms)
    dyn = Langevin(atoms, timestep=timestep_fs * units.fs, temperature_K=temperature_k,
                   friction=friction_per_fs / units.fs, fixcm=False, rng=rng)
    while done < steps:
        block = min(every * 20, steps - done)
        for _ in range(block // every):
            dyn.run(every)
            done += every
            coords.append(atoms.positions.copy())
            energies.append(atoms.get_potential_energy())
            forces.append(atoms.get_forces().copy())
        runs.atomic_write(out, writer=lambda fh: np.savez(
            fh, coords=np.array(coords), energies_ev=np.array(energies), forces_ev=np.array(forces),
            last_positions=atoms.positions, last_velocities=atoms.get_velocities(), steps_done=done))
    return out


def sample(structure: str | Path, out: str | Path, ps: float, temperature_k: float = 500.0, timestep_fs: float = 0.5,
           every: int = 10, friction_per_fs: float = 0.01, trajectories: int = 0, seed: int = 0,
           method: str = "GFN2-xTB", charge: int = 0, overwrite: bool = False) -> Path:
    """Reference MD of `structure` with GFN2-xTB (Langevin, ASE), `trajectories` independent runs in
    parallel (default: one per core, or as many as the run being resumed); every `every`-th step becomes a
    labelled frame of `out`. Resumable from OUT.parts/, also with a longer `ps`; other settings, or a changed
    structure file, are refused by name. `overwrite` starts afresh, also over an OUT that no sampling made."""
    from .structures import read_structure

    out = Path(out)
    with runs.exclusive(out, "sample", file=True):
        parts = _parts(out, "sample", overwrite)
        s = read_structure(structure)
        numbers = s.atomic_numbers.tolist()
        start = s.positions_nm * 10.0
        steps = int(round(ps * 1000.0 / timestep_fs))
        steps -= steps % every
        trajectories = trajectories or _recorded_job(parts).get("trajectories") or max(1, os.cpu_count() or 1)
        job = _job(parts, out, {"command": "sample", "method": method, "charge": charge, "temperature_k": temperature_k,
                                "timestep_fs": timestep_fs, "every": every, "friction_per_fs": friction_per_fs,
                                "trajectories": trajectories, "seed": seed}, [structure])
        tasks = [(numbers, start, temperature_k, timestep_fs, steps, every, friction_per_fs, seed + k, method, charge,
                  str(parts / f"trajectory{k:03d}.npz")) for k in range(trajectories)]
        with _pool(trajectories) as pool:
            results = list(pool.imap(_sample_one, tasks))
        runs_done = [np.load(r) for r in results]
        coords = np.concatenate([r["coords"] for r in runs_done])
        energies = np.concatenate([r["energies_ev"] for r in runs_done])
        forces = np.concatenate([r["forces_ev"] for r in runs_done])
        indices = np.concatenate([k * 1_000_000 + np.arange(1, len(r["coords"]) + 1) * every
                                  for k, r in enumerate(runs_done)])
        write_rmd17(out, numbers, coords, energies * KCAL_PER_EV, forces * KCAL_PER_EV, indices, method)
        runs.write_json(Path(str(out) + ".json"), {
            "structure": str(structure), "method": method, "charge": charge, "temperature_k": temperature_k,
            "timestep_fs": timestep_fs, "steps_per_trajectory": steps, "every": every,
            "friction_per_fs": friction_per_fs, "trajectories": trajectories, "seed": seed, "frames": int(len(coords)),
            "old_indices": "trajectory * 1e6 + MD step", "run_id": job["run_id"]})
    return out


# ---- relaxed paths of hydrogen transfers: umbrella windows in GFN2-xTB MD --------------------------------

TRANSFER_WINDOW = 0.1      # Å between umbrella centres on xi = d(donor-H) - d(acceptor-H)
TRANSFER_END = 0.3         # Å, the last centre: just past the halfway point (xi = 0)
TRANSFER_K = 500.0         # kcal/mol/Å^2: ~0.045 Å thermal spread about each centre at 500 K
TRANSFER_EQUILIBRATE = 100  # 0.5 fs steps in each window before frames are taken
TRANSFER_STEPS = 200       # 0.5 fs steps in each window that give frames
TRANSFER_EVERY = 20        # steps between frames: 10 a window and walk


class TransferRestraint:
    """An ASE calculator: `reference` plus 1/2 k (xi - xi0)^2 on xi = |r_H - r_donor| - |r_H - r_acceptor|.
    `xi0` is set per window by the sampler."""

    def __init__(self, reference, hydrogen: int, donor: int, acceptor: int, k_ev_per_A2: float):
        self.reference, self.h, self.d, self.a, self.k = reference, hydrogen, donor, acceptor, k_ev_per_A2
        self.xi0 = 0.0

    def xi(self, r) -> float:
        return float(np.linalg.norm(r[self.h] - r[self.d]) - np.linalg.norm(r[self.h] - r[self.a]))

    def energy_forces(self, atoms):
        plain = atoms.copy()
        plain.calc = self.reference
        energy, forces = plain.get_potential_energy(), plain.get_forces().copy()
        r = atoms.positions
        u_d = (r[self.h] - r[self.d]) / np.linalg.norm(r[self.h] - r[self.d])
        u_a = (r[self.h] - r[self.a]) / np.linalg.norm(r[self.h] - r[self.a])
        stretch = self.xi(r) - self.xi0
        pull = -self.k * stretch                                     # -dU/dxi
        forces[self.h] += pull * (u_d - u_a)
        forces[self.d] -= pull * u_d
        forces[self.a] += pull * u_a
        return energy + 0.5 * self.k * stretch ** 2, forces

    # what ASE's dynamics and Atoms ask a calculator for
    def get_potential_energy(self, atoms=None, force_consistent=False):
        return self.energy_forces(atoms)[0]

    def get_forces(self, atoms=None):
        return self.energy_forces(atoms)[1]

    def get_property(self, name, atoms=None, allow_calculation=True):
        return {"energy": self.get_potential_energy, "forces": self.get_forces}[name](atoms)


def _transfer_walk(task):
    (numbers, start, h, donor, acceptor, windows, k_ev, temperature_k, equilibrate, steps, every, seed, charge,
     out) = task
    from ase import Atoms, units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary

    atoms = Atoms(numbers=numbers, positions=start)
    restraint = TransferRestraint(_xtb_calculator("GFN2-xTB", charge), h, donor, acceptor, k_ev)
    atoms.calc = restraint
    rng = np.random.default_rng(seed)
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_k, rng=rng)
    Stationary(atoms)
    dyn = Langevin(atoms, timestep=0.5 * units.fs, temperature_K=temperature_k, friction=0.01 / units.fs,
                   fixcm=False, rng=rng)
    frames, xi, centre = [], [], []
    for xi0 in windows:                    # each window starts where the last ended: the molecule follows the H
        restraint.xi0 = float(xi0)
        dyn.run(equilibrate)
        for _ in range(steps // every):
            dyn.run(every)
            frames.append(atoms.positions.copy())
            xi.append(restraint.xi(atoms.positions))
            centre.append(float(xi0))
    runs.atomic_write(out, writer=lambda fh: np.savez(fh, coords=np.array(frames), xi=np.array(xi),
                                                       centre=np.array(centre)))
    return out


def transfer_windows(start_angstrom, hydrogen: int, donor: int, acceptor: int, xi_end: float = TRANSFER_END,
                     window: float = TRANSFER_WINDOW) -> np.ndarray:
    """Umbrella centres (Å) on xi = d(donor-H) - d(acceptor-H), from the start's xi up to `xi_end`."""
    r = np.asarray(start_angstrom, dtype=np.float64)
    xi_start = np.linalg.norm(r[hydrogen] - r[donor]) - np.linalg.norm(r[hydrogen] - r[acceptor])
    if xi_start >= xi_end:
        raise ValueError(f"the hydrogen is already past the last window (xi {xi_start:.2f} >= {xi_end:.2f} Å)")
    return np.arange(np.ceil(xi_start / window) * window, xi_end + 1e-9, window)


def sample_transfer(numbers: Sequence[int], start_angstrom: np.ndarray, hydrogen: int, donor: int, acceptor: int,
                    out: str | Path, method: str = "GFN2-xTB", temperature_k: float = 500.0, walks: int = 2,
                    xi_end: float = TRANSFER_END, window: float = TRANSFER_WINDOW, k_kcal: float = TRANSFER_K,
                    equilibrate: int = TRANSFER_EQUILIBRATE, steps: int = TRANSFER_STEPS, every: int = TRANSFER_EVERY,
                    seed: int = 0, charge: int = 0) -> Path:
    """Labelled frames along the relaxed path of a hydrogen moving from `donor` to `acceptor` (0-based atom
    indices): umbrella windows on xi = d(donor-H) - d(acceptor-H), from the start's xi to `xi_end` every `window`
    Å, walked by GFN2-xTB Langevin MD (0.5 fs) at `temperature_k` so the rest of the molecule follows the hydrogen
    as it would in MD. `walks` independent walks run in parallel; each window gives `steps // every` frames
    after `equilibrate` steps. The frames are labelled, unbiased, with `method` (the sampling is always
    GFN2-xTB: DFT MD would cost hours). A model with too low a barrier for the transfer (iso17x: ~15 kcal/mol
    where GFN2-xTB has ~50) lets MD cross it; these frames are the slope MD climbs. Writes `out` (rMD17 npz)
    and OUT.json (each frame's xi and window); resumable by walk."""
    numbers = [int(v) for v in numbers]
    start = np.asarray(start_angstrom, dtype=np.float64)
    if numbers[hydrogen] != 1:
        raise ValueError(f"atom {hydrogen} is not a hydrogen (Z = {numbers[hydrogen]})")
    if len({hydrogen, donor, acceptor}) != 3:
        raise ValueError(f"hydrogen, donor and acceptor must be three atoms (got {hydrogen}, {donor}, {acceptor})")
    windows = transfer_windows(start, hydrogen, donor, acceptor, xi_end, window)
    out = Path(out)
    with runs.exclusive(out, "label", file=True):         # the walks and their labels share OUT.parts/
        parts = _parts(out, "label", overwrite=False)
        k_ev = k_kcal / KCAL_PER_EV
        tasks = [(numbers, start, hydrogen, donor, acceptor, windows, k_ev, temperature_k, equilibrate, steps, every,
                  seed + w, charge, str(parts / f"walk{w:02d}.npz")) for w in range(walks)]
        todo = [t for t in tasks if not Path(t[-1]).exists()]
        if todo:
            with _pool(min(len(todo), max(1, os.cpu_count() or 1))) as pool:
                list(pool.imap_unordered(_transfer_walk, todo))
        walked = [np.load(t[-1]) for t in tasks]
        coords = np.concatenate([w["coords"] for w in walked])
        label_frames(numbers, coords, out, method=method, charge=charge)
        runs.write_json(Path(str(out) + ".json"), {
            "hydrogen": hydrogen, "donor": donor, "acceptor": acceptor, "sampled_with": "GFN2-xTB", "method": method,
            "temperature_k": temperature_k, "timestep_fs": 0.5, "friction_per_fs": 0.01, "k_kcal_per_mol_A2": k_kcal,
            "windows_A": windows.round(4).tolist(), "equilibrate": equilibrate, "steps": steps, "every": every,
            "walks": walks, "seed": seed, "xi_A": np.concatenate([w["xi"] for w in walked]).round(4).tolist(),
            "window_of_frame": np.concatenate([w["centre"] for w in walked]).round(4).tolist()})
    return out


def hydrogen_transfers(numbers: Sequence[int], bonds: Sequence[tuple], positions_angstrom: np.ndarray,
                       reach: float = 1.6, pinch: float = 1.2) -> List[tuple]:
    """(hydrogen, donor, acceptor) for each hydrogen that, at `positions_angstrom` (say, the last frame of a run
    the blow-up guard stopped), is within `reach` Å of a heavy atom other than its own in `bonds` (the
    topology's): a hydrogen transfer under way. Bonded neighbours of the donor sit ~2.1 Å from its hydrogens.
    Two hydrogens within `pinch` Å of each other (an H-H bond forming; iso17x's closest pair is 1.49 Å, geminal
    ones ~1.78) count too, the first as the hydrogen and the second as the acceptor."""
    z = np.asarray(numbers)
    r = np.asarray(positions_angstrom, dtype=np.float64)
    partner = {}
    for i, j in bonds:
        for h, x in ((i, j), (j, i)):
            if z[h] == 1:
                partner.setdefault(int(h), []).append(int(x))
    found = []
    for h, own in sorted(partner.items()):
        if len(own) != 1:
            continue
        d = np.linalg.norm(r - r[h], axis=1)
        d[h] = np.inf
        to_hydrogen = np.where(z == 1, d, np.inf)
        d[z == 1] = np.inf
        d[own[0]] = np.inf
        acceptor = int(np.argmin(d))
        if d[acceptor] < reach:
            found.append((h, own[0], acceptor))
        to_hydrogen[:h + 1] = np.inf                      # each pair once
        found.extend((h, own[0], int(o)) for o in np.flatnonzero(to_hydrogen < pinch))
    return found
