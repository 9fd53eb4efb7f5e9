"""The OpenMM-facing module: positions (nm) [+ box vectors (nm)] -> energy (kJ/mol).

This is the one place where OpenMM's units meet the model's: nm -> Å on the way in, the model's
energy unit -> kJ/mol on the way out. The module carries the atomic numbers and the indices of the
particles it acts on, so a solute inside a larger system works; every other particle gets no force.
`openmmtorch.TorchForce(path)` loads the written file directly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from . import __version__
from .model import SchNet
from .modelfile import ModelFileError, load_model
from .neighbors import all_pairs, check_box, check_molecule_fits_box, minimum_image
from .units import ANGSTROM_PER_NM, energy_factor

EXPORT_FORMAT_VERSION = 1
METADATA_FILE = "schnet_md.json"   # TorchScript extra file holding the metadata


class OpenMMSchNet(nn.Module):
    """forward(positions [n_particles, 3] nm, boxvectors [3, 3] nm optional) -> energy kJ/mol (float64).

    Geometry modes:
      molecule   no box: all pairs, raw vectors;
      periodic   box and a model cutoff: all pairs at their minimum image (cutoff <= half box height);
      in_box     box, model without cutoff: a molecule inside a periodic system (e.g. solvated); pair
                 vectors are minimum images, valid while the molecule spans less than half the box.
    """

    def __init__(self, model: SchNet, atomic_numbers: Sequence[int], particle_indices: Sequence[int],
                 n_particles: int, periodic: bool):
        super().__init__()
        if len(atomic_numbers) != len(particle_indices):
            raise ValueError(f"{len(atomic_numbers)} atomic numbers for {len(particle_indices)} particles")
        indices = torch.as_tensor(np.asarray(particle_indices, dtype=np.int64))
        if len(indices) == 0 or int(indices.min()) < 0 or int(indices.max()) >= n_particles:
            raise ValueError(f"particle indices must lie in 0..{n_particles - 1}")
        if len(torch.unique(indices)) != len(indices):
            raise ValueError("particle indices contain duplicates")
        self.model = model
        self.register_buffer("species", model.species(torch.as_tensor(np.asarray(atomic_numbers))))
        self.register_buffer("particle_indices", indices)
        i, j = all_pairs(len(indices), torch.device("cpu"))
        self.register_buffer("pair_i", i)
        self.register_buffer("pair_j", j)
        self.n_particles = int(n_particles)
        self.periodic = bool(periodic)
        self.has_cutoff = model.cutoff != float("inf")
        self.cutoff = float(model.cutoff)
        self.angstrom_per_nm = ANGSTROM_PER_NM
        self.kj_per_model_energy = energy_factor(model.config.energy_unit, "kJ/mol")
        # The element reference energies are a constant for this composition; adding them in float64
        # after the sum keeps the absolute energy precise in a float32 model (forces are unaffected).
        reference = model.readout.reference_energies.detach().double()[self.species].sum()
        self.reference_energy_kj: float = float(reference) * self.kj_per_model_energy

    def forward(self, positions: Tensor, boxvectors: Optional[Tensor] = None) -> Tensor:
        if positions.dim() != 2 or positions.shape[0] != self.n_particles or positions.shape[1] != 3:
            raise ValueError("this SchNet force was exported for a system of " + str(self.n_particles)
                             + " particles, but got positions of shape " + str(list(positions.shape)))
        dtype = self.model.readout.scale.dtype
        r = positions.index_select(0, self.particle_indices).to(dtype) * self.angstrom_per_nm
        if not bool(torch.isfinite(r).all()):
            raise ValueError("SchNet force: positions contain NaN or infinite values (has the simulation "
                             "blown up?)")
        vectors = r.index_select(0, self.pair_j) - r.index_select(0, self.pair_i)
        if self.periodic:
            if boxvectors is None:
                raise ValueError("this SchNet force was exported for a periodic system but got no box vectors")
            box = boxvectors.to(dtype) * self.angstrom_per_nm
            if self.has_cutoff:
                check_box(box, self.cutoff)
            vectors = minimum_image(vectors, box)
            if not self.has_cutoff:
                check_molecule_fits_box(torch.linalg.norm(vectors, dim=-1).detach(), box)
        energy = self.model.atomic_energies(self.species, vectors, self.pair_i, self.pair_j, False).sum()
        return energy.to(torch.float64) * self.kj_per_model_energy + self.reference_energy_kj


ModelLike = Union[SchNet, str, os.PathLike]


def _load(model: ModelLike, dtype: str) -> Tuple[SchNet, dict]:
    torch_dtype = {"float32": torch.float32, "float64": torch.float64}[dtype]
    if isinstance(model, SchNet):
        return model.to(torch_dtype).eval(), {}
    return load_model(model, dtype=torch_dtype)


def build_module(model: ModelLike, atomic_numbers: Sequence[int], particle_indices: Sequence[int] | None = None,
                 n_particles: int | None = None, periodic: bool = False, dtype: str = "float32"
                 ) -> Tuple[torch.jit.ScriptModule, dict]:
    """Script an OpenMMSchNet; returns (module, metadata). Atomic numbers are those of the particles
    the model acts on, in the order of `particle_indices` (default: all particles 0..n-1)."""
    schnet, model_metadata = _load(model, dtype)
    if particle_indices is None:
        particle_indices = list(range(len(atomic_numbers)))
    n_particles = len(atomic_numbers) if n_particles is None else int(n_particles)
    module = torch.jit.script(OpenMMSchNet(schnet, atomic_numbers, particle_indices, n_particles, periodic))
    metadata = {
        "format": "schnet-md/openmm-force",
        "format_version": EXPORT_FORMAT_VERSION,
        "schnet_md_version": __version__,
        "preset": schnet.config.preset,
        "cutoff_angstrom": schnet.config.cutoff,
        "model_elements": schnet.config.elements,
        "atomic_numbers": [int(z) for z in atomic_numbers],
        "particle_indices": [int(k) for k in particle_indices],
        "n_particles": n_particles,
        "periodic": bool(periodic),
        "precision": dtype,
        "units": {"positions": "nm", "box": "nm", "energy": "kJ/mol"},
        "model_energy_unit": schnet.config.energy_unit,
        "training_data_sha256": model_metadata.get("training", {}).get("data_sha256"),
        "model": model_metadata,
    }
    return module, metadata


def _topology_atoms(topology, atoms: Sequence[int] | None):
    z = np.array([a.element.atomic_number if a.element is not None else 0 for a in topology.atoms()])
    indices = np.arange(len(z)) if atoms is None else np.asarray(atoms, dtype=np.int64)
    if (z[indices] == 0).any():
        raise ValueError("some selected atoms have no element in the topology")
    return z[indices], indices, len(z), topology.getPeriodicBoxVectors() is not None


def openmm_torch():
    """Import openmmtorch so its kernels work, whatever was imported first.

    The openmmtorch plugins link torch's libraries (libtorch_cuda, libnvrtc), which only resolve once
    torch is loaded. If `import openmm` ran before `import torch`, OpenMM has already tried and failed to
    load them; load those plugin libraries again now that torch is in the process."""
    import openmm
    import openmmtorch

    for failure in openmm.Platform.getPluginLoadFailures():
        if "Error loading library " not in failure:
            continue
        library = failure.split("Error loading library ", 1)[1].split(": ", 1)[0]
        if "OpenMMTorch" in library and Path(library).is_file() and "OpenCL" not in library:
            try:
                openmm.Platform.loadPluginLibrary(library)
            except Exception:  # a platform this machine lacks (e.g. CUDA without a GPU) stays unavailable
                pass
    return openmmtorch


def create_torch_force(model: ModelLike, topology_or_atomic_numbers, atoms: Sequence[int] | None = None,
                       periodic: bool | None = None, dtype: str = "float32"):
    """A ready `openmmtorch.TorchForce` for `model` acting on `atoms` of an OpenMM Topology (default:
    all of them), or on a list of atomic numbers (one per particle). Periodicity follows the
    topology's box unless given."""
    openmmtorch = openmm_torch()
    if hasattr(topology_or_atomic_numbers, "atoms"):
        z, indices, n_particles, has_box = _topology_atoms(topology_or_atomic_numbers, atoms)
    else:
        all_z = np.asarray(topology_or_atomic_numbers, dtype=np.int64)
        indices = np.arange(len(all_z)) if atoms is None else np.asarray(atoms, dtype=np.int64)
        z, n_particles, has_box = all_z[indices], len(all_z), False
    periodic = has_box if periodic is None else periodic
    module, _ = build_module(model, z, indices, n_particles, periodic, dtype)
    force = openmmtorch.TorchForce(module)
    force.setUsesPeriodicBoundaryConditions(periodic)
    force.setOutputsForces(False)
    return force


