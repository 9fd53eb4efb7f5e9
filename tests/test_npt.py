"""Boxes that change: the cell list holds every box a barostat reaches (shrinking and growing), a graph-safe
export states the range it holds, `simulate --pressure` runs NPT, and a triclinic box moves under
MonteCarloFlexibleBarostat in a plain OpenMM script."""

from __future__ import annotations

import csv

import numpy as np
import openmm
import openmm.app as app
import pytest
import torch
from openmm import unit

from conftest import random_model
from schnet_md.bench import water_box
from schnet_md.export import build_module, create_torch_force, load_torch_force
from schnet_md.modelfile import save_model
from schnet_md.structures import write_pdb


@pytest.fixture(scope="module")
def water():
    """A 2 nm TIP3P water box (~800 atoms: four 5 Å cells per side) and a gentle random schnet2018 model."""
    topology, positions = water_box(800)
    model = random_model("schnet2018", elements=(1, 6, 8), dtype=torch.float32, n_features=16, n_interactions=2)
    with torch.no_grad():
        model.readout.scale.fill_(0.05)
    return topology, positions, model


def _system(topology, force):
    system = openmm.System()
    for atom in topology.atoms():
        system.addParticle(atom.element.mass)
    system.setDefaultPeriodicBoxVectors(*topology.getPeriodicBoxVectors())
    system.addForce(force)
    return system


def _energy_forces(system, positions_nm, box_nm):
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("CPU"))
    context.setPeriodicBoxVectors(*[openmm.Vec3(*row) for row in box_nm])
    context.setPositions(positions_nm)
    state = context.getState(getEnergy=True, getForces=True)
    return (state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole),
            state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer))


def test_the_cell_list_holds_boxes_that_shrink_and_grow(water):
    """One export, the box scaled 0.95-1.05 per side (the issue's 0.9999 included): energies and forces equal a
    fresh export at that box and the all-pairs minimum image."""
    topology, positions, model = water
    box = np.array(topology.getPeriodicBoxVectors().value_in_unit(unit.nanometer))
    force = create_torch_force(model, topology, neighbor_list="cells", positions=positions)
    system = _system(topology, force)
    for scale in (0.9999, 0.95, 1.05):
        r, b = positions * scale, box * scale
        energy, forces = _energy_forces(system, r, b)
        for neighbor_list in ("cells", "all_pairs"):
            fresh = _system(topology, create_torch_force(model, topology, neighbor_list=neighbor_list, positions=r,
                                                         box=b))
            e_ref, f_ref = _energy_forces(fresh, r, b)
            assert energy == pytest.approx(e_ref, rel=1e-6, abs=1e-3)
            np.testing.assert_allclose(forces, f_ref, rtol=1e-4, atol=1e-3)


def test_a_box_shrunk_below_three_cutoffs_falls_back_to_all_pairs(water):
    topology, positions, model = water
    box = np.array(topology.getPeriodicBoxVectors().value_in_unit(unit.nanometer))
    system = _system(topology, create_torch_force(model, topology, neighbor_list="cells", positions=positions))
    scale = 1.45 / box[0, 0]           # 14.5 Å: under three 5 Å cutoffs, over two
    energy, forces = _energy_forces(system, positions * scale, box * scale)
    fresh = _system(topology, create_torch_force(model, topology, neighbor_list="all_pairs"))
    e_ref, f_ref = _energy_forces(fresh, positions * scale, box * scale)
    assert energy == pytest.approx(e_ref, rel=1e-6, abs=1e-3)
    np.testing.assert_allclose(forces, f_ref, rtol=1e-4, atol=1e-3)


def test_a_graph_safe_export_states_the_box_range_it_holds(water):
    topology, positions, model = water
    box_nm = np.array(topology.getPeriodicBoxVectors().value_in_unit(unit.nanometer))
    z = [a.element.atomic_number for a in topology.atoms()]
    checked, _ = build_module(model, z, periodic=True, neighbor_list="cells", box_nm=box_nm, positions_nm=positions)
    graph_safe, metadata = build_module(model, z, periodic=True, neighbor_list="cells", box_nm=box_nm,
                                        positions_nm=positions, check_errors=False, box_shrink=0.08)
    hold = metadata["cells_hold"]
    assert hold["min_box_heights_angstrom"] == [15.0, 15.0, 15.0] and "box_shrink" in hold["beyond"]
    for scale, inside in ((0.93, True), (1.1, True), (0.7, False)):
        r = torch.tensor(positions * scale)
        b = torch.tensor(box_nm * scale)
        energy = float(graph_safe(r, b))
        if inside:
            assert energy == pytest.approx(float(checked(r, b)), rel=1e-6)
        else:
            assert np.isnan(energy)           # beyond the stated range: NaN, as the graph-safe mode promises


