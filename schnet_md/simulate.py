"""Molecular dynamics in OpenMM with a SchNet force.

A run folder holds everything needed to read or continue the run:
    topology.pdb      the structure (with bonds) the trajectory refers to
    force.pt          the exported TorchForce module (TorchScript)
    run.json          settings, inputs and versions; steps_done (the last checkpoint's step) and target_step
    trajectory.dcd    frames every `report_interval` steps
    state.csv         step, time, potential, kinetic and total energy, temperature, speed
    checkpoint.chk    the latest checkpoint (written atomically), final.chk at the end
`resume_simulation` continues from checkpoint.chk: frames and rows written after that checkpoint
(by a run that was killed) are dropped first, so nothing is duplicated and nothing is lost. By default it
finishes the run to its target_step (a run killed at 60 % runs the other 40 %, as GROMACS's -cpi does).
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import math
import random
import os
import signal
import struct
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Optional

import numpy as np
import openmm
import openmm.app as app
from openmm import unit

from . import __version__, runs
from .export import (check_atoms, export_model, load_exported, molecule_bonds, openmm_torch,
                     torchscript_message)
from .committee import ForceDisagreement, committee_members, is_committee
from .modelfile import load_model, resolve_model_path
from .structures import BondMap, read_structure, write_pdb

PLATFORM_PREFERENCE = ("CUDA", "OpenCL", "CPU", "Reference")
MAX_SEED = 2 ** 31 - 1          # OpenMM seeds are C ints; 0 means "pick one at random" to OpenMM
BOLTZMANN_KJ_PER_MOL_K = unit.MOLAR_GAS_CONSTANT_R.value_in_unit(unit.kilojoule_per_mole / unit.kelvin)
AVOGADRO = unit.AVOGADRO_CONSTANT_NA.value_in_unit(unit.mole ** -1)
CM3_PER_NM3 = 1e-21


class SimulationError(RuntimeError):
    """The run stopped: the model or integrator failed. Frames and checkpoints written so far remain."""


@dataclass
class SimulationSettings:
    steps: int = 1000
    timestep_fs: float = 0.5
    temperature_k: float = 300.0
    friction_per_ps: float = 1.0
    report_interval: int = 10
    checkpoint_interval: int = 1000
    minimize: bool = False
    seed: int = 0
    platform: Optional[str] = None
    precision: str = "float32"
    tabulate: bool = False           # filters from spline tables (schnet_md.tabulated): faster, same forces
    ensemble: str = "nvt"            # "nvt": LangevinMiddleIntegrator; "nve": VerletIntegrator
    guard: bool = True               # stop on broken/formed bonds or non-finite values (BlowUpGuard)
    bond_break_factor: float = 1.5   # a bond is broken beyond this x the sum of covalent radii
    bond_form_factor: float = 1.1    # a non-bonded pair closer than this x the sum has formed a bond
    disagreement_warn: float = 200.0  # committee force disagreement (kJ/mol/nm) that earns a warning
    disagreement_stop: float = 0.0    # ... that stops the run (0: never)
    pressure_bar: float = 0.0        # > 0: NPT, a MonteCarloBarostat at this pressure (periodic systems)
    barostat_interval: int = 25      # steps between the barostat's volume moves

    def __post_init__(self) -> None:
        for f in fields(self):      # (run.json is read back into these: a damaged value is named, not a traceback)
            value, default = getattr(self, f.name), f.default
            if f.name == "platform":
                ok, kind = value is None or isinstance(value, str), "a platform name or None"
            elif isinstance(default, (bool, str)):
                ok, kind = type(value) is type(default), type(default).__name__
            elif isinstance(default, int):
                ok, kind = isinstance(value, int) and not isinstance(value, bool), "a whole number"
            else:
                ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
            if not ok:
                raise ValueError(f"simulation setting {f.name} must be {kind}, got {value!r}")
        if self.steps < 0 or self.report_interval < 1 or self.checkpoint_interval < 1:
            raise ValueError("steps >= 0, report_interval >= 1 and checkpoint_interval >= 1 are required")
        if not all(math.isfinite(v) for v in (self.timestep_fs, self.temperature_k, self.friction_per_ps)):
            raise ValueError(f"time step, temperature and friction must be finite numbers (got {self.timestep_fs} fs, "
                             f"{self.temperature_k} K, {self.friction_per_ps}/ps)")
        if not (self.timestep_fs > 0 and self.temperature_k > 0 and self.friction_per_ps >= 0):
            raise ValueError("time step and temperature must be positive, friction non-negative")
        if not (math.isfinite(self.pressure_bar) and self.pressure_bar >= 0 and self.barostat_interval >= 1):
            raise ValueError(f"pressure must be a finite number of bar >= 0 (0: constant volume) and the barostat "
                             f"interval at least 1 step (got {self.pressure_bar} bar, {self.barostat_interval})")
        if self.pressure_bar > 0 and self.ensemble == "nve":
            raise ValueError("a barostat (pressure) needs a thermostat: use the nvt ensemble with it")
        if self.ensemble not in ("nvt", "nve"):
            raise ValueError("ensemble must be 'nvt' or 'nve'")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must lie in 0..{MAX_SEED} (0: choose one; the run records the seed it used)")


@dataclass
class SimulationResult:
    out_dir: Path
    trajectory: Path
    state_csv: Path
    n_frames: int
    steps_done: int
    platform: str
    wall_seconds: float
    steps_per_second: float
    ns_per_day: float
    extra: dict = field(default_factory=dict)


def available_platforms() -> list:
    return [openmm.Platform.getPlatform(k).getName() for k in range(openmm.Platform.getNumPlatforms())]


def make_integrator(settings: SimulationSettings) -> openmm.Integrator:
    dt = settings.timestep_fs * unit.femtosecond
    if settings.ensemble == "nve":
        return openmm.VerletIntegrator(dt)
    integrator = openmm.LangevinMiddleIntegrator(settings.temperature_k * unit.kelvin,
                                                 settings.friction_per_ps / unit.picosecond, dt)
    integrator.setRandomNumberSeed(settings.seed)
    return integrator


def particle_system(topology: app.Topology) -> openmm.System:
    """An empty System with one particle per atom (element masses) and the topology's periodic box."""
    system = openmm.System()
    for atom in topology.atoms():
        system.addParticle(atom.element.mass)
    box = topology.getPeriodicBoxVectors()
    if box is not None:
        system.setDefaultPeriodicBoxVectors(*box)
    return system


