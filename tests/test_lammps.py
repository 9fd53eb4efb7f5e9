"""pair_style schnet (the compiled LAMMPS plugin), run as LAMMPS users run it: an input file, `lmp` under the
mpich wheel's mpirun on 1, 2 and 4 ranks. It must equal the model called directly (energy, forces, virial),
agree across rank counts to float64 rounding in both ghost modes, and refuse bad setups clearly."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from conftest import SYSTEMS, random_model
from schnet_md.lammps import export_lammps
from schnet_md.model import energy_forces_strain
from schnet_md.modelfile import save_model
from schnet_md.structures import read_structure
from schnet_md.units import energy_factor

lammps_plugin = pytest.importorskip("schnet_md_lammps")

# LAMMPS's own pressure conversion factors (force->nktv2p): virial (energy) / volume -> pressure
NKTV2P = {"metal": 1.6021765e6, "real": 68568.415}
ENERGY_UNIT = {"metal": "eV", "real": "kcal/mol"}


@pytest.fixture(scope="module")
def plugin():
    return lammps_plugin.build(quiet=True)   # compiles once per machine; a failure here is a real failure


def random_periodic_system(n=60, box=12.0, seed=1, min_distance=1.0):
    rng = np.random.default_rng(seed)
    points = []
    while len(points) < n:
        p = rng.random(3) * box
        if all(np.linalg.norm((p - q) - box * np.round((p - q) / box)) > min_distance for q in points):
            points.append(p)
    return rng.choice([1, 6, 8], size=n), np.array(points)


def small_model(n_interactions=3, cutoff=3.0):
    return random_model("schnet2018", elements=(1, 6, 8), n_features=16, n_interactions=n_interactions,
                        cutoff=cutoff, n_gaussians=12, energy_unit="kcal/mol")


INPUT = """units {units}
atom_style atomic
atom_modify map array {sort}
boundary {boundary}
newton {newton}
read_data system.data
pair_style schnet {settings}
pair_coeff * * {model} {elements}
compute virial all pressure NULL virial
compute pe_atom all pe/atom
compute pe_sum all reduce sum c_pe_atom
thermo_style custom step pe c_pe_sum c_virial[1] c_virial[2] c_virial[3] c_virial[4] c_virial[5] c_virial[6] vol
dump forces all custom {dump_every} forces.dump id type x y z fx fy fz
dump_modify forces sort id format float %.17g
{run}
print "RESULT $(pe:%.17g) $(c_pe_sum:%.17g) $(c_virial[1]:%.17g) $(c_virial[2]:%.17g) $(c_virial[3]:%.17g) $(c_virial[4]:%.17g) $(c_virial[5]:%.17g) $(c_virial[6]:%.17g) $(vol:%.17g)"
"""


def run_lammps(folder, model_file, z, positions, cell=None, units="metal", ranks=1, settings="ghost exchange",
               elements="H C O", newton="on", sort="", run="run 0", dump_every=1, check=True):
    """Write the data and input files, run LAMMPS; returns (energy, per-atom energy sum, virial [3, 3] in
    LAMMPS energy units, forces by atom id, last positions by atom id) or the failed process."""
    folder.mkdir(parents=True, exist_ok=True)
    lammps_plugin.write_data(folder / "system.data", z, positions, ["H", "C", "O"], cell)
    (folder / "in.test").write_text(INPUT.format(
        units=units, sort=sort, boundary="p p p" if cell is not None else "f f f", newton=newton, settings=settings,
        model=model_file, elements=elements, run=run, dump_every=dump_every))
    proc = lammps_plugin.run(["-in", "in.test", "-log", "none"], ranks=ranks, cwd=folder,
                             check=check, timeout=600)
    if not check:
        return proc
    fields = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")][-1].split()[1:]
    pe, pe_sum, pxx, pyy, pzz, pxy, pxz, pyz, volume = map(float, fields)
    virial = np.array([[pxx, pxy, pxz], [pxy, pyy, pyz], [pxz, pyz, pzz]]) * volume / NKTV2P[units]
    frames = (folder / "forces.dump").read_text().split("ITEM: TIMESTEP")[-1].splitlines()
    start = next(k for k, line in enumerate(frames) if line.startswith("ITEM: ATOMS")) + 1
    table = np.array([[float(v) for v in line.split()] for line in frames[start:] if line.strip()])
    table = table[np.argsort(table[:, 0])]
    return pe, pe_sum, virial, table[:, 5:8], table[:, 2:5]


def direct(model, z, positions, cell, units):
    """The model called directly, in LAMMPS units: energy, forces, virial W = -dE/d(strain)."""
    energy, forces, d_strain = energy_forces_strain(model, z, positions, cell)
    k = energy_factor(model.config.energy_unit, ENERGY_UNIT[units])
    return energy * k, forces * k, -d_strain * k


@pytest.fixture(scope="module")
def periodic_case(tmp_path_factory, plugin):
    folder = tmp_path_factory.mktemp("periodic")
    model = small_model()
    model_file = export_lammps(model, folder / "model-lammps.pt")
    z, positions = random_periodic_system()
    return model, model_file, z, positions


@pytest.mark.parametrize("cell", [np.diag([12.0, 12.0, 12.0]),
                                  np.array([[12.0, 0, 0], [3.0, 12.5, 0], [-2.0, 2.5, 13.0]])],
                         ids=["orthogonal", "triclinic"])
def test_periodic_box_equals_the_model(tmp_path, periodic_case, cell):
    model, model_file, z, positions = periodic_case
    positions = positions @ np.linalg.inv(np.diag([12.0] * 3)) @ cell   # the same fractional coordinates
    e, pe_sum, virial, forces, _ = run_lammps(tmp_path, model_file, z, positions, cell)
    e_ref, f_ref, w_ref = direct(model, z, positions, cell, "metal")
    assert e == pytest.approx(e_ref, rel=1e-12, abs=1e-10)
    assert pe_sum == pytest.approx(e, rel=1e-12, abs=1e-10)        # per-atom energies add up
    np.testing.assert_allclose(forces, f_ref, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(virial, w_ref, rtol=1e-6, atol=1e-7)   # thermo prints pressure to ~1e-7 of nktv2p


@pytest.mark.parametrize("settings", ["ghost exchange", "ghost deep"])
def test_ranks_agree_to_float64_rounding(tmp_path, periodic_case, settings):
    model, model_file, z, positions = periodic_case
    cell = np.diag([12.0, 12.0, 12.0])
    results = [run_lammps(tmp_path / f"np{n}", model_file, z, positions, cell, ranks=n, settings=settings)
               for n in (1, 2, 4)]
    e1, _, w1, f1, _ = results[0]
    for e, _, w, f, _ in results[1:]:
        assert e == pytest.approx(e1, rel=1e-13, abs=1e-12)
        np.testing.assert_allclose(f, f1, rtol=0, atol=1e-12)
        np.testing.assert_allclose(w, w1, rtol=1e-12, atol=1e-12)


PER_ATOM_VIRIAL = """compute stress_atom all stress/atom NULL pair
compute stress_sum all reduce sum c_stress_atom[1] c_stress_atom[2] c_stress_atom[3] c_stress_atom[4] c_stress_atom[5] c_stress_atom[6]
thermo_style custom step pe c_stress_sum[*]
run 0
print "PER_ATOM $(c_stress_sum[1]:%.17g) $(c_stress_sum[2]:%.17g) $(c_stress_sum[3]:%.17g) $(c_stress_sum[4]:%.17g) $(c_stress_sum[5]:%.17g) $(c_stress_sum[6]:%.17g)"
"""


@pytest.mark.parametrize("settings", ["ghost exchange", "ghost deep"])
def test_per_atom_virials_add_up_to_the_virial(tmp_path, periodic_case, settings):
    """compute stress/atom: each pair's virial -r (x) dE/dr goes half to each of its two atoms, so the per-atom
    virials add up to the model's virial, on 1 and 2 ranks in both ghost modes."""
    model, model_file, z, positions = periodic_case
    cell = np.diag([12.0, 12.0, 12.0])
    _, _, w_ref = direct(model, z, positions, cell, "metal")
    for ranks in (1, 2):
        proc = run_lammps(tmp_path / f"np{ranks}", model_file, z, positions, cell, ranks=ranks, settings=settings,
                          run=PER_ATOM_VIRIAL, check=False)
        assert proc.returncode == 0, lammps_plugin.lammps_error(proc.stdout + proc.stderr)
        line = next(line for line in proc.stdout.splitlines() if line.startswith("PER_ATOM"))
        xx, yy, zz, xy, xz, yz = (-float(v) / NKTV2P["metal"] for v in line.split()[1:])   # stress*volume -> -W
        summed = np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
        np.testing.assert_allclose(summed, w_ref, rtol=1e-9, atol=1e-9)


