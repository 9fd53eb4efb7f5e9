"""The exported TorchForce inside OpenMM reproduces the model (after nm/Å and energy-unit conversion)."""

from __future__ import annotations

import numpy as np
import openmm
import pytest
import torch
from openmm import unit

from conftest import SYSTEMS, random_model, reduced_box
from schnet_md.export import create_torch_force, export_model, load_exported
from schnet_md.model import energy_and_forces
from schnet_md.structures import molecule_topology, read_structure

import openmmtorch  # noqa: E402  (after torch)

PLATFORMS = ["Reference", "CPU"]
# Written out here on purpose, not imported from schnet_md.units: a wrong constant there must fail.
KJ_PER_KCAL = 4.184
KJ_PER_EV = 96.485332
ANGSTROM_PER_NM = 10.0


def openmm_energy_forces(system, positions_nm, platform, box_nm=None):
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName(platform))
    if box_nm is not None:
        context.setPeriodicBoxVectors(*[openmm.Vec3(*map(float, v)) for v in box_nm])
    context.setPositions(positions_nm)
    state = context.getState(getEnergy=True, getForces=True)
    return (state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole),
            state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer))


def system_with(force, masses):
    system = openmm.System()
    for m in masses:
        system.addParticle(m)
    system.addForce(force)
    return system


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("energy_unit,kj_per_unit", [("kcal/mol", KJ_PER_KCAL), ("eV", KJ_PER_EV)])
def test_torchforce_reproduces_model_energy_and_forces(ethanol, platform, energy_unit, kj_per_unit):
    z, r = ethanol
    model = random_model(dtype=torch.float32, energy_unit=energy_unit)
    e_model, f_model = energy_and_forces(model, z, r.float())
    force = create_torch_force(model, z.tolist())
    system = system_with(force, [12.0] * len(z))
    e, f = openmm_energy_forces(system, r.numpy() / ANGSTROM_PER_NM, platform)
    assert e == pytest.approx(float(e_model) * kj_per_unit, rel=1e-5)
    # kJ/mol/nm = (energy unit / Å) * kJ per unit * Å per nm
    np.testing.assert_allclose(f, f_model.numpy() * kj_per_unit * ANGSTROM_PER_NM, rtol=1e-4,
                               atol=1e-4 * np.abs(f).max())


@pytest.mark.parametrize("platform", PLATFORMS)
def test_exported_file_loads_in_torchforce_with_metadata(tmp_path, ethanol, platform):
    z, r = ethanol
    model = random_model(dtype=torch.float32)
    structure = read_structure(SYSTEMS / "ethanol" / "ethanol.pdb")
    path = export_model(model, structure, tmp_path / "force.pt")
    module, meta = load_exported(path)
    assert meta["units"] == {"positions": "nm", "box": "nm", "energy": "kJ/mol"}
    assert meta["atomic_numbers"] == z.tolist() and meta["n_particles"] == 9 and meta["periodic"] is False
    assert meta["format_version"] == 3 and meta["model_elements"] == [1, 6, 7, 8]
    force = openmmtorch.TorchForce(str(path))
    system = system_with(force, [a.element.mass for a in structure.topology.atoms()])
    e, _ = openmm_energy_forces(system, structure.positions_nm, platform)
    with torch.no_grad():
        e_model = model(z, torch.as_tensor(structure.positions_nm * 10, dtype=torch.float32))
    assert e == pytest.approx(float(e_model) * KJ_PER_KCAL, rel=1e-5)
    with torch.no_grad():
        assert float(module(torch.as_tensor(structure.positions_nm))) == pytest.approx(e, rel=1e-5)
    # openmm-torch calls energy.backward(): frozen weights mean no weight gradients are computed each step,
    # and the user's model is left trainable
    assert not any(p.requires_grad for p in module.parameters())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("platform", PLATFORMS)
def test_subset_export_leaves_other_particles_force_free(ethanol, platform):
    z, r = ethanol
    model = random_model(dtype=torch.float32)
    # ethanol at particles 2..10 of a 14-particle system; the other particles are argon
    n = 14
    atoms = list(range(2, 11))
    all_z = [18] * n
    for k, a in enumerate(atoms):
        all_z[a] = int(z[k])
    top = molecule_topology(all_z)
    positions = np.random.default_rng(0).normal(scale=0.8, size=(n, 3))
    positions[atoms] = r.numpy() / ANGSTROM_PER_NM
    force = create_torch_force(model, top, atoms=atoms)
    system = system_with(force, [a.element.mass for a in top.atoms()])
    e, f = openmm_energy_forces(system, positions, platform)
    e_model, f_model = energy_and_forces(model, z, r.float())
    assert e == pytest.approx(float(e_model) * KJ_PER_KCAL, rel=1e-5)
    others = [k for k in range(n) if k not in atoms]
    assert np.all(f[others] == 0.0)
    np.testing.assert_allclose(f[atoms], f_model.numpy() * KJ_PER_KCAL * ANGSTROM_PER_NM, rtol=1e-4,
                               atol=1e-4 * np.abs(f).max())


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("kind", ["orthorhombic", "triclinic"])
def test_periodic_torchforce_matches_model(platform, kind):
    rng = np.random.default_rng(11)
    box = reduced_box(kind, rng, size=10.0)
    model = random_model("schnet2018", elements=(1, 8), n_features=16, n_interactions=2, cutoff=4.5,
                         dtype=torch.float32)
    n = 18
    pos = (torch.as_tensor(rng.random((n, 3))) @ box).float()
    z = torch.as_tensor(rng.choice([1, 8], size=n))
    e_model, f_model = energy_and_forces(model, z, pos, box.float())
    top = molecule_topology(z.tolist(), box_nm=box.numpy() / ANGSTROM_PER_NM)
    force = create_torch_force(model, top)
    assert force.usesPeriodicBoundaryConditions()
    system = system_with(force, [16.0] * n)
    system.setDefaultPeriodicBoxVectors(*[openmm.Vec3(*map(float, v)) for v in box.numpy() / ANGSTROM_PER_NM])
    e, f = openmm_energy_forces(system, pos.numpy() / ANGSTROM_PER_NM, platform)
    assert e == pytest.approx(float(e_model) * KJ_PER_KCAL, rel=1e-5)
    np.testing.assert_allclose(f, f_model.numpy() * KJ_PER_KCAL * ANGSTROM_PER_NM, rtol=1e-3,
                               atol=1e-4 * np.abs(f).max())