def build_system(topology: app.Topology, force_file: Path) -> openmm.System:
    """A System with one particle per atom (element masses) and the SchNet TorchForce."""
    openmmtorch = openmm_torch()
    _, metadata = load_exported(force_file)
    check_atoms(force_file, metadata, topology)
    system = particle_system(topology)
    force = openmmtorch.TorchForce(str(force_file))
    force.setUsesPeriodicBoundaryConditions(bool(metadata["periodic"]))
    system.addForce(force)
    if metadata["periodic"]:
        system.addForce(molecule_bonds(topology))   # keeps molecules whole in the trajectory
    return system


def make_simulation(topology, system, settings: SimulationSettings):
    """A Simulation on the requested platform, or the fastest one that can run the TorchForce."""
    if settings.pressure_bar > 0:
        if not system.usesPeriodicBoundaryConditions():
            raise ValueError("a pressure (NPT) needs a periodic system: the structure file has no box")
        system.addForce(openmm.MonteCarloBarostat(settings.pressure_bar * unit.bar, settings.temperature_k * unit.kelvin,
                                                  settings.barostat_interval))
        system.getForce(system.getNumForces() - 1).setRandomNumberSeed(settings.seed)
    names = [settings.platform] if settings.platform else [p for p in PLATFORM_PREFERENCE
                                                           if p in available_platforms()]
    errors = []
    for name in names:
        try:
            platform = openmm.Platform.getPlatformByName(name)
            return app.Simulation(topology, system, make_integrator(settings), platform), name
        except Exception as err:  # OpenMM raises OpenMMException (and plain Exception) for missing kernels
            errors.append(f"{name}: {err}")
    raise SimulationError("no OpenMM platform could run the SchNet force:\n  " + "\n  ".join(errors))


