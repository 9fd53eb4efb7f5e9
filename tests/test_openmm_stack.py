"""The SchNet TorchForce in everyday OpenMM workflows: XML serialisation, copying, cloning, nesting in a
CustomCVForce, metadynamics and openmm-ml's interpolating ML/MM. With OpenMM and openmm-torch built for
different C++ ABIs each of these segfaults, so every test runs in a child process (`isolated`): a crash is
a failing test that names the signal."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import openmm
import openmm.app as app
from openmm import unit

from conftest import ROOT, SYSTEMS, isolated, random_model
from schnet_md.export import create_torch_force, openmm_torch
from schnet_md.modelfile import save_model
from schnet_md.structures import read_structure

KJ = unit.kilojoule_per_mole
KJ_NM = KJ / unit.nanometer


def particle_system(topology) -> openmm.System:
    system = openmm.System()
    for atom in topology.atoms():
        system.addParticle(atom.element.mass)
    return system


def evaluate(system, positions, platform="Reference", parameters=None):
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName(platform))
    context.setPositions(positions)
    for name, value in (parameters or {}).items():
        context.setParameter(name, value)
    state = context.getState(getEnergy=True, getForces=True)
    return state.getPotentialEnergy().value_in_unit(KJ), state.getForces(asNumpy=True).value_in_unit(KJ_NM)


@pytest.fixture
def ethanol_system():
    s = read_structure(SYSTEMS / "ethanol" / "ethanol.pdb")
    system = particle_system(s.topology)
    system.addForce(create_torch_force("ethanol", s.topology))
    return system, s.positions_nm


@isolated
@pytest.mark.parametrize("platform", ["Reference", "CPU"])
def test_xml_round_trip_of_a_system_gives_identical_energy_and_forces(ethanol_system, tmp_path, platform):
    system, positions = ethanol_system
    e, f = evaluate(system, positions, platform)
    (tmp_path / "system.xml").write_text(openmm.XmlSerializer.serialize(system))
    loaded = openmm.XmlSerializer.deserialize((tmp_path / "system.xml").read_text())
    assert loaded.getNumForces() == 1 and "TorchForce" in openmm.XmlSerializer.serialize(loaded)
    e2, f2 = evaluate(loaded, positions, platform)
    assert e2 == e
    np.testing.assert_array_equal(f2, f)


@isolated
def test_deepcopy_and_clone_give_the_same_force(ethanol_system):
    system, positions = ethanol_system
    e, f = evaluate(system, positions)
    e_copy, f_copy = evaluate(copy.deepcopy(system), positions)
    assert e_copy == e
    np.testing.assert_array_equal(f_copy, f)
    clone = openmm.XmlSerializer.clone(system.getForce(0))
    only = openmm.System()
    for k in range(system.getNumParticles()):
        only.addParticle(system.getParticleMass(k))
    only.addForce(clone)
    e_clone, f_clone = evaluate(only, positions)
    assert e_clone == e
    np.testing.assert_array_equal(f_clone, f)


@isolated
@pytest.mark.parametrize("platform", ["Reference", "CPU"])
def test_torchforce_inside_a_customcvforce_reproduces_the_bare_force(ethanol_system, platform):
    system, positions = ethanol_system
    e, f = evaluate(system, positions, platform)
    s = read_structure(SYSTEMS / "ethanol" / "ethanol.pdb")
    for expression, factor in (("schnet", 1.0), ("2*schnet", 2.0)):
        cv = openmm.CustomCVForce(expression)
        cv.addCollectiveVariable("schnet", create_torch_force("ethanol", s.topology))
        nested = particle_system(s.topology)
        nested.addForce(cv)
        e_cv, f_cv = evaluate(nested, positions, platform)
        assert e_cv == pytest.approx(factor * e, rel=1e-12, abs=1e-9)
        np.testing.assert_allclose(f_cv, factor * f, rtol=1e-6, atol=1e-6)
        # and the nested force survives serialisation
        e_xml, _ = evaluate(openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(nested)), positions, platform)
        assert e_xml == pytest.approx(e_cv, rel=1e-12, abs=1e-9)


def phi_torsion(topology) -> openmm.CustomTorsionForce:
    """Backbone phi (C(ACE)-N-CA-C of alanine) as a torsion CV."""
    atoms = {(a.residue.name, a.name): a.index for a in topology.atoms()}
    force = openmm.CustomTorsionForce("theta")
    force.addTorsion(atoms[("ACE", "C")], atoms[("ALA", "N")], atoms[("ALA", "CA")], atoms[("ALA", "C")], [])
    return force


@isolated
def test_metadynamics_biases_alanine_dipeptide_phi_with_the_shipped_model(tmp_path):
    """app.Metadynamics (a CustomCVForce of its own) on phi, with the SchNet force nested in a CustomCVForce."""
    s = read_structure(SYSTEMS / "alanine-dipeptide" / "alanine-dipeptide.pdb")
    system = particle_system(s.topology)
    cv = openmm.CustomCVForce("schnet")
    cv.addCollectiveVariable("schnet", create_torch_force("alanine-dipeptide", s.topology))
    system.addForce(cv)
    phi = app.BiasVariable(phi_torsion(s.topology), -math.pi, math.pi, 0.35, periodic=True, gridWidth=36)
    meta = app.Metadynamics(system, [phi], 300.0 * unit.kelvin, biasFactor=5.0, height=1.0 * KJ, frequency=50,
                            saveFrequency=100, biasDir=str(tmp_path))
    integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1 / unit.picosecond, 0.5 * unit.femtosecond)
    integrator.setRandomNumberSeed(3)
    simulation = app.Simulation(s.topology, system, integrator, openmm.Platform.getPlatformByName("CPU"))
    simulation.context.setPositions(s.openmm_positions())
    simulation.context.setVelocitiesToTemperature(300 * unit.kelvin, 3)
    e0 = simulation.context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(KJ)
    meta.step(simulation, 300)
    free_energy = np.asarray(meta.getFreeEnergy().value_in_unit(KJ))
    assert free_energy.shape == (36,) and np.isfinite(free_energy).all()
    assert free_energy.max() - free_energy.min() > 1.0          # six hills of 1 kJ/mol were deposited
    assert list(tmp_path.glob("bias_*.npy")), "the bias was not saved to biasDir"
    state = simulation.context.getState(getEnergy=True, getPositions=True)
    positions = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    assert np.isfinite(positions).all()
    # the molecule is intact: every bond of the input within 20% of its length
    bonds = [(a.index, b.index) for a, b in s.topology.bonds()]
    d0 = np.array([np.linalg.norm(s.positions_nm[i] - s.positions_nm[j]) for i, j in bonds])
    d = np.array([np.linalg.norm(positions[i] - positions[j]) for i, j in bonds])
    assert np.all(np.abs(d / d0 - 1) < 0.2)
    (phi_now,) = meta.getCollectiveVariables(simulation)   # radians
    assert -math.pi <= phi_now <= math.pi
    # the potential is still the SchNet energy near the input's (plus a few kJ/mol of bias), not garbage
    assert abs(state.getPotentialEnergy().value_in_unit(KJ) - e0) < 200.0


@isolated
def test_openmmml_interpolation_uses_the_torchforce_and_serializes(tmp_path):
    from openmmml import MLPotential

    from test_openmmml import ethanol_with_argon

    model_file = save_model(random_model(elements=(1, 6, 8, 18), dtype=torch.float32), tmp_path / "model.pt")
    n, z, positions, topology, mm = ethanol_with_argon()
    mixed = MLPotential("schnet", modelPath=str(model_file)).createMixedSystem(topology, mm, list(range(n)),
                                                                              interpolate=True)
    xml = openmm.XmlSerializer.serialize(mixed)
    assert "TorchForce" in xml and "PythonForce" not in xml, "the default backend must be the TorchForce"
    (tmp_path / "mixed.xml").write_text(xml)
    loaded = openmm.XmlSerializer.deserialize((tmp_path / "mixed.xml").read_text())
    energies = []
    for lam in (0.0, 0.5, 1.0):
        e, f = evaluate(mixed, positions, parameters={"lambda_interpolate": lam})
        e_loaded, f_loaded = evaluate(loaded, positions, parameters={"lambda_interpolate": lam})
        assert e_loaded == pytest.approx(e, rel=1e-12, abs=1e-9)
        np.testing.assert_allclose(f_loaded, f, rtol=1e-9, atol=1e-9)
        energies.append(e)
    e0, e_half, e1 = energies
    assert e0 != pytest.approx(e1)
    assert e_half == pytest.approx(0.5 * (e0 + e1), rel=1e-6, abs=1e-3)
    e_mm, _ = evaluate(mm, positions)
    assert e0 == pytest.approx(e_mm, rel=1e-6, abs=1e-3)
    # the PythonForce backend, an explicit option, gives the same energies
    python = MLPotential("schnet", modelPath=str(model_file), backend="python").createMixedSystem(
        topology, mm, list(range(n)), interpolate=True)
    assert "PythonForce" in openmm.XmlSerializer.serialize(python)
    for lam, e in zip((0.0, 0.5, 1.0), energies):
        assert evaluate(python, positions, parameters={"lambda_interpolate": lam})[0] == pytest.approx(e, rel=1e-6)


def test_openmm_torch_is_imported_without_the_simtk_notice(capfd):
    import subprocess
    import sys

    code = "import schnet_md.export as e; e.openmm_torch(); print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "simtk" not in proc.stderr + proc.stdout
    assert proc.stdout.strip() == "ok"


def test_other_root_logger_warnings_still_show():
    import subprocess
    import sys

    code = ("import logging, schnet_md.export as e; e.openmm_torch(); "
            "logging.getLogger().warning('Warning: something else')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert "something else" in proc.stderr


def test_a_plain_openmm_script_imports_openmm_before_torch():
    """A user's script imports openmm and openmmtorch first, torch never (openmm-torch's wheel needs torch's
    libraries loaded: the environment's start-up hook imports torch first)."""
    import subprocess
    import sys

    code = """
import numpy as np
import openmm
import openmmtorch
system = openmm.System()
for _ in range(3):
    system.addParticle(1.0)
system.addForce(openmmtorch.TorchForce(FILE))
context = openmm.Context(system, openmm.VerletIntegrator(1.0), openmm.Platform.getPlatformByName('CPU'))
context.setPositions(np.eye(3))
print(context.getState(getEnergy=True).getPotentialEnergy()._value)
"""
    class Square(torch.nn.Module):
        def forward(self, positions):
            return (positions ** 2).sum()

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/square.pt"
        torch.jit.script(Square()).save(path)
        proc = subprocess.run([sys.executable, "-c", code.replace("FILE", repr(path))], capture_output=True,
                              text=True, cwd=tmp, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout.strip().splitlines()[-1]) == pytest.approx(3.0)