def test_molecule_in_periodic_box_without_cutoff(ethanol):
    """A no-cutoff model acting on a molecule inside a periodic system sees the molecule whole even when
    OpenMM hands over positions wrapped into the box."""
    z, r = ethanol
    model = random_model(dtype=torch.float64)
    box_nm = np.diag([2.0, 2.0, 2.0])
    top = molecule_topology(z.tolist(), box_nm=box_nm)
    force = create_torch_force(model, top, dtype="float64")
    system = system_with(force, [12.0] * len(z))
    system.setDefaultPeriodicBoxVectors(*[openmm.Vec3(*v) for v in box_nm])
    pos = r.numpy() / ANGSTROM_PER_NM + 1.95       # straddles the box edge at 2 nm ...
    wrapped = pos - np.floor(pos / 2.0) * 2.0      # ... and wrapped atom by atom into [0, 2) nm
    assert (wrapped != pos).any() and (wrapped == pos).any()
    e, _ = openmm_energy_forces(system, wrapped, "Reference")
    with torch.no_grad():
        assert e == pytest.approx(float(model(z, r)) * KJ_PER_KCAL, rel=1e-10)


def test_float32_export_keeps_absolute_energy_precise(ethanol):
    """Real models carry element reference energies of ~10^4 kcal/mol per atom; float32 would round the
    total to ~0.03 kJ/mol. The export adds that constant in float64, so the energy stays precise."""
    z, r = ethanol
    model64 = random_model(dtype=torch.float64)
    with torch.no_grad():
        model64.readout.reference_energies.copy_(torch.tensor([-313.5, -23765.4, -34257.8, -47060.3]))
        e64 = float(model64(z, r)) * KJ_PER_KCAL
    model32 = random_model(dtype=torch.float32)
    model32.load_state_dict(model64.state_dict())
    force = create_torch_force(model32, z.tolist())
    e, _ = openmm_energy_forces(system_with(force, [12.0] * len(z)), r.numpy() / ANGSTROM_PER_NM, "Reference")
    assert abs(e) > 4e5
    assert abs(e - e64) < 2e-3   # kJ/mol; plain float32 summation would be off by ~1e-2


def _state(force, n, positions, box_nm=None, platform="Reference"):
    system = openmm.System()
    for _ in range(n):
        system.addParticle(12.0)
    if box_nm is not None:
        system.setDefaultPeriodicBoxVectors(*[openmm.Vec3(*map(float, v)) for v in box_nm])
    system.addForce(force)
    return openmm_energy_forces(system, positions, platform)


@pytest.mark.parametrize("case", ["molecule", "subset", "periodic"])
def test_pythonforce_and_torchforce_backends_agree(ethanol, case):
    import copy

    from schnet_md.export import create_python_force

    z, r = ethanol
    if case == "periodic":
        rng = np.random.default_rng(5)
        box = reduced_box("triclinic", rng, size=10.0)
        model = random_model("schnet2018", elements=(1, 8), n_features=16, n_interactions=2, cutoff=4.5,
                             dtype=torch.float32)
        zs = rng.choice([1, 8], size=16).tolist()
        target = molecule_topology(zs, box_nm=box.numpy() / 10)
        positions, n, atoms, box_nm = (torch.as_tensor(rng.random((16, 3))) @ box).numpy() / 10, 16, None, box.numpy() / 10
    else:
        model = random_model(dtype=torch.float32)
        box_nm = None
        if case == "molecule":
            target, positions, n, atoms = z.tolist(), r.numpy() / 10, 9, None
        else:
            target, n, atoms = [18, 18] + z.tolist(), 11, list(range(2, 11))
            positions = np.vstack([[[0.5, 0, 0], [-0.5, 0, 0]], r.numpy() / 10])
    e_t, f_t = _state(create_torch_force(model, target, atoms=atoms), n, positions, box_nm)
    python_force = create_python_force(model, target, atoms=atoms)
    clone = copy.deepcopy(python_force)   # clones through pickle (before a System takes ownership)
    e_p, f_p = _state(python_force, n, positions, box_nm)
    assert e_p == pytest.approx(e_t, rel=1e-9)
    np.testing.assert_allclose(f_p, f_t, rtol=1e-6, atol=1e-6)
    e_c, _ = _state(clone, n, positions, box_nm)
    assert e_c == pytest.approx(e_t, rel=1e-9)


@pytest.mark.slow
def test_pythonforce_torch_compile_agrees(ethanol):
    from schnet_md.export import create_python_force

    z, r = ethanol
    model = random_model(dtype=torch.float32)
    e_t, f_t = _state(create_torch_force(model, z.tolist()), 9, r.numpy() / 10)
    e_c, f_c = _state(create_python_force(model, z.tolist(), compile=True), 9, r.numpy() / 10)
    assert e_c == pytest.approx(e_t, rel=1e-6)
    np.testing.assert_allclose(f_c, f_t, rtol=1e-4, atol=1e-4)