class SchNetComputation:
    """The computation of an `openmm.PythonForce`: State (nm) -> (energy kJ/mol, forces kJ/mol/nm).

    It pickles (PythonForce serialises and clones through pickle) by keeping the plain OpenMMSchNet
    module and rebuilding the TorchScript (or torch.compile) version after loading."""

    def __init__(self, module: OpenMMSchNet, periodic: bool, compile: bool = False):
        self.module = module
        self.periodic = periodic
        self.compile = compile
        self._build()

    def _build(self) -> None:
        self._run = torch.compile(self.module) if self.compile else torch.jit.script(self.module)

    def __getstate__(self):
        return {"module": self.module, "periodic": self.periodic, "compile": self.compile}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._build()

    def __call__(self, state):
        from openmm import unit

        positions = torch.from_numpy(
            np.ascontiguousarray(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer))).requires_grad_(True)
        box = None
        if self.periodic:
            box = torch.from_numpy(np.ascontiguousarray(
                state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(unit.nanometer)))
        energy = self._run(positions, box)
        (grad,) = torch.autograd.grad(energy, positions)
        return float(energy.detach()), -grad.numpy()


def create_python_force(model: ModelLike, topology_or_atomic_numbers, atoms: Sequence[int] | None = None,
                        periodic: bool | None = None, dtype: str = "float32", compile: bool = False):
    """The same model as `create_torch_force`, through OpenMM's own `PythonForce` (OpenMM >= 8.5): no
    openmm-torch needed, serialisable and clonable; optionally `torch.compile`d. Slower per step than
    TorchForce on a GPU (positions and forces cross to Python every step)."""
    import openmm

    if not hasattr(openmm, "PythonForce"):
        raise RuntimeError(f"OpenMM {openmm.__version__} has no PythonForce (needs OpenMM >= 8.5)")
    if hasattr(topology_or_atomic_numbers, "atoms"):
        z, indices, n_particles, has_box = _topology_atoms(topology_or_atomic_numbers, atoms)
    else:
        all_z = np.asarray(topology_or_atomic_numbers, dtype=np.int64)
        indices = np.arange(len(all_z)) if atoms is None else np.asarray(atoms, dtype=np.int64)
        z, n_particles, has_box = all_z[indices], len(all_z), False
    periodic = has_box if periodic is None else periodic
    schnet, _ = _load(model, dtype)
    # PythonForce hands the computation only the selected particles, in the order given
    module = OpenMMSchNet(schnet, z, list(range(len(indices))), len(indices), periodic)
    force = openmm.PythonForce(SchNetComputation(module, periodic, compile))
    if atoms is not None or len(indices) != n_particles:
        force.setParticles([int(k) for k in indices])
    force.setUsesPeriodicBoundaryConditions(periodic)
    return force


