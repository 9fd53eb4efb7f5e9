"""Tabulated filters (schnet_md/tabulated.py): the spline tables against the filter network, energies and forces
of the tabulated module against the exact one (a molecule without cutoff, a periodic water box with the cell
list), forces = -dE/dr of the tabulated module by float64 finite differences, and the same through OpenMM
(TorchForce and PythonForce) and the CLI (OpenMM and LAMMPS exports; LAMMPS itself: tests/test_lammps.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import ROOT, random_model
from schnet_md.export import build_module, inference_copy
from schnet_md.tabulated import TabulatedSchNet, evaluate, exact_filters, filter_extent


def spline_filters(tabulated: TabulatedSchNet, distances: torch.Tensor):
    x = distances / tabulated.spacing
    k = torch.clamp(torch.floor(x), max=float(tabulated.n_intervals - 1)).long()
    t = torch.clamp(x - k, max=1.0)
    return [evaluate(block.coefficients, k, t) for block in tabulated.interactions]


@pytest.mark.parametrize("preset, overrides", [("schnet2017", dict(n_features=16, n_interactions=2)),
                                               ("schnet2018", dict(n_features=32, n_interactions=2, cutoff=4.0))])
def test_tables_follow_the_filter_network_and_stay_constant_beyond(preset, overrides):
    model = inference_copy(random_model(preset, elements=(1, 6, 8), dtype=torch.float64, **overrides))
    tabulated = TabulatedSchNet(model)
    assert tabulated.max_relative_error <= 1e-6
    extent = filter_extent(model)
    inside = torch.rand(4000, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * extent
    for spline, exact in zip(spline_filters(tabulated, inside), exact_filters(model, inside)):
        assert float((spline - exact).abs().max()) <= 2e-6 * float(exact.abs().max())
    beyond = torch.tensor([extent + 0.3, extent + 7.0, 3 * extent], dtype=torch.float64)
    for spline, exact in zip(spline_filters(tabulated, beyond), exact_filters(model, beyond)):
        torch.testing.assert_close(spline, exact, rtol=1e-9, atol=1e-12)   # zero with a cutoff, clamped without


def exact_and_tabulated(model, z, periodic=False, box_nm=None, positions_nm=None, dtype="float64", **options):
    return [build_module(model, z, periodic=periodic, box_nm=box_nm, positions_nm=positions_nm, dtype=dtype,
                         tabulate=tabulate, **options)[0] for tabulate in (False, True)]


def energy_forces(module, positions, box=None, dtype=torch.float64):
    r = torch.as_tensor(positions, dtype=dtype).clone().requires_grad_(True)
    b = None if box is None else torch.as_tensor(box, dtype=dtype)
    energy = module(r, b)
    (grad,) = torch.autograd.grad(energy, r)
    return float(energy.detach()), -grad.double()


def test_tabulated_ethanol_matches_the_shipped_model(ethanol):
    z, positions = ethanol
    exact, tabulated = exact_and_tabulated("ethanol", z.tolist())
    rng = np.random.default_rng(1)
    for frame in range(3):   # the shipped geometry and two distorted ones
        x = positions.numpy() / 10.0 + (rng.normal(scale=0.008, size=positions.shape) if frame else 0.0)
        e_exact, f_exact = energy_forces(exact, x)
        e_tab, f_tab = energy_forces(tabulated, x)
        assert abs(e_tab - e_exact) < 1e-3          # kJ/mol, of ~4e5
        assert float((f_tab - f_exact).abs().max()) < 2e-4 * float(f_exact.abs().max())


def test_tabulated_water_box_through_the_cell_list():
    from schnet_md.bench import water_box_arrays

    z, positions, box = water_box_arrays(300)
    model = random_model("schnet2018", elements=(1, 8), dtype=torch.float64, n_features=16, n_interactions=2,
                         cutoff=3.0)
    exact, tabulated = exact_and_tabulated(model, z, periodic=True, box_nm=box, positions_nm=positions,
                                           neighbor_list="cells")
    e_exact, f_exact = energy_forces(exact, positions, box)
    e_tab, f_tab = energy_forces(tabulated, positions, box)
    assert abs(e_tab - e_exact) < 1e-5 * abs(e_exact)
    assert float((f_tab - f_exact).abs().max()) < 2e-4 * float(f_exact.abs().max())


def test_tabulated_forces_are_minus_the_gradient(ethanol):
    """Central finite differences of the tabulated module's own energy (float64): the spline is C1, so its
    forces are exact gradients of the energy it returns (what keeps NVE energy conserved)."""
    z, positions = ethanol
    _, tabulated = exact_and_tabulated("ethanol", z.tolist())
    x = positions.numpy() / 10.0
    _, forces = energy_forces(tabulated, x)
    step = 1e-6   # nm
    for atom, axis in [(0, 0), (2, 1), (5, 2), (8, 0)]:
        plus, minus = x.copy(), x.copy()
        plus[atom, axis] += step
        minus[atom, axis] -= step
        numeric = -(energy_forces(tabulated, plus)[0] - energy_forces(tabulated, minus)[0]) / (2 * step)
        assert numeric == pytest.approx(float(forces[atom, axis]), rel=1e-5, abs=1e-3)


def test_openmm_forces_with_tabulated_filters(ethanol):
    """A TorchForce and a PythonForce built with tabulate=True, on OpenMM's Reference platform, against the exact
    exported module called directly (float32, as users run it)."""
    import openmm

    from schnet_md.export import create_python_force, create_torch_force

    z, positions = ethanol
    x = positions.numpy() / 10.0
    exact, _ = build_module("ethanol", z.tolist())
    e_ref, f_ref = energy_forces(exact, x, dtype=torch.float32)
    for make in (create_torch_force, create_python_force):
        system = openmm.System()
        for _ in z:
            system.addParticle(12.0)
        force = make("ethanol", z.tolist(), tabulate=True)
        system.addForce(force)
        context = openmm.Context(system, openmm.VerletIntegrator(0.0005), openmm.Platform.getPlatformByName("Reference"))
        context.setPositions(x)
        state = context.getState(getEnergy=True, getForces=True)
        assert state.getPotentialEnergy()._value == pytest.approx(e_ref, abs=2e-2), make.__name__
        np.testing.assert_allclose(state.getForces(asNumpy=True)._value, f_ref.numpy(), rtol=0,
                                   atol=1e-3 * float(f_ref.abs().max()), err_msg=make.__name__)


def test_export_cli_records_the_tables(tmp_path):
    from schnet_md.cli import main
    from schnet_md.export import load_exported

    out = tmp_path / "ethanol-tabulated.pt"
    assert main(["export", "ethanol", "--structure", str(ROOT / "systems" / "ethanol" / "ethanol.pdb"), "--tabulate",
                 "--out", str(out)]) == 0
    module, metadata = load_exported(out)
    assert metadata["filters"]["kind"] == "tabulated"
    assert metadata["filters"]["max_relative_error"] <= 1e-6
    assert metadata["filters"]["spacing_angstrom"] > 0
    assert main(["export", "ethanol", "--engine", "lammps", "--tabulate", "--out", str(tmp_path / "l.pt")]) == 0
    files = {"schnet_md.json": ""}
    torch.jit.load(str(tmp_path / "l.pt"), _extra_files=files)
    assert json.loads(files["schnet_md.json"])["filters"]["kind"] == "tabulated"


def test_tables_that_cannot_meet_the_tolerance_are_refused():
    from schnet_md.tabulated import build_tables

    model = inference_copy(random_model("schnet2018", elements=(1, 8), dtype=torch.float64, n_features=16,
                                        n_interactions=1))
    with pytest.raises(ValueError, match="larger tolerance"):
        build_tables(model, tolerance=1e-30)