def test_reading_a_dcd_prints_no_plugin_chatter_and_keeps_other_output(tmp_path):
    import subprocess
    import sys

    s = read_structure(SYSTEMS / "ethanol" / "ethanol.pdb")
    with open(tmp_path / "t.dcd", "wb") as fh:
        dcd = app.DCDFile(fh, s.topology, 0.001)
        for _ in range(3):
            dcd.writeModel(s.positions_nm * unit.nanometer)
    (tmp_path / "t.pdb").write_text(open(SYSTEMS / "ethanol" / "ethanol.pdb").read())
    code = f"""
import ctypes, mdtraj
from schnet_md.analysis.load import read_trajectory, _without_dcd_chatter
print('python before')
t = read_trajectory({str(tmp_path / 't.dcd')!r}, {str(tmp_path / 't.pdb')!r})
print('frames', t.n_frames)
with _without_dcd_chatter():
    ctypes.CDLL(None).printf(b"C output kept\\n")
plain = mdtraj.load({str(tmp_path / 't.dcd')!r}, top={str(tmp_path / 't.pdb')!r})   # mdtraj itself still talks
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:3] == ["python before", "frames 3", "C output kept"]
    assert any("dcdplugin)" in line for line in lines[3:]), "the control (plain mdtraj) should print the chatter"


def test_commands_print_no_simtk_or_dcd_noise(tmp_path):
    """A user's session: simulate, then analyze; neither prints openmm-torch's or mdtraj's chatter."""
    import subprocess
    import sys

    def run(*args):
        proc = subprocess.run([sys.executable, "-m", "schnet_md.cli", *args], capture_output=True, text=True,
                              cwd=tmp_path, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout + proc.stderr

    output = run("simulate", str(SYSTEMS / "ethanol" / "ethanol.pdb"), "--model", "ethanol", "--out", "md",
                 "--steps", "40", "--report-interval", "10")
    output += run("analyze", "md", "--out", "analysis")
    assert "trajectory:" in output and "report:" in output
    assert "simtk" not in output and "dcdplugin" not in output
