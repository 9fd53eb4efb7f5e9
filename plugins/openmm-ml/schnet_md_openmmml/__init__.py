"""openmm-ml plugin for schnet-md.

    from openmmml import MLPotential
    potential = MLPotential("schnet", modelPath="model.pt")        # or a shipped name, e.g. "ethanol"
                                                                   # or a force from `schnet-md export`
    system = potential.createSystem(topology)
    mixed = potential.createMixedSystem(topology, mm_system, ml_atoms, interpolate=True)

createMixedSystem uses openmm-ml's own embeddings (default: mechanical), which remove the MM bonded
terms and nonbonded interactions inside the ML region and add `lambda_interpolate` when asked.
Extra arguments: precision ("float32" | "float64"), backend ("torch" | "python"), tabulate (True: the filters
from spline tables, schnet_md.tabulated; faster, the same forces to float32 precision).
In a periodic system a zero-energy CustomBondForce also lists the ML region's bonds, so that periodic output
(e.g. a DCD) keeps the molecule whole after its MM bonds are gone.

backend "torch" (the default, also with interpolate=True, where openmm-ml clones the ML forces) adds an
openmmtorch.TorchForce; "python" adds the same model as an openmm.PythonForce (no openmm-torch needed).
Cloning a TorchForce needs OpenMM and openmm-torch built for the same C++ ABI (see `schnet-md doctor`).
A force file written by `schnet-md export` is used as exported (backend "torch"), once its particles and element
order are checked against the topology and the ML atoms.
"""

from __future__ import annotations

import openmm
from openmmml.mlpotential import MLPotentialImpl, MLPotentialImplFactory


class SchNetPotentialImplFactory(MLPotentialImplFactory):
    def createImpl(self, name: str, modelPath=None, precision: str = "float32", backend: str = "torch",
                   tabulate: bool = False, **args) -> MLPotentialImpl:
        if modelPath is None:
            raise ValueError("MLPotential('schnet') needs modelPath= (a schnet-md model file or shipped model name)")
        return SchNetPotentialImpl(modelPath, precision, backend, tabulate)


class SchNetPotentialImpl(MLPotentialImpl):
    def __init__(self, modelPath, precision: str = "float32", backend: str = "torch", tabulate: bool = False):
        from schnet_md.export import load_exported
        from schnet_md.modelfile import file_kind, load_model

        if backend not in ("torch", "python"):
            raise ValueError(f"backend must be 'torch' or 'python', got {backend!r}")
        self.modelPath = modelPath
        self.precision = precision
        self.backend = backend
        self.tabulate = bool(tabulate)
        # fail early, with schnet-md's clear errors
        if file_kind(modelPath) == "openmm-force":      # an exported force: create_torch_force checks its atoms
            if backend != "torch":
                raise ValueError(f"{modelPath} is an exported TorchForce: it runs with backend='torch' only")
            self.model, self.metadata = str(modelPath), load_exported(modelPath)[1]
        else:
            self.model, self.metadata = load_model(modelPath)

    def addForces(self, topology, system: openmm.System, atoms, forceGroup: int, **args):
        from schnet_md.export import create_python_force, create_torch_force, molecule_bonds

        periodic = topology.getPeriodicBoxVectors() is not None or system.usesPeriodicBoundaryConditions()
        precision = args.get("precision", self.precision)
        backend = args.get("backend", self.backend)
        make = create_python_force if backend == "python" else create_torch_force
        force = make(self.model, topology, atoms=None if atoms is None else list(atoms), periodic=periodic,
                     dtype=precision, tabulate=bool(args.get("tabulate", self.tabulate)))
        force.setForceGroup(forceGroup)
        system.addForce(force)
        if periodic:
            system.addForce(molecule_bonds(topology, atoms, forceGroup))

    def getMLLongRange(self) -> bool:
        return False   # SchNet interactions are short-ranged (cutoff, or a molecule's own atoms)
