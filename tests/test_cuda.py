"""CUDA correctness (issue #17): OpenMM's CUDA platform against its CPU platform, CUDA graphs, the
neighbour-list overflow path and training steps on the GPU. Marked `cuda`; skipped without a CUDA device (CI
has none): `benchmarks/gpu/run.sh` runs them on a lent GPU machine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import openmm
from openmm import unit

from conftest import SYSTEMS, random_model

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

KJ, KJ_NM = unit.kilojoule_per_mole, unit.kilojoule_per_mole / unit.nanometer


def _platform_available(name: str) -> bool:
    from schnet_md.export import openmm_torch

    openmm_torch()
    return name in [openmm.Platform.getPlatform(k).getName() for k in range(openmm.Platform.getNumPlatforms())]


def evaluate(system, positions, platform, properties=None):
    context = openmm.Context(system, openmm.VerletIntegrator(0.0005), openmm.Platform.getPlatformByName(platform),
                             properties or {})
    context.setPositions(positions)
    box = system.getDefaultPeriodicBoxVectors()
    context.setPeriodicBoxVectors(*box)
    state = context.getState(getEnergy=True, getForces=True)
    return state.getPotentialEnergy().value_in_unit(KJ), state.getForces(asNumpy=True).value_in_unit(KJ_NM)


def with_force(topology, force, box_nm=None):
    from schnet_md.simulate import particle_system

    system = particle_system(topology)
    if box_nm is not None:
        system.setDefaultPeriodicBoxVectors(*[openmm.Vec3(*row) for row in box_nm])
    system.addForce(force)
    return system


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cuda_platform_equals_cpu_for_a_shipped_molecule(dtype):
    if not _platform_available("CUDA"):
        pytest.skip("OpenMM's CUDA platform did not load (see the plugin load failures in the run's install log)")
    from schnet_md.export import create_torch_force
    from schnet_md.structures import read_structure

    s = read_structure(SYSTEMS / "aspirin" / "aspirin.pdb")
    system = with_force(s.topology, create_torch_force("aspirin", s.topology, dtype=dtype))
    e_cpu, f_cpu = evaluate(system, s.positions_nm, "CPU")
    e_gpu, f_gpu = evaluate(system, s.positions_nm, "CUDA")
    tol = 1e-5 if dtype == "float32" else 1e-10
    assert e_gpu == pytest.approx(e_cpu, rel=tol)
    np.testing.assert_allclose(f_gpu, f_cpu, rtol=1e-3 if dtype == "float32" else 1e-8,
                               atol=1e-2 if dtype == "float32" else 1e-7)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cuda_platform_equals_cpu_for_a_water_box_with_the_cell_list(dtype):
    if not _platform_available("CUDA"):
        pytest.skip("OpenMM's CUDA platform did not load")
    from schnet_md.bench import water_box
    from schnet_md.export import create_torch_force

    topology, positions = water_box(1500)
    box = np.array(topology.getPeriodicBoxVectors().value_in_unit(unit.nanometer))
    model = random_model("schnet2018", elements=(1, 8), n_features=32, n_interactions=3)
    force = create_torch_force(model, topology, positions=positions, dtype=dtype, neighbor_list="cells")
    system = with_force(topology, force, box)
    e_cpu, f_cpu = evaluate(system, positions, "CPU")
    e_gpu, f_gpu = evaluate(system, positions, "CUDA")
    assert e_gpu == pytest.approx(e_cpu, rel=1e-5 if dtype == "float32" else 1e-10)
    np.testing.assert_allclose(f_gpu, f_cpu, rtol=1e-3, atol=1e-2 if dtype == "float32" else 1e-7)


def test_cuda_graphs_give_the_same_trajectory():
    if not _platform_available("CUDA"):
        pytest.skip("OpenMM's CUDA platform did not load")
    from schnet_md.export import create_torch_force
    from schnet_md.structures import read_structure

    s = read_structure(SYSTEMS / "ethanol" / "ethanol.pdb")
    finals = []
    for graphs in (False, True):
        system = with_force(s.topology, create_torch_force("ethanol", s.topology, cuda_graphs=graphs))
        integrator = openmm.VerletIntegrator(0.0005)
        context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("CUDA"),
                                 {"Precision": "mixed"})
        context.setPositions(s.positions_nm)
        context.setVelocitiesToTemperature(300, 7)
        integrator.step(200)
        finals.append(context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer))
    np.testing.assert_allclose(finals[1], finals[0], atol=1e-5)


def test_overflow_still_reaches_the_user_on_cuda():
    from schnet_md.bench import water_box
    from schnet_md.export import build_module

    topology, positions = water_box(1500)
    box = np.array(topology.getPeriodicBoxVectors().value_in_unit(unit.nanometer))
    z = [a.element.atomic_number for a in topology.atoms()]
    model = random_model("schnet2018", elements=(1, 8), n_features=16, n_interactions=2, dtype=torch.float32)
    x = torch.as_tensor(positions, dtype=torch.float32, device="cuda")
    b = torch.as_tensor(box, dtype=torch.float32, device="cuda")
    safe, _ = build_module(model, z, periodic=True, box_nm=box, positions_nm=positions, neighbor_list="cells",
                           capacity=100, check_errors=False)
    assert torch.isnan(safe.cuda()(x, b))
    checked, _ = build_module(model, z, periodic=True, box_nm=box, positions_nm=positions, neighbor_list="cells",
                              capacity=100, check_errors=True)
    with pytest.raises(Exception, match="overflowed"):
        checked.cuda()(x, b)


def test_training_steps_on_cuda_equal_the_cpu(tmp_path):
    from schnet_md.data import Dataset
    from schnet_md.model import config_from_preset
    from schnet_md.train import TrainSettings, train

    rng = np.random.default_rng(0)
    n, atoms = 24, 9
    z = np.tile([6, 6, 8, 1, 1, 1, 1, 1, 1], n)
    base = rng.normal(size=(atoms, 3)) * 1.2
    positions = np.concatenate([base + 0.05 * rng.normal(size=base.shape) for _ in range(n)])
    data = Dataset(atomic_numbers=z, positions=positions, offsets=np.arange(n + 1) * atoms,
                   energies=rng.normal(size=n), forces=rng.normal(size=(n * atoms, 3)), energy_unit="kcal/mol",
                   source="synthetic")
    config = config_from_preset("schnet2017", [1, 6, 8], n_features=16, n_interactions=2)
    histories = []
    for device in ("cpu", "cuda"):
        s = train(data, config, tmp_path / device, TrainSettings(epochs=3, batch_size=8, device=device),
                  log=lambda _: None)
        histories.append(s["history"])
    for a, b in zip(*histories):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
        assert b["validation_forces_mae"] == pytest.approx(a["validation_forces_mae"], rel=1e-3)
