"""openmm-ml plugin: MLPotential('schnet') in createSystem and createMixedSystem (ML/MM)."""

from __future__ import annotations

import numpy as np
import openmm
import pytest
import torch
from openmm import unit

from conftest import SYSTEMS, isolated, random_model
from schnet_md.export import create_torch_force
from schnet_md.modelfile import save_model
from schnet_md.structures import molecule_topology, read_structure

openmmml = pytest.importorskip("openmmml")
from openmmml import MLPotential  # noqa: E402

KJ = unit.kilojoule_per_mole


def energy_forces(system, positions, parameters=None, groups=-1):
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(positions)
    for name, value in (parameters or {}).items():
        context.setParameter(name, value)
    state = context.getState(getEnergy=True, getForces=True, groups=groups)
    return state.getPotentialEnergy().value_in_unit(KJ), state.getForces(asNumpy=True).value_in_unit(KJ / unit.nanometer)


@pytest.fixture
def model_file(tmp_path):
    return save_model(random_model(elements=(1, 6, 8, 18), dtype=torch.float32), tmp_path / "model.pt")


def test_registered_through_the_entry_point():
    assert "schnet" in MLPotential._implFactories


def test_create_system_equals_the_exported_torchforce(model_file):
    s = read_structure(SYSTEMS / "ethanol" / "ethanol.pdb")
    system = MLPotential("schnet", modelPath=str(model_file)).createSystem(s.topology)
    e, f = energy_forces(system, s.positions_nm)
    direct = openmm.System()
    for atom in s.topology.atoms():
        direct.addParticle(atom.element.mass)
    direct.addForce(create_torch_force(str(model_file), s.topology))
    e_ref, f_ref = energy_forces(direct, s.positions_nm)
    assert e == pytest.approx(e_ref, rel=1e-6)
    np.testing.assert_allclose(f, f_ref, rtol=1e-5, atol=1e-4)


def test_create_system_with_tabulated_filters(model_file):
    """MLPotential('schnet', tabulate=True): the filters from spline tables, the same forces as the exported
    TorchForce with its filter network, to float32 precision."""
    s = read_structure(SYSTEMS / "ethanol" / "ethanol.pdb")
    e, f = energy_forces(MLPotential("schnet", modelPath=str(model_file), tabulate=True).createSystem(s.topology),
                         s.positions_nm)
    e_ref, f_ref = energy_forces(MLPotential("schnet", modelPath=str(model_file)).createSystem(s.topology),
                                 s.positions_nm)
    assert e == pytest.approx(e_ref, rel=1e-6)
    np.testing.assert_allclose(f, f_ref, rtol=0, atol=1e-4 * np.abs(f_ref).max())
    assert not np.array_equal(f, f_ref)   # the tables did run: they agree to rounding, not bit for bit


def mm_system(topology, n_ethanol_atoms):
    """A hand-made MM system: harmonic bonds and angles for ethanol, charges + LJ for everything."""
    system = openmm.System()
    atoms = list(topology.atoms())
    for atom in atoms:
        system.addParticle(atom.element.mass)
    bonds = openmm.HarmonicBondForce()
    angles = openmm.HarmonicAngleForce()
    nonbonded = openmm.NonbondedForce()
    nonbonded.setNonbondedMethod(openmm.NonbondedForce.NoCutoff)
    charges = {1: 0.1, 6: -0.1, 8: -0.4, 18: 0.0}
    for atom in atoms:
        z = atom.element.atomic_number
        nonbonded.addParticle(charges[z] if atom.index < n_ethanol_atoms else 0.0, 0.3, 0.5)
    pairs = []
    for b in topology.bonds():
        i, j = b[0].index, b[1].index
        bonds.addBond(i, j, 0.11, 2.0e5)
        pairs.append((i, j))
    neighbours = {k: set() for k in range(len(atoms))}
    for i, j in pairs:
        neighbours[i].add(j)
        neighbours[j].add(i)
    for center, ns in neighbours.items():
        ns = sorted(ns)
        for a in range(len(ns)):
            for b in range(a + 1, len(ns)):
                angles.addAngle(ns[a], center, ns[b], 1.91, 300.0)
    nonbonded.createExceptionsFromBonds(pairs, 0.8333, 0.5)
    for force in (bonds, angles, nonbonded):
        system.addForce(force)
    return system


def ethanol_with_argon():
    """Ethanol (the ML region) plus two argon atoms nearby, and its MM system: (n_ml, z, positions nm, topology, mm)."""
    s = read_structure(SYSTEMS / "ethanol" / "ethanol.pdb")
    n = s.n_atoms
    z = s.atomic_numbers.tolist() + [18, 18]
    positions = np.vstack([s.positions_nm, [[0.45, 0.0, 0.0], [-0.45, 0.1, 0.0]]])
    topology = molecule_topology(z, positions * 10)
    return n, z, positions, topology, mm_system(topology, n)