class BlowUpGuard:
    """Stops a run whose chemistry changed or whose numbers broke: a broken or newly formed bond (see
    `BondMap`) or non-finite positions. A learned potential that lets atoms fly apart often keeps a
    finite, flat energy (far pairs leave the Gaussian expansion), so energies alone do not show it."""

    def __init__(self, topology: app.Topology, break_factor: float = 1.5, form_factor: float = 1.1):
        self.bond_map = BondMap(topology, break_factor, form_factor)

    def check(self, step: int, positions_nm: np.ndarray, box_nm: Optional[np.ndarray]) -> None:
        r = positions_nm * 10.0
        if not np.isfinite(r).all():
            raise SimulationError(f"blow-up at step {step}: positions are not finite")
        broken, formed = self.bond_map.changes(r, None if box_nm is None else box_nm * 10.0)
        names = self.bond_map.names
        if broken:
            i, j, d, limit = max(broken, key=lambda b: b[2] / b[3])
            raise SimulationError(f"blow-up at step {step}: {len(broken)} bond(s) broken, e.g. {names[i]}-{names[j]} "
                                  f"stretched to {d:.2f} Å (limit {limit:.2f} Å)")
        if formed:
            i, j, d = formed[0]
            raise SimulationError(f"blow-up at step {step}: new bond {names[i]}-{names[j]} ({d:.2f} Å apart)")


def _guard_state(guard: Optional[BlowUpGuard], simulation, state) -> None:
    if guard is None:
        return
    box = state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(unit.nanometer) \
        if simulation.topology.getPeriodicBoxVectors() is not None else None
    guard.check(simulation.currentStep, state.getPositions(asNumpy=True).value_in_unit(unit.nanometer), box)


class StateCSVReporter:
    """Writes step, time (ps), energies (kJ/mol), temperature (K) and speed (ns/day) every N steps; for a periodic
    system also the box volume (nm^3) and density (g/mL), which a barostat changes."""

    COLUMNS = ["step", "time_ps", "potential_kj_mol", "kinetic_kj_mol", "total_kj_mol", "temperature_k",
               "speed_ns_day"]

    def __init__(self, path: Path, interval: int, n_dof: int, timestep_fs: float, append: bool,
                 guard: Optional[BlowUpGuard] = None, disagreement=None, warn: float = 0.0, stop: float = 0.0,
                 periodic_mass_dalton: float = 0.0):
        self.interval = interval
        self.guard = guard
        self.disagreement, self.warn, self.stop, self.warned = disagreement, warn, stop, False
        if disagreement is not None:
            self.COLUMNS = self.COLUMNS + ["force_disagreement_kj_mol_nm"]
        self.mass_g = None
        if periodic_mass_dalton:
            self.COLUMNS = self.COLUMNS + ["volume_nm3", "density_g_ml"]
            self.mass_g = periodic_mass_dalton / AVOGADRO
        self.n_dof = n_dof
        self.timestep_fs = timestep_fs
        new = not append or not path.exists()
        self._fh = open(path, "a" if append else "w", newline="")
        self._writer = csv.writer(self._fh)
        if new:
            self._writer.writerow(self.COLUMNS)
        self._last = None

    def describeNextReport(self, simulation):
        steps = self.interval - simulation.currentStep % self.interval
        return {"steps": steps, "periodic": None, "include": ["energy", "positions"]}

    def _disagreement(self, simulation, state) -> Optional[float]:
        if self.disagreement is None:
            return None
        box = state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(unit.nanometer)
        return self.disagreement(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer), box)

    def report(self, simulation, state):
        now = time.perf_counter()
        step = simulation.currentStep
        pot = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
        kin = state.getKineticEnergy().value_in_unit(unit.kilojoule_per_mole)
        if not (math.isfinite(pot) and math.isfinite(kin)):
            raise SimulationError(f"non-finite energy at step {step} (potential {pot}, kinetic {kin})")
        temperature = 2.0 * kin / (self.n_dof * BOLTZMANN_KJ_PER_MOL_K)
        speed = ""
        if self._last is not None and now > self._last[1]:
            ns = (step - self._last[0]) * self.timestep_fs * 1e-6
            speed = f"{ns / (now - self._last[1]) * 86400:.4g}"
        self._last = (step, now)
        sigma = self._disagreement(simulation, state)
        row = [step, f"{state.getTime().value_in_unit(unit.picosecond):.6f}", f"{pot:.6f}",
               f"{kin:.6f}", f"{pot + kin:.6f}", f"{temperature:.3f}", speed]
        if sigma is not None:
            row.append(f"{sigma:.4f}")
        if self.mass_g is not None:
            volume_nm3 = state.getPeriodicBoxVolume().value_in_unit(unit.nanometer ** 3)
            row += [f"{volume_nm3:.6f}", f"{self.mass_g / (volume_nm3 * CM3_PER_NM3):.5f}"]
        self._writer.writerow(row)
        self._fh.flush()
        if sigma is not None:
            if self.stop and sigma > self.stop:
                raise SimulationError(f"the committee disagrees by {sigma:.0f} kJ/mol/nm at step {step} (stop "
                                      f"threshold {self.stop:g}): the run has left what the models know")
            if self.warn and sigma > self.warn and not self.warned:
                print(f"warning: at step {step} the committee disagrees by {sigma:.0f} kJ/mol/nm (warning threshold "
                      f"{self.warn:g}): the models are extrapolating; see force_disagreement_kj_mol_nm in state.csv",
                      file=sys.stderr, flush=True)
                self.warned = True
        _guard_state(self.guard, simulation, state)

    def close(self):
        self._fh.close()