def test_a_periodic_export_loads_as_documented_and_says_how_when_not(tmp_path, water, capsys):
    from schnet_md.cli import main

    topology, positions, model = water
    structure = tmp_path / "water.pdb"
    write_pdb(topology, positions, structure)
    model_file = save_model(model, tmp_path / "model.pt")
    assert main(["export", str(model_file), "--structure", str(structure), "--out", str(tmp_path / "f.pt")]) == 0
    assert "load_torch_force" in capsys.readouterr().out
    import openmmtorch

    system = _system(topology, openmmtorch.TorchForce(str(tmp_path / "f.pt")))     # the periodic flag forgotten
    box = np.array(topology.getPeriodicBoxVectors().value_in_unit(unit.nanometer))
    with pytest.raises(Exception, match="setUsesPeriodicBoundaryConditions"):
        _energy_forces(system, positions, box)
    loaded = load_torch_force(tmp_path / "f.pt")
    assert loaded.usesPeriodicBoundaryConditions()
    energy, _ = _energy_forces(_system(topology, loaded), positions, box)
    assert np.isfinite(energy)


def test_simulate_pressure_runs_npt_and_resumes(tmp_path, water):
    from schnet_md.cli import main
    from schnet_md.simulate import SimulationSettings, run_simulation

    from conftest import SYSTEMS

    topology, positions = water_box(350)          # 1.5 nm: three cells per side, the smallest the cell list takes
    model = random_model("schnet2018", elements=(1, 6, 8), dtype=torch.float32, n_features=8, n_interactions=1)
    with torch.no_grad():
        model.readout.scale.fill_(0.05)
    structure = tmp_path / "water.pdb"
    write_pdb(topology, positions, structure)
    model_file = save_model(model, tmp_path / "model.pt")
    out = tmp_path / "npt"
    args = ["simulate", str(structure), "--model", str(model_file), "--out", str(out), "--platform", "CPU",
            "--steps", "20", "--timestep", "0.5", "--temperature", "300", "--pressure", "1", "--barostat-interval",
            "1", "--report-interval", "5", "--seed", "7", "--no-guard"]
    assert main(args) == 0
    assert main(["simulate", "--resume", str(out), "--steps", "10"]) == 0
    with open(out / "state.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [5, 10, 15, 20, 25, 30]
    volumes = [float(r["volume_nm3"]) for r in rows]
    assert len(set(volumes)) > 1                                   # the barostat moves the box
    mass_g = sum(a.element.mass.value_in_unit(unit.dalton) for a in topology.atoms()) / 6.02214076e23
    assert float(rows[0]["density_g_ml"]) == pytest.approx(mass_g / (volumes[0] * 1e-21), rel=1e-4)
    with pytest.raises(ValueError, match="needs a periodic system"):
        run_simulation(SYSTEMS / "ethanol" / "ethanol.pdb", model_file, tmp_path / "gas",
                       SimulationSettings(steps=10, pressure_bar=1.0, platform="CPU"), progress=False)


def test_a_triclinic_box_under_the_flexible_barostat(water):
    """A plain OpenMM script: triclinic box, MonteCarloFlexibleBarostat; after the box has moved, the force
    equals a fresh export at the final box."""
    topology, positions, _ = water
    model = random_model("schnet2018", elements=(1, 8), dtype=torch.float32, n_features=8, n_interactions=1)
    with torch.no_grad():
        model.readout.scale.fill_(0.05)
    edge = topology.getPeriodicBoxVectors()[0][0].value_in_unit(unit.nanometer)
    box = np.array([[edge, 0, 0], [0.3 * edge, edge, 0], [-0.2 * edge, 0.25 * edge, edge]])
    topology.setPeriodicBoxVectors([openmm.Vec3(*row) for row in box] * unit.nanometer)
    try:
        force = create_torch_force(model, topology, neighbor_list="cells", positions=positions)
        system = _system(topology, force)
        bonds = openmm.HarmonicBondForce()           # keeps each water whole for the barostat's molecule moves
        for bond in topology.bonds():
            bonds.addBond(bond[0].index, bond[1].index, 0.09572, 0.0)
        system.addForce(bonds)
        barostat = openmm.MonteCarloFlexibleBarostat(1.0 * unit.bar, 300 * unit.kelvin, 1)
        barostat.setRandomNumberSeed(3)
        system.addForce(barostat)
        integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1 / unit.picosecond, 0.0005 * unit.picosecond)
        integrator.setRandomNumberSeed(3)
        simulation = app.Simulation(topology, system, integrator, openmm.Platform.getPlatformByName("CPU"))
        simulation.context.setPositions(positions)
        simulation.step(12)
        state = simulation.context.getState(getPositions=True, getEnergy=True, getForces=True)
        final_box = state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(unit.nanometer)
        assert not np.allclose(final_box, box)                       # it moved, shape included
        r = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        fresh = _system(topology, create_torch_force(model, topology, neighbor_list="all_pairs"))
        e_ref, f_ref = _energy_forces(fresh, r, final_box)
        e, f = _energy_forces(_system(topology, create_torch_force(model, topology, neighbor_list="cells",
                                                                     positions=positions)), r, final_box)
        assert e == pytest.approx(e_ref, rel=1e-6, abs=1e-3)
        np.testing.assert_allclose(f, f_ref, rtol=1e-4, atol=1e-3)
    finally:
        topology.setPeriodicBoxVectors([openmm.Vec3(edge, 0, 0), openmm.Vec3(0, edge, 0), openmm.Vec3(0, 0, edge)]
                                       * unit.nanometer)