def test_both_ghost_modes_give_the_same_numbers(tmp_path, periodic_case):
    model, model_file, z, positions = periodic_case
    cell = np.diag([12.0, 12.0, 12.0])
    e_x, _, w_x, f_x, _ = run_lammps(tmp_path / "x", model_file, z, positions, cell, ranks=2, settings="ghost exchange")
    e_d, _, w_d, f_d, _ = run_lammps(tmp_path / "d", model_file, z, positions, cell, ranks=2, settings="ghost deep")
    assert e_x == pytest.approx(e_d, rel=1e-13)
    np.testing.assert_allclose(f_x, f_d, rtol=0, atol=1e-12)


def test_nve_run_is_identical_on_one_and_two_ranks(tmp_path, periodic_case):
    model, model_file, z, positions = periodic_case
    cell = np.diag([12.0, 12.0, 12.0])
    md = ("velocity all create 300 4928 loop geom\ntimestep 0.0005\nfix nve all nve\n"
          "thermo 50\nrun 200")
    runs = [run_lammps(tmp_path / f"np{n}", model_file, z, positions, cell, ranks=n, run=md, dump_every=200)
            for n in (1, 2)]
    (e1, _, _, f1, x1), (e2, _, _, f2, x2) = runs
    assert np.abs(x1 - positions).max() > 1e-3                # the atoms moved
    np.testing.assert_allclose(x2, x1, rtol=0, atol=1e-9)
    np.testing.assert_allclose(f2, f1, rtol=0, atol=1e-8)
    assert e2 == pytest.approx(e1, rel=1e-10)