class AtomicCheckpointReporter:
    """Saves a checkpoint every N steps via a temporary file, so a kill never leaves half a checkpoint."""

    def __init__(self, path: Path, interval: int, run_id: str, guard: Optional[BlowUpGuard] = None):
        self.path = path
        self.interval = interval
        self.run_id = run_id
        self.guard = guard

    def describeNextReport(self, simulation):
        return {"steps": self.interval - simulation.currentStep % self.interval, "periodic": None,
                "include": ["positions"]}

    def report(self, simulation, state):
        _guard_state(self.guard, simulation, state)   # never checkpoint a broken state
        save_checkpoint(simulation, self.path, self.run_id)
        _record_steps_done(self.path.parent / "run.json", simulation.currentStep)


def _record_steps_done(info_path: Path, step: int, **more) -> None:
    """run.json's steps_done is the step a resume starts from: updated with every checkpoint, atomically."""
    if not info_path.is_file():
        return
    runs.write_json(info_path, runs.read_json(info_path, "run record") | {"steps_done": step} | more)


class CheckpointError(SimulationError):
    """A checkpoint that is damaged, cut short, or belongs to another run."""


def save_checkpoint(simulation, path: Path, run_id: str, keep_previous: bool = True) -> None:
    """Write OpenMM's checkpoint behind a one-line header (run id, step, size, SHA-256), as one file renamed
    into place. The checkpoint it replaces becomes PATH's `.prev` twin first, so a kill at any instant
    leaves at least one whole checkpoint of this run: PATH, or (between the two renames) its twin.
    `keep_previous=False` (final.chk) replaces PATH without keeping a twin."""
    blob = runs.sealed(simulation.context.createCheckpoint(), run_id=run_id, step=simulation.currentStep)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(blob)
            fh.flush()
            os.fsync(fh.fileno())
        if keep_previous and path.exists():
            os.replace(path, previous_checkpoint(path))
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise runs.RunFolderError(f"no space left on the device holding {path}: the checkpoint at step "
                                      f"{simulation.currentStep} was not written; the previous one is kept") from None
        raise


def read_checkpoint(path: Path, run_id: Optional[str] = None) -> tuple:
    """(OpenMM checkpoint bytes, step) of a checkpoint written by save_checkpoint, after checking its size,
    SHA-256 and (given `run_id`; "" for a run recorded before run ids) that it belongs to that run. Raises
    CheckpointError naming what is wrong."""
    blob = path.read_bytes()
    try:
        header, data = runs.unsealed(blob, path)
    except runs.SealError as err:
        raise CheckpointError(str(err)) from None
    if header is None:       # written before checkpoints carried a header: its digest lies beside it
        digest = _legacy_digest_file(path)
        if not (digest.is_file() and digest.read_text().strip() == f"{len(blob)} {hashlib.sha256(blob).hexdigest()}"):
            raise CheckpointError(f"{path} does not match the size and checksum recorded when it was written "
                                  "(damaged or cut short)")
        header = {}
    if run_id is not None and (header.get("run_id") or "") != run_id:
        raise CheckpointError(f"{path} belongs to another run (run id {header.get('run_id') or 'none'}, this "
                              f"folder's run is {run_id}): it was copied in from elsewhere, so it is not resumed")
    return data, header.get("step")


