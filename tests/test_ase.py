"""ASE calculator: equals the model to float precision; stress is the strain derivative; any cell works."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import SYSTEMS, random_model, random_rotation
from schnet_md.model import energy_and_forces
from schnet_md.neighbors import reduced_cell

ase = pytest.importorskip("ase")
from ase import Atoms  # noqa: E402
from ase.optimize import BFGS  # noqa: E402

from schnet_md.ase import SchNetCalculator  # noqa: E402

EV_PER_KCAL = 4.184 / 96.48533212   # kJ/mol per kcal/mol over kJ/mol per eV (CODATA 2018)


def periodic_atoms(cell, n=16, seed=0):
    rng = np.random.default_rng(seed)
    return Atoms(numbers=rng.choice([1, 8], size=n), scaled_positions=rng.random((n, 3)), cell=cell, pbc=True)


def cutoff_model():
    return random_model("schnet2018", elements=(1, 8), n_features=16, n_interactions=2, cutoff=4.0)


def test_molecule_energy_and_forces_equal_the_model(ethanol):
    z, r = ethanol
    model = random_model()
    atoms = Atoms(numbers=z.numpy(), positions=r.numpy())
    atoms.calc = SchNetCalculator(model)
    e, f = energy_and_forces(model, z, r)
    assert atoms.get_potential_energy() == pytest.approx(float(e) * EV_PER_KCAL, rel=1e-9)
    np.testing.assert_allclose(atoms.get_forces(), f.numpy() * EV_PER_KCAL, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("cell", [np.diag([10.0, 11.0, 12.0]),
                                  [[10.0, 0, 0], [3.0, 10.0, 0], [-2.0, 4.0, 11.0]],       # reduced triclinic
                                  [[13.0, 1.3, 0.6], [9.8, 11.7, 1.3], [1.3, -7.8, 13.0]]])  # general, skewed
def test_periodic_energy_forces_and_stress(cell):
    model = cutoff_model()
    atoms = periodic_atoms(cell)
    atoms.calc = SchNetCalculator(model)
    e = atoms.get_potential_energy()
    # the same system described by the reduced, rotated cell directly through the model
    rotation, lattice, reduced = reduced_cell(atoms.cell.array)
    z = torch.as_tensor(atoms.numbers)
    pos = torch.as_tensor(atoms.positions @ rotation)
    e_ref, f_ref = energy_and_forces(model, z, pos, torch.as_tensor(reduced))
    assert e == pytest.approx(float(e_ref) * EV_PER_KCAL, rel=1e-9)
    np.testing.assert_allclose(atoms.get_forces(), f_ref.numpy() @ rotation.T * EV_PER_KCAL, rtol=1e-9, atol=1e-10)
    # stress = (1/V) dE/d(strain), by central differences of the energy under symmetric strains
    stress = atoms.get_stress(voigt=False)
    volume = atoms.get_volume()
    h = 1e-5
    for i, j in [(0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1)]:
        eps = np.zeros((3, 3))
        eps[i, j] = eps[j, i] = h if i != j else h
        values = []
        for sign in (1, -1):
            strained = atoms.copy()
            strained.calc = SchNetCalculator(model)
            deform = np.eye(3) + sign * (eps if i == j else eps / 2)
            strained.set_cell(atoms.cell.array @ deform, scale_atoms=True)
            values.append(strained.get_potential_energy())
        fd = (values[0] - values[1]) / (2 * h) / volume
        assert stress[i, j] == pytest.approx(fd, rel=1e-5, abs=1e-9), (i, j)


def test_rotating_a_general_cell_changes_nothing():
    model = cutoff_model()
    cell = np.array([[13.0, 1.3, 0.6], [9.8, 11.7, 1.3], [1.3, -7.8, 13.0]])
    atoms = periodic_atoms(cell, seed=2)
    atoms.calc = SchNetCalculator(model)
    e, f, s = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress(voigt=False)
    rot = random_rotation(np.random.default_rng(5)).numpy()
    turned = Atoms(numbers=atoms.numbers, positions=atoms.positions @ rot.T, cell=cell @ rot.T, pbc=True)
    turned.calc = SchNetCalculator(model)
    assert turned.get_potential_energy() == pytest.approx(e, rel=1e-10)
    np.testing.assert_allclose(turned.get_forces(), f @ rot.T, atol=1e-10)
    np.testing.assert_allclose(turned.get_stress(voigt=False), rot @ s @ rot.T, atol=1e-10)


def test_reduced_cell_is_the_same_lattice():
    cell = np.array([[10.0, 1.0, 0.5], [7.5, 9.0, 1.0], [1.0, -6.0, 10.0]])
    rotation, lattice, reduced = reduced_cell(cell)
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-12)
    assert abs(round(np.linalg.det(lattice))) == 1 and np.allclose(lattice, np.round(lattice))
    np.testing.assert_allclose(lattice @ cell @ rotation, reduced, atol=1e-12)
    assert reduced[0, 1] == pytest.approx(0, abs=1e-12) and reduced[0, 2] == pytest.approx(0, abs=1e-12)
    assert abs(reduced[1, 0]) <= reduced[0, 0] / 2 and abs(reduced[2, 1]) <= reduced[1, 1] / 2


def test_ase_optimiser_runs_with_the_shipped_model():
    from schnet_md.structures import read_structure

    s = read_structure(SYSTEMS / "ethanol" / "ethanol.pdb")
    atoms = Atoms(numbers=s.atomic_numbers, positions=s.positions_nm * 10)
    atoms.calc = SchNetCalculator("ethanol")
    e0 = atoms.get_potential_energy()
    BFGS(atoms, logfile=None).run(fmax=0.05, steps=200)
    assert atoms.get_potential_energy() < e0
    assert np.abs(atoms.get_forces()).max() < 0.05


def test_mixed_periodicity_is_refused():
    atoms = periodic_atoms(np.diag([10.0, 10.0, 10.0]))
    atoms.pbc = [True, True, False]
    atoms.calc = SchNetCalculator(cutoff_model())
    with pytest.raises(ValueError, match="periodic in all three directions or in none"):
        atoms.get_potential_energy()
