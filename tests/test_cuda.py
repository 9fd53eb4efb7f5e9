"""CUDA correctness (issue #17): OpenMM's CUDA platform against its CPU platform, CUDA graphs, the
neighbour-list overflow path and training steps on the GPU. Marked `cuda`; skipped without a CUDA device (CI
has none): `benchmarks/gpu/run.sh` runs them on a lent GPU machine."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import openmm
from openmm import unit

from conftest import SYSTEMS, random_model

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

KJ, KJ_NM = unit.kilojoule_per_mole, unit.kilojoule_per_mole / unit.nanometer


@functools.lru_cache(maxsize=None)
def cuda_problem(backend: str) -> str:
    """Why `backend` ("torch": openmm-torch's TorchForce, "python": OpenMM's PythonForce with the model on the
    GPU) cannot run on OpenMM's CUDA platform on this machine; "" when it can. Tried on a 3-atom system, so
    a plugin built against another torch shows up as a skip with its loader message, not as an error."""
    from schnet_md.export import create_python_force, create_torch_force

    try:
        platforms = [openmm.Platform.getPlatform(k).getName() for k in range(openmm.Platform.getNumPlatforms())]
        if "CUDA" not in platforms:
            return f"OpenMM's CUDA platform did not load: {openmm.Platform.getPluginLoadFailures()}"
        model = random_model("schnet2017", elements=(1, 8), n_features=8, n_interactions=1)
        if backend == "torch":
            force = create_torch_force(model, [8, 1, 1])
        else:
            force = create_python_force(model, [8, 1, 1], device="cuda")
        system = openmm.System()
        for mass in (16.0, 1.0, 1.0):
            system.addParticle(mass)
        system.addForce(force)
        evaluate(system, [[0, 0, 0], [0.1, 0, 0], [0, 0.1, 0]], "CUDA")
    except Exception as error:
        return f"{type(error).__name__}: {error} (plugin load failures: {openmm.Platform.getPluginLoadFailures()})"
    return ""


def skip_unless_runs(backend: str) -> None:
    problem = cuda_problem(backend)
    if problem:
        pytest.skip(f"{backend} backend on OpenMM's CUDA platform: {problem}"[:2000])


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


def cpu_and_cuda(backend: str, make_force, topology, positions, box_nm=None, **export):
    """(energy, forces) of the exported module called directly on the CPU, and of the force on OpenMM's CUDA
    platform (model on the GPU). The CPU side does not go through OpenMM's CPU platform: on the GPU machine
    openmm-torch's CPU plugin, built against torch 2.9, fails under torch 2.11 (benchmarks/gpu.md); CI checks
    that OpenMM's CPU platform gives the module's numbers."""
    from schnet_md.export import build_module

    z = [a.element.atomic_number for a in topology.atoms()]
    module, _ = build_module(export["model"], z, periodic=box_nm is not None, box_nm=box_nm, positions_nm=positions,
                             dtype=export.get("dtype", "float32"), neighbor_list=export.get("neighbor_list", "auto"))
    x = torch.as_tensor(np.asarray(positions), dtype=torch.float64).requires_grad_(True)
    b = None if box_nm is None else torch.as_tensor(box_nm, dtype=torch.float64)
    energy = module(x, b)
    (grad,) = torch.autograd.grad(energy, x)
    reference = (float(energy), -grad.numpy())
    # OpenMM's CUDA platform keeps positions in float32 unless asked for double precision: a float64 model then
    # sees rounded positions (forces off by ~1e-4 relative in aspirin, measured on an H100)
    precision = "double" if export.get("dtype", "float32") == "float64" else "single"
    return reference, evaluate(with_force(topology, make_force(backend, "cuda"), box_nm), positions, "CUDA",
                               {"Precision": precision})


def force_maker(model, target, **kwargs):
    from schnet_md.export import create_python_force, create_torch_force

    def make(backend, device):
        if backend == "torch":
            return create_torch_force(model, target, **kwargs)
        return create_python_force(model, target, device=device, **kwargs)
    return make


@pytest.mark.parametrize("backend", ["torch", "python"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cuda_platform_equals_cpu_for_a_shipped_molecule(dtype, backend):
    skip_unless_runs(backend)
    from schnet_md.structures import read_structure

    s = read_structure(SYSTEMS / "aspirin" / "aspirin.pdb")
    (e_cpu, f_cpu), (e_gpu, f_gpu) = cpu_and_cuda(backend, force_maker("aspirin", s.topology, dtype=dtype),
                                                  s.topology, s.positions_nm, model="aspirin", dtype=dtype)
    tol = 1e-5 if dtype == "float32" else 1e-10
    assert e_gpu == pytest.approx(e_cpu, rel=tol)
    np.testing.assert_allclose(f_gpu, f_cpu, rtol=1e-3 if dtype == "float32" else 1e-8,
                               atol=1e-2 if dtype == "float32" else 1e-7)


@pytest.mark.parametrize("backend", ["torch", "python"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cuda_platform_equals_cpu_for_a_water_box_with_the_cell_list(dtype, backend):
    skip_unless_runs(backend)
    from schnet_md.bench import water_box

    topology, positions = water_box(1500)
    box = np.array(topology.getPeriodicBoxVectors().value_in_unit(unit.nanometer))
    model = random_model("schnet2018", elements=(1, 8), n_features=32, n_interactions=3)
    make = force_maker(model, topology, positions=positions, dtype=dtype, neighbor_list="cells")
    (e_cpu, f_cpu), (e_gpu, f_gpu) = cpu_and_cuda(backend, make, topology, positions, box, model=model, dtype=dtype,
                                                  neighbor_list="cells")
    assert e_gpu == pytest.approx(e_cpu, rel=1e-5 if dtype == "float32" else 1e-10)
    np.testing.assert_allclose(f_gpu, f_cpu, rtol=1e-3, atol=1e-2 if dtype == "float32" else 1e-7)


def test_cuda_graphs_give_the_same_trajectory():
    skip_unless_runs("torch")
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


def water_box_modules(fused_model: bool = False):
    """A 1.5k-atom water box, a small random schnet2018 (float32), its exported TorchScript module and the same
    module in eager form (with the Triton CFConv if fused_model), both on the GPU, and positions/box there."""
    import schnet_md.fused as fused
    from schnet_md.bench import water_box_arrays
    from schnet_md.export import build_module

    z, positions, box = water_box_arrays(1500)
    model = random_model("schnet2018", elements=(1, 8), n_features=32, n_interactions=2, dtype=torch.float32)
    kwargs = dict(periodic=True, box_nm=box, positions_nm=positions, neighbor_list="cells", check_errors=False)
    scripted = build_module(model, z, **kwargs)[0].cuda()
    eager = build_module(model, z, script=False, **kwargs)[0]
    if fused_model:
        eager.model = fused.FusedSchNet(eager.model)
    x = torch.as_tensor(positions, dtype=torch.float32, device="cuda").requires_grad_(True)
    b = torch.as_tensor(box, dtype=torch.float32, device="cuda")
    return scripted, eager.cuda(), x, b


def test_fused_module_equals_torchscript_on_cuda():
    """torch.compile (inductor) fuses the CFConv's elementwise passes, gathers and scatters into Triton
    kernels; they must give the exported TorchScript module's energy and forces."""
    scripted, eager, x, b = water_box_modules()
    fused = torch.compile(eager, fullgraph=True)
    e_ref = scripted(x, b)
    (f_ref,) = torch.autograd.grad(e_ref, x)
    e_fused = fused(x, b)
    (f_fused,) = torch.autograd.grad(e_fused, x)
    assert float(e_fused) == pytest.approx(float(e_ref), rel=1e-5)
    torch.testing.assert_close(f_fused, f_ref, rtol=1e-3, atol=1e-2)