def test_molecule_metal_and_real_agree_after_conversion(tmp_path, plugin):
    """The shipped ethanol model (schnet2017: no cutoff) in a non-periodic box, split over two ranks."""
    s = read_structure(SYSTEMS / "ethanol" / "ethanol.pdb")
    z, positions = s.atomic_numbers, s.positions_nm * 10.0
    model_file = export_lammps("ethanol", tmp_path / "ethanol-lammps.pt")
    from schnet_md.modelfile import load_model

    model = load_model("ethanol", dtype=torch.float64)[0]
    results = {}
    for units in ("metal", "real"):
        e, _, w, f, _ = run_lammps(tmp_path / units, model_file, z, positions, units=units, ranks=2)
        e_ref, f_ref, w_ref = direct(model, z, positions, None, units)
        assert e == pytest.approx(e_ref, rel=1e-12)
        np.testing.assert_allclose(f, f_ref, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(w, w_ref, rtol=1e-6, atol=1e-6)
        results[units] = (e, f)
    kcal_per_ev = energy_factor("eV", "kcal/mol")
    assert results["real"][0] == pytest.approx(results["metal"][0] * kcal_per_ev, rel=1e-12)
    np.testing.assert_allclose(results["real"][1], results["metal"][1] * kcal_per_ev, rtol=1e-10, atol=1e-10)


def test_atom_sorting_cannot_scramble_elements(tmp_path, periodic_case):
    """LAMMPS reorders its atoms (atom_modify sort); elements follow types every step."""
    model, model_file, z, positions = periodic_case
    cell = np.diag([12.0, 12.0, 12.0])
    md = "velocity all create 300 11 loop geom\ntimestep 0.0005\nfix nve all nve\nrun 20"
    _, _, _, f_sorted, x_sorted = run_lammps(tmp_path / "sorted", model_file, z, positions, cell, run=md,
                                             sort="sort 1 2.0", dump_every=20)
    _, _, _, f_plain, x_plain = run_lammps(tmp_path / "plain", model_file, z, positions, cell, run=md,
                                           sort="sort 0 0.0", dump_every=20)
    np.testing.assert_allclose(x_sorted, x_plain, rtol=0, atol=1e-10)
    np.testing.assert_allclose(f_sorted, f_plain, rtol=0, atol=1e-9)


def test_float32_export_is_close_to_float64(tmp_path, periodic_case):
    model, _, z, positions = periodic_case
    cell = np.diag([12.0, 12.0, 12.0])
    model_file = export_lammps(model, tmp_path / "model32.pt", dtype="float32")
    e, _, _, f, _ = run_lammps(tmp_path, model_file, z, positions, cell)
    e_ref, f_ref, _ = direct(model, z, positions, cell, "metal")
    assert e == pytest.approx(e_ref, rel=1e-5)
    np.testing.assert_allclose(f, f_ref, rtol=1e-3, atol=1e-3)


def test_tabulated_filters_in_both_ghost_modes(tmp_path, periodic_case):
    """export_lammps(tabulate=True): the filters from spline tables (schnet_md.tabulated), on 2 ranks in both ghost
    modes, against the model with its filter network called directly."""
    model, _, z, positions = periodic_case
    cell = np.diag([12.0, 12.0, 12.0])
    model_file = export_lammps(model, tmp_path / "tabulated.pt", tabulate=True)
    e_ref, f_ref, _ = direct(model, z, positions, cell, "metal")
    for settings in ("ghost exchange", "ghost deep"):
        e, _, _, f, _ = run_lammps(tmp_path / settings.split()[1], model_file, z, positions, cell, ranks=2,
                                   settings=settings)
        assert e == pytest.approx(e_ref, rel=1e-7), settings
        np.testing.assert_allclose(f, f_ref, rtol=0, atol=1e-5 * np.abs(f_ref).max(), err_msg=settings)


def failure(tmp_path, **kwargs):
    proc = run_lammps(tmp_path, check=False, **kwargs)
    assert proc.returncode != 0, "LAMMPS should have refused this setup"
    return lammps_plugin.lammps_error(proc.stdout + proc.stderr)


def test_bad_setups_get_clear_errors(tmp_path, periodic_case):
    model, model_file, z, positions = periodic_case
    cell = np.diag([12.0, 12.0, 12.0])
    common = dict(model_file=model_file, z=z, positions=positions, cell=cell)
    assert "newton pair on" in failure(tmp_path / "newton", newton="off", **common)
    assert "element N (atom type 3) is not one this model was trained on (H C O)" in \
        failure(tmp_path / "element", elements="H C N", **common)
    missing = dict(common, model_file=tmp_path / "nowhere.pt")
    assert "does not exist" in failure(tmp_path / "missing", **missing)
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(model_file.read_bytes()[:2000])
    assert "not a readable TorchScript file" in failure(tmp_path / "damaged", **dict(common, model_file=damaged))
    from schnet_md.export import export_model
    from schnet_md.structures import molecule_topology

    openmm_file = export_model(model, molecule_topology(z.tolist(), positions), tmp_path / "openmm.pt")
    assert "not a schnet-md LAMMPS model" in failure(tmp_path / "openmm", **dict(common, model_file=openmm_file))
    small = dict(common, positions=positions * 5.0 / 12.0, cell=np.diag([5.0, 5.0, 5.0]))
    assert "box is too small" in failure(tmp_path / "small", **small)
    assert "units metal (Å, eV) and real" in failure(tmp_path / "lj", units="lj", **common)
    assert "unknown keyword 'ghosts'" in failure(tmp_path / "keyword", settings="ghosts deep", **common)


def test_edited_metadata_is_refused(tmp_path, periodic_case):
    """The pair style reads elements, reference energies and unit factors from the export's metadata: an edit
    of it (here H C O said to be H O C) no longer matches the checksum inside the module."""
    model, model_file, z, positions = periodic_case
    data = model_file.read_bytes()
    old, new = b'"element_symbols": ["H", "C", "O"]', b'"element_symbols": ["H", "O", "C"]'
    assert data.count(old) == 1
    edited = tmp_path / "edited.pt"
    edited.write_bytes(data.replace(old, new))
    error = failure(tmp_path / "run", model_file=edited, z=z, positions=positions, cell=np.diag([12.0, 12.0, 12.0]))
    assert f"{edited} is damaged: its metadata (schnet_md.json) does not match the checksum inside the module" in error


def test_a_damaged_weight_or_attribute_is_refused(tmp_path, periodic_case):
    """Every member of the export's archive (weights, code, attributes) is under the checksum the pair style
    recomputes: a flipped byte in a weight is refused, though the metadata is intact."""
    import struct

    model, model_file, z, positions = periodic_case
    weight = model.interactions[0].dense1.weight.detach().float().numpy().tobytes()[:16]
    data = model_file.read_bytes()
    if data.count(weight) != 1:                           # (the export may hold the weights in float64)
        weight = model.interactions[0].dense1.weight.detach().double().numpy().tobytes()[:16]
    assert data.count(weight) == 1
    flipped = bytearray(weight)
    flipped[3] ^= 0x10
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(data.replace(weight, bytes(flipped)))
    error = failure(tmp_path / "run", model_file=damaged, z=z, positions=positions, cell=np.diag([12.0, 12.0, 12.0]))
    assert f"{damaged} is damaged: its contents (weights, code or settings such as unit factors) do not match" in error


def test_element_order_that_does_not_match_the_types_is_refused(tmp_path, periodic_case):
    """The data file's types are H C O (by mass); `pair_coeff * * FILE C H O` would run hydrogen as carbon."""
    model, model_file, z, positions = periodic_case
    error = failure(tmp_path, model_file=model_file, z=z, positions=positions, cell=np.diag([12.0, 12.0, 12.0]),
                    elements="C H O")
    assert "pair_coeff gives atom type 1 the element C (12.011 g/mol), but type 1 has mass 1.008, nearest to H " \
           "(1.008) of the model's elements: the elements in pair_coeff are not in the order of the atom types" in error


def test_models_without_cutoff_only_in_non_periodic_boxes(tmp_path, plugin):
    model_file = export_lammps("ethanol", tmp_path / "ethanol-lammps.pt")
    s = read_structure(SYSTEMS / "ethanol" / "ethanol.pdb")
    error = failure(tmp_path, model_file=model_file, z=s.atomic_numbers, positions=s.positions_nm * 10.0 + 5.0,
                    cell=np.diag([20.0, 20.0, 20.0]))
    assert "no cutoff" in error and "non-periodic" in error


def test_null_types_are_skipped_but_must_stay_outside_the_cutoff(tmp_path, periodic_case):
    model, model_file, z, positions = periodic_case
    cell = np.diag([12.0, 12.0, 12.0])
    # oxygen atoms NULL: LAMMPS refuses, since some sit within the cutoff of model atoms
    error = failure(tmp_path / "near", model_file=model_file, z=z, positions=positions, cell=cell, elements="H C NULL")
    assert "NULL in pair_coeff" in error and "inside the model's cutoff" in error
    # NULL atoms farther than the cutoff from every model atom: skipped, and they add nothing
    wide = np.diag([24.0, 12.0, 12.0])
    keep = z != 8
    ghosts_far = np.array([[18.0, 3.0, 3.0], [18.0, 9.0, 9.0]])      # >= 6 Å from the slab x in [0, 12)
    z_all = np.concatenate([z[keep], [8, 8]])
    e_null, _, _, f_null, _ = run_lammps(tmp_path / "far", model_file, z_all, np.vstack([positions[keep], ghosts_far]),
                                         wide, elements="H C NULL")
    e_ref, f_ref, _ = direct(model, z[keep], positions[keep], wide, "metal")
    assert e_null == pytest.approx(e_ref, rel=1e-12)
    np.testing.assert_allclose(f_null[:-2], f_ref, rtol=1e-10, atol=1e-10)
    assert np.abs(f_null[-2:]).max() == 0.0


def test_build_command_and_path(plugin):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "schnet_md_lammps", "path"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == str(plugin)


def test_cli_exports_for_lammps(tmp_path, periodic_case):
    from schnet_md import cli

    model = periodic_case[0]
    model_path = save_model(model, tmp_path / "model.pt")
    assert cli.main(["export", str(model_path), "--engine", "lammps", "--out", str(tmp_path / "m.pt")]) == 0
    assert cli.main(["export", str(model_path), "--engine", "lammps", "--structure", "x.pdb",
                     "--out", str(tmp_path / "m2.pt")]) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_device_equals_cpu(tmp_path, periodic_case):
    model, model_file, z, positions = periodic_case
    cell = np.diag([12.0, 12.0, 12.0])
    e_cpu, _, _, f_cpu, _ = run_lammps(tmp_path / "cpu", model_file, z, positions, cell)
    e_gpu, _, _, f_gpu, _ = run_lammps(tmp_path / "gpu", model_file, z, positions, cell,
                                       settings="ghost exchange device cuda")
    assert e_gpu == pytest.approx(e_cpu, rel=1e-10)
    np.testing.assert_allclose(f_gpu, f_cpu, rtol=1e-8, atol=1e-8)


def test_plain_lmp_with_plugin_load(tmp_path, periodic_case, plugin):
    """A user's own input: `plugin load` with the printed path, the wheel's lmp, no schnet-md helpers."""
    import os
    import subprocess

    model, model_file, z, positions = periodic_case
    cell = np.diag([12.0, 12.0, 12.0])
    lammps_plugin.write_data(tmp_path / "system.data", z, positions, ["H", "C", "O"], cell)
    (tmp_path / "in.user").write_text(
        f"plugin load {plugin}\nunits metal\natom_style atomic\nread_data system.data\n"
        f"pair_style schnet\npair_coeff * * {model_file} H C O\nthermo_style custom step pe\n"
        "thermo_modify format float %.15g\nrun 0\n")
    tools = lammps_plugin.toolchain()
    env = {k: v for k, v in os.environ.items() if k != "LAMMPS_PLUGIN_PATH"}
    env["LD_LIBRARY_PATH"] = str(tools["mpi_lib"])
    proc = subprocess.run([str(tools["lmp"]), "-in", "in.user", "-log", "none"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    e_ref, _, _ = direct(model, z, positions, cell, "metal")
    lines = proc.stdout.splitlines()
    row = lines[next(k for k, line in enumerate(lines) if line.split()[:2] == ["Step", "PotEng"]) + 1].split()
    assert float(row[1]) == pytest.approx(e_ref, rel=1e-12)