@isolated   # interpolation clones the TorchForce: a crash on a mismatched stack must not end the run
def test_mixed_system_removes_ml_bonded_terms_and_interpolates(model_file):
    n, z, positions, topology, mm = ethanol_with_argon()
    ml_atoms = list(range(n))
    potential = MLPotential("schnet", modelPath=str(model_file))
    mixed = potential.createMixedSystem(topology, mm, ml_atoms, interpolate=True)

    for force in mixed.getForces():
        if isinstance(force, openmm.HarmonicBondForce):
            for k in range(force.getNumBonds()):
                i, j, *_ = force.getBondParameters(k)
                assert not (i in ml_atoms and j in ml_atoms), "an MM bond inside the ML region survived"
        if isinstance(force, openmm.HarmonicAngleForce):
            for k in range(force.getNumAngles()):
                i, j, l, *_ = force.getAngleParameters(k)
                assert not {i, j, l} <= set(ml_atoms), "an MM angle inside the ML region survived"

    e_mm, _ = energy_forces(mm, positions)
    e0, _ = energy_forces(mixed, positions, {"lambda_interpolate": 0.0})
    assert e0 == pytest.approx(e_mm, rel=1e-6, abs=1e-3)

    # lambda = 1: the MM energy minus ethanol's own MM energy, plus the ML energy of ethanol
    ethanol_only = mm_system(molecule_topology(z[:n], positions[:n] * 10), n)
    e_mm_internal, _ = energy_forces(ethanol_only, positions[:n])
    ml_only = openmm.System()
    for _ in range(n):
        ml_only.addParticle(12.0)
    ml_only.addForce(create_torch_force(str(model_file), z[:n]))
    e_ml, _ = energy_forces(ml_only, positions[:n])
    e1, _ = energy_forces(mixed, positions, {"lambda_interpolate": 1.0})
    assert e1 == pytest.approx(e_mm - e_mm_internal + e_ml, rel=1e-5, abs=1e-2)
    e_half, _ = energy_forces(mixed, positions, {"lambda_interpolate": 0.5})
    assert e_half == pytest.approx(0.5 * (e0 + e1), rel=1e-5, abs=1e-2)


def test_periodic_ml_region_in_a_box(model_file):
    s = read_structure(SYSTEMS / "ethanol" / "ethanol.pdb")
    box = np.diag([2.5, 2.5, 2.5])
    topology = molecule_topology(s.atomic_numbers.tolist(), s.positions_nm * 10, box_nm=box)
    system = MLPotential("schnet", modelPath=str(model_file)).createSystem(topology)
    assert system.usesPeriodicBoundaryConditions()
    e, _ = energy_forces(system, s.positions_nm + 1.0)
    e_free, _ = energy_forces(MLPotential("schnet", modelPath=str(model_file)).createSystem(s.topology), s.positions_nm)
    assert e == pytest.approx(e_free, rel=1e-6)


def test_an_exported_force_is_checked_against_the_topology(model_file, tmp_path):
    """modelPath may name a file from `schnet-md export`: the same energies as the model file, and a topology whose
    atoms are in another order is refused, naming the first atom that differs."""
    from schnet_md.export import export_model

    s = read_structure(SYSTEMS / "ethanol" / "ethanol.pdb")
    force_file = export_model(str(model_file), s, tmp_path / "force.pt")
    e, f = energy_forces(MLPotential("schnet", modelPath=str(force_file)).createSystem(s.topology), s.positions_nm)
    e_ref, f_ref = energy_forces(MLPotential("schnet", modelPath=str(model_file)).createSystem(s.topology),
                                 s.positions_nm)
    assert e == pytest.approx(e_ref, rel=1e-6)
    np.testing.assert_allclose(f, f_ref, rtol=1e-5, atol=1e-4)
    order = [2, 0, 1, 3, 4, 5, 6, 7, 8]
    swapped = molecule_topology(s.atomic_numbers[order], s.positions_nm[order] * 10)
    with pytest.raises(ValueError, match=r"does not fit this system: atom 0 \(MOL1:O1\) is O here but C in the force"):
        MLPotential("schnet", modelPath=str(force_file)).createSystem(swapped)


def test_missing_model_path_is_a_clear_error():
    with pytest.raises(ValueError, match="needs modelPath"):
        MLPotential("schnet")


def test_periodic_output_keeps_the_ml_molecule_whole(model_file):
    """createMixedSystem removes the MM bonds inside the ML region; without a force that declares them,
    getState(enforcePeriodicBox=True) (what DCD writers use) wraps each atom on its own and splits the
    molecule across the box. The energy must not change."""
    s = read_structure(SYSTEMS / "ethanol" / "ethanol.pdb")
    n = s.n_atoms
    z = s.atomic_numbers.tolist() + [18, 18]
    box = np.diag([2.5, 2.5, 2.5])
    positions = np.vstack([s.positions_nm, [[0.45, 0.0, 0.0], [-0.45, 0.1, 0.0]]])
    positions -= positions[0]           # the molecule straddles the box corner: some coordinates negative
    topology = molecule_topology(z, positions * 10, box_nm=box)
    mm = mm_system(topology, n)
    mm.setDefaultPeriodicBoxVectors(*[openmm.Vec3(*row) for row in box])
    mixed = MLPotential("schnet", modelPath=str(model_file)).createMixedSystem(topology, mm, list(range(n)))
    context = openmm.Context(mixed, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(positions)
    wrapped = context.getState(getPositions=True, enforcePeriodicBox=True).getPositions(asNumpy=True)._value[:n]
    bonds = [(a.index, b.index) for a, b in topology.bonds() if a.index < n and b.index < n]
    assert bonds and max(np.linalg.norm(wrapped[i] - wrapped[j]) for i, j in bonds) < 0.2   # nm: whole
    zero = [f for f in mixed.getForces() if isinstance(f, openmm.CustomBondForce) and "SchNet" in f.getName()]
    assert len(zero) == 1 and zero[0].getNumBonds() == len(bonds)
    # the bond list adds no energy: the mixed energy equals the system without it
    e, _ = energy_forces(mixed, positions)
    mixed.removeForce(next(k for k, f in enumerate(mixed.getForces())
                           if isinstance(f, openmm.CustomBondForce) and "SchNet" in f.getName()))
    e_without, _ = energy_forces(mixed, positions)
    assert e == pytest.approx(e_without, rel=1e-12, abs=1e-9)