def test_overflow_still_reaches_the_user_on_cuda():
    from schnet_md.bench import water_box_arrays
    from schnet_md.export import build_module

    z, positions, box = water_box_arrays(1500)
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


@pytest.mark.parametrize("precision", ["ieee", "tf32"])
def test_triton_cfconv_equals_torchscript_on_cuda(precision):
    """The hand-fused CFConv (schnet_md.fused), compiled by Triton for the GPU, against the exported TorchScript
    module: float32 products to 1e-5, TF32 (tensor cores, 10-bit mantissa) to the looser tolerance it allows."""
    import schnet_md.fused as fused

    scripted, eager, x, b = water_box_modules(fused_model=True)
    e_ref = scripted(x, b)
    (f_ref,) = torch.autograd.grad(e_ref, x)
    default, fused.DOT_PRECISION = fused.DOT_PRECISION, precision
    try:
        e_fused = eager(x, b)
        (f_fused,) = torch.autograd.grad(e_fused, x)
    finally:
        fused.DOT_PRECISION = default
    tol = 1e-5 if precision == "ieee" else 1e-3
    assert float(e_fused) == pytest.approx(float(e_ref), rel=tol)
    torch.testing.assert_close(f_fused, f_ref, rtol=10 * tol, atol=100 * tol * float(f_ref.abs().max()))