def load_checkpoint(simulation, path: Path, run_id: Optional[str] = None) -> None:
    """Load a schnet-md checkpoint file into an OpenMM Simulation (the same System and platform)."""
    data, _ = read_checkpoint(path, run_id)
    simulation.context.loadCheckpoint(data)
    simulation.currentStep = simulation.context.getStepCount()


def _legacy_digest_file(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def previous_checkpoint(path: Path) -> Path:
    return path.with_name(path.stem + ".prev" + path.suffix)


def truncate_dcd(path: Path, n_frames: int) -> int:
    """Keep the first `n_frames` frames of an OpenMM-written DCD file; returns the frames kept."""
    with open(path, "r+b") as fh:
        head = fh.read(276)
        if len(head) < 276 or head[4:8] != b"CORD":
            raise ValueError(f"{path} is not a DCD file")
        count, first_step, interval = struct.unpack("<3i", head[8:20])
        has_box = struct.unpack("<i", head[48:52])[0] == 1
        comment_bytes = struct.unpack("<i", head[92:96])[0]
        header = 104 + comment_bytes + 8
        fh.seek(header - 8)
        n_atoms = struct.unpack("<i", fh.read(4))[0]
        frame = (56 if has_box else 0) + 3 * (8 + 4 * n_atoms)
        size = fh.seek(0, os.SEEK_END)
        complete = min(count, (size - header) // frame)
        keep = min(complete, n_frames)
        fh.truncate(header + keep * frame)
        fh.seek(8)
        fh.write(struct.pack("<i", keep))
        fh.seek(20)
        fh.write(struct.pack("<i", first_step + max(keep - 1, 0) * interval))
    return keep


def truncate_state_csv(path: Path, last_step: int) -> None:
    """Drop the rows after `last_step` (written by a run killed after its last checkpoint), atomically."""
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    kept = [rows[0]] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= last_step]
    buffer = io.StringIO()
    csv.writer(buffer).writerows(kept)
    runs.atomic_write(path, buffer.getvalue())


# the files a run writes into its folder (run.json is its record); --overwrite retires exactly these
RUN_FILES = ("input.pdb", "topology.pdb", "force.pt", "trajectory.dcd", "state.csv", "checkpoint.chk",
             "checkpoint.prev.chk", "final.chk", "checkpoint.chk.sha256", "checkpoint.prev.chk.sha256",
             "final.chk.sha256", ".checkpoint.chk.*.tmp", ".final.chk.*.tmp")   # (*.sha256: runs from before seals)
RUN_RECORD = "run.json"
ADDED_SETTINGS = {"pressure_bar", "barostat_interval"}   # settings newer than some runs: missing means the default


def run_simulation(structure_path, model_path, out_dir, settings: SimulationSettings,
                   progress: bool = True, overwrite: bool = False) -> SimulationResult:
    """Start a new run in `out_dir`. A folder that holds a run, or files a run writes (the user's own), is
    refused unless `overwrite`, which retires the old run's files first. The folder is locked for the run's
    whole life: a second writer is refused."""
    out = Path(out_dir)
    with runs.exclusive(out, "schnet-md simulate", file=False):
        structure = read_structure(structure_path)
        members = committee_members(model_path)
        model, model_metadata = load_model(members[0])
        for other in members[1:]:
            load_model(other)                     # every member readable before anything is written
        runs.claim(out, RUN_RECORD, RUN_FILES, "simulate", overwrite)
        if settings.seed == 0:   # OpenMM would pick a seed and not say which: pick it here and record it
            settings = replace(settings, seed=random.SystemRandom().randint(1, MAX_SEED))
        write_pdb(structure.topology, structure.positions_nm, out / "input.pdb")     # the structure as given
        force_file = export_model(members if len(members) > 1 else model, structure, out / "force.pt",
                                  dtype=settings.precision, tabulate=settings.tabulate)
        system = build_system(structure.topology, force_file)
        simulation, platform = make_simulation(structure.topology, system, settings)
        simulation.context.setPositions(structure.openmm_positions())
        if settings.minimize:
            simulation.minimizeEnergy()
        positions = simulation.context.getState(getPositions=True).getPositions(asNumpy=True)
        if settings.minimize and settings.guard:
            try:
                BlowUpGuard(structure.topology, settings.bond_break_factor, settings.bond_form_factor).check(
                    0, positions.value_in_unit(unit.nanometer), structure.box_nm)
            except SimulationError as err:
                raise SimulationError(f"energy minimisation broke the molecule, so the run did not start: "
                                      f"{str(err).split(': ', 1)[1]}. The model has a spurious minimum there (check it "
                                      f"with more data, or run without --minimize); the input structure is in "
                                      f"{out / 'input.pdb'}.") from None
        write_pdb(structure.topology, positions.value_in_unit(unit.nanometer), out / "topology.pdb")
        simulation.context.setVelocitiesToTemperature(settings.temperature_k * unit.kelvin, settings.seed)
        run_id = runs.new_run_id()
        run_info = {
            "run_id": run_id, "schnet_md_version": __version__, "openmm_version": openmm.__version__,
            "structure": str(structure_path), "model": str(model_path),
            "inputs": [runs.input_record(structure_path)] + [runs.input_record(resolve_model_path(m)) for m in members],
            # the run's own copies, which a resume reads: checked then, so a swapped file is never continued
            "run_files": {name: runs.input_record(out / name)["sha256"] for name in ("force.pt", "topology.pdb")},
            "model_training": model_metadata.get("training", {}), "settings": asdict(settings),
            "platform": platform, "steps_done": 0, "target_step": settings.steps,
        }
        save_checkpoint(simulation, out / "checkpoint.chk", run_id)
        runs.write_json(out / RUN_RECORD, run_info)       # last: a folder with run.json holds a startable run
        return _run(simulation, platform, out, settings, settings.steps, run_id, append=False, progress=progress,
                    committee=model_path if len(members) > 1 else None)


def read_run_info(out: Path) -> dict:
    """run.json of a run folder, checked: written by a run of this package, its settings all known here."""
    info_path = out / RUN_RECORD
    if not info_path.is_file():
        raise ValueError(f"{out} holds no run to resume (no {RUN_RECORD})")
    info = runs.read_json(info_path, "run record")
    if not isinstance(info.get("settings"), dict):
        raise runs.RunFolderError(f"{info_path} has no settings: it is not a schnet-md simulate record, or is damaged")
    known = {f.name for f in fields(SimulationSettings)}
    missing = sorted(known - set(info["settings"]) - ADDED_SETTINGS)
    if missing:
        raise runs.RunFolderError(f"{info_path} is damaged: its settings lack {', '.join(missing)}; restore it, or "
                                  "start a new run")
    unknown = sorted(set(info["settings"]) - known)
    if unknown:
        raise runs.RunFolderError(
            f"{info_path} was written by schnet-md {info.get('schnet_md_version', '?')} and has settings this version "
            f"({__version__}) does not know: {', '.join(unknown)}; resume it with the version that started it")
    try:
        SimulationSettings(**info["settings"])
        if not isinstance(info.get("target_step", 0), int) or isinstance(info.get("target_step"), bool):
            raise ValueError(f"target_step must be a whole number, got {info['target_step']!r}")
    except ValueError as err:
        raise runs.RunFolderError(f"{info_path} is damaged: {err}; restore it, or start a new run") from None
    return info


def resume_simulation(out_dir, steps: Optional[int] = None, platform: Optional[str] = None,
                      progress: bool = True, log=None, to_step: Optional[int] = None) -> SimulationResult:
    """Continue the run in `out_dir` from its last sound checkpoint for `steps` more steps, or up to step
    `to_step` (default: to the run's target step, so a killed run finishes what it was started for; a finished
    run needs `steps` or a later `to_step`). A checkpoint whose size or checksum does not match what was
    recorded when it was written is passed over for the previous one, and `log` says so; one from another
    run, or a force.pt/topology.pdb that is not the run's own, is refused."""
    log = log or (lambda message: print(message, file=sys.stderr))
    out = Path(out_dir)
    if steps is not None and steps < 1:
        raise ValueError(f"--steps must be at least 1 when resuming (got {steps})")
    if steps is not None and to_step is not None:
        raise ValueError("give either steps (further steps) or to_step (the step to end at), not both")
    with runs.exclusive(out, "schnet-md simulate --resume", file=False):
        info = read_run_info(out)
        run_id = info.get("run_id") or ""              # ("": a run recorded before run ids, whose checkpoints have none)
        for name, digest in info.get("run_files", {}).items():
            if not (out / name).is_file() or runs.file_sha256(out / name) != digest:
                raise runs.RunFolderError(f"{out / name} is not the file this run started with (missing, or its "
                                          "SHA-256 differs), so the run cannot be continued with it; restore it, or "
                                          "start a new run")
        settings = SimulationSettings(**info["settings"])
        if platform:
            settings.platform = platform
        structure = read_structure(out / "topology.pdb")
        system = build_system(structure.topology, out / "force.pt")
        simulation, platform_name = make_simulation(structure.topology, system, settings)
        checkpoint = out / "checkpoint.chk"
        candidates = [c for c in (checkpoint, previous_checkpoint(checkpoint), out / "final.chk") if c.is_file()]
        if not candidates:
            raise ValueError(f"{out} has no checkpoint.chk to resume from")
        sound = []
        for candidate in candidates:
            try:
                sound.append((candidate, *read_checkpoint(candidate, run_id)))
            except CheckpointError as err:
                if "another run" in str(err):
                    raise
                log(f"warning: {err}; trying the other checkpoints")
        # checkpoint.chk when sound (the last written); else the furthest other (a finished run's final.chk is as
        # far as its checkpoint.chk, .prev is older), so a damaged checkpoint costs as few frames as possible
        sound.sort(key=lambda entry: (entry[0] != checkpoint, -(entry[2] or 0)))
        loaded = None
        for candidate, data, _ in sound[:1]:
            try:
                simulation.context.loadCheckpoint(data)
            except Exception as err:   # OpenMMException
                written_on = info.get("platform")
                hint = (f"; it was written on the {written_on} platform: resume with --platform {written_on}"
                        if written_on and written_on != platform_name else "")
                raise SimulationError(f"cannot load {candidate} on the {platform_name} platform ({err}){hint}") from None
            simulation.currentStep = simulation.context.getStepCount()
            loaded = candidate
            break
        if loaded is None:
            raise SimulationError(f"no sound checkpoint in {out} (checked {', '.join(c.name for c in candidates)})")
        if loaded != checkpoint:
            log(f"resuming from the previous checkpoint {loaded.name} (step {simulation.currentStep})")
        done = simulation.currentStep
        trajectory = out / "trajectory.dcd"
        if done // settings.report_interval == 0 and trajectory.exists():
            trajectory.unlink()          # no frame was due yet: whatever is there (an empty header) starts over
        n_frames = truncate_dcd(trajectory, done // settings.report_interval) if trajectory.exists() else 0
        if n_frames != done // settings.report_interval:
            raise SimulationError(f"{trajectory} has {n_frames} frames but the checkpoint at step "
                                  f"{done} needs {done // settings.report_interval}; the trajectory is damaged")
        if (out / "state.csv").exists():
            truncate_state_csv(out / "state.csv", done)
        target = to_step if to_step is not None else \
            info.get("target_step", settings.steps)            # (runs recorded before target_step: their own count)
        if steps is None and done >= target:
            raise ValueError(f"{out} already ran its {target} steps; give the number of further steps to extend it "
                             "(--steps N)")
        more = target - done if steps is None else steps
        _record_steps_done(out / RUN_RECORD, done, target_step=done + more)
        committee = info.get("model") if is_committee(info.get("model", "")) else None
        return _run(simulation, platform_name, out, settings, more, run_id, append=True, progress=progress,
                    committee=committee)


def _run(simulation, platform: str, out: Path, settings: SimulationSettings, steps: int, run_id: Optional[str],
         append: bool, progress: bool, committee=None) -> SimulationResult:
    n_dof = 3 * simulation.system.getNumParticles()
    trajectory = out / "trajectory.dcd"
    dcd = app.DCDReporter(str(trajectory), settings.report_interval, append=append and trajectory.exists())
    guard = BlowUpGuard(simulation.topology, settings.bond_break_factor, settings.bond_form_factor) \
        if settings.guard else None
    disagreement = None
    if committee is not None:
        z = [a.element.atomic_number for a in simulation.topology.atoms()]
        disagreement = ForceDisagreement(committee, z, box=simulation.topology.getPeriodicBoxVectors() is not None)
    system = simulation.system
    periodic_mass = sum(system.getParticleMass(k).value_in_unit(unit.dalton) for k in range(system.getNumParticles())) \
        if system.usesPeriodicBoundaryConditions() else 0.0
    state = StateCSVReporter(out / "state.csv", settings.report_interval, n_dof, settings.timestep_fs, append, guard,
                             disagreement, settings.disagreement_warn, settings.disagreement_stop, periodic_mass)
    simulation.reporters.extend([dcd, state, AtomicCheckpointReporter(out / "checkpoint.chk",
                                                                      settings.checkpoint_interval, run_id, guard)])
    bar = None
    log_lines = progress and not sys.stderr.isatty()   # a log file or batch queue: a line every 10% or minute
    if progress and not log_lines:
        from tqdm import tqdm
        bar = tqdm(total=steps, unit="step", file=sys.stderr, desc="MD")
    last_line = time.perf_counter()
    longest = chunk = max(settings.report_interval, min(1000, max(steps // 100, 1)))
    start_step = simulation.currentStep
    started = time.perf_counter()
    stopped = 0
    try:
        remaining = steps
        with runs.StopRequests() as stop:
            while remaining > 0 and not stop.signum:
                n = min(chunk, remaining)
                t0 = time.perf_counter()
                simulation.step(n)
                remaining -= n
                # chunks of at most ~5 s, so a stop request is honoured within seconds on any system size
                chunk = max(1, min(longest, int(n * 5.0 / max(time.perf_counter() - t0, 1e-9))))
                if bar is not None:
                    bar.update(n)
                done_here = steps - remaining
                now = time.perf_counter()
                if log_lines and (now - last_line >= 60 or done_here * 10 // steps > (done_here - n) * 10 // steps
                                  or remaining == 0):
                    ns_day = done_here * settings.timestep_fs * 1e-6 / max(now - started, 1e-9) * 86400
                    print(f"MD: step {simulation.currentStep} ({done_here}/{steps} this run, {100 * done_here / steps:.0f}%), "
                          f"{ns_day:.3g} ns/day", file=sys.stderr, flush=True)
                    last_line = now
            stopped = stop.signum
        if guard is not None:
            _guard_state(guard, simulation, simulation.context.getState(getPositions=True))
    except Exception as err:
        raise SimulationError(
            f"the run stopped near step {simulation.currentStep}: {torchscript_message(str(err))}\n"
            f"Frames written so far are kept in {trajectory}; the last good checkpoint is "
            f"{out / 'checkpoint.chk'}.") from None
    finally:
        wall = time.perf_counter() - started
        if bar is not None:
            bar.close()
        state.close()
        simulation.reporters.clear()
        dcd._out.close()  # DCDReporter has no public close(); flush the frames now, not at garbage collection
    save_checkpoint(simulation, out / "checkpoint.chk", run_id)
    save_checkpoint(simulation, out / "final.chk", run_id, keep_previous=False)
    _record_steps_done(out / RUN_RECORD, simulation.currentStep)
    if stopped:
        raise runs.RunInterrupted(f"stopped by {signal.Signals(stopped).name} at step {simulation.currentStep} with a "
                                  f"checkpoint there; continue with: schnet-md simulate --resume {out}", stopped)
    done = simulation.currentStep - start_step
    sps = done / wall if wall > 0 else float("nan")
    return SimulationResult(out, trajectory, out / "state.csv", simulation.currentStep // settings.report_interval,
                            simulation.currentStep, platform, wall, sps,
                            sps * settings.timestep_fs * 1e-6 * 86400)


__all__ = ["SimulationSettings", "SimulationResult", "SimulationError", "run_simulation", "resume_simulation",
           "build_system", "truncate_dcd"]