def export_model(model: ModelLike, structure, out: str | Path, atoms: Sequence[int] | None = None,
                 dtype: str = "float32", periodic: bool | None = None) -> Path:
    """Write the TorchScript force for `structure` (a schnet_md Structure or OpenMM Topology)."""
    topology = getattr(structure, "topology", structure)
    z, indices, n_particles, has_box = _topology_atoms(topology, atoms)
    periodic = has_box if periodic is None else periodic
    module, metadata = build_module(model, z, indices, n_particles, periodic, dtype)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.jit.save(module, str(tmp), _extra_files={METADATA_FILE: json.dumps(metadata)})
    os.replace(tmp, out)
    return out


def torchscript_message(text: str) -> str:
    """The message of an error raised inside a TorchScript module, without the interpreter's traceback."""
    marker = "builtins."
    if marker in text:
        last = text.rsplit(marker, 1)[1]
        return last.split(": ", 1)[1].strip() if ": " in last else last.strip()
    return text.strip()


def load_exported(path: str | Path) -> Tuple[torch.jit.ScriptModule, dict]:
    """Load an exported force module and its metadata, with a clear error for bad files."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"exported force file {path} does not exist")
    extra = {METADATA_FILE: ""}
    try:
        module = torch.jit.load(str(path), _extra_files=extra, map_location="cpu")
    except (RuntimeError, ValueError) as err:
        raise ModelFileError(f"{path} is not a readable TorchScript force file (damaged or truncated?): "
                             f"{str(err).splitlines()[0]}") from None
    if not extra[METADATA_FILE]:
        raise ModelFileError(f"{path} is TorchScript but not a schnet-md export (no {METADATA_FILE})")
    return module, json.loads(extra[METADATA_FILE])
