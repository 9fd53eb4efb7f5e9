"""GFN2-xTB reference labels (tblite): exact forces, units on writing, sampling and resume."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import SYSTEMS
from schnet_md.cli import main
from schnet_md.data import read_rmd17
from schnet_md.structures import read_structure

pytest.importorskip("tblite")
from schnet_md.reference import label_frames, sample, xtb_energy_forces  # noqa: E402

KCAL_PER_EV = 96.48533212331002 / 4.184
SCF_FORCE_TOL = 1e-4 * KCAL_PER_EV   # kcal/mol/Å: forces agree to SCF convergence between calculators


@pytest.fixture(scope="module")
def ethanol():
    s = read_structure(SYSTEMS / "ethanol" / "ethanol.pdb")
    return s.atomic_numbers, s.positions_nm * 10.0


def test_reference_forces_are_minus_gradient(ethanol):
    z, r = ethanol
    e, f = xtb_energy_forces(z, r)
    h = 1e-3   # Å; central differences of an SCF energy (the iso17x checks used the same step)
    rng = np.random.default_rng(0)
    for atom, axis in zip(rng.integers(0, len(z), 6), rng.integers(0, 3, 6)):
        plus, minus = r.copy(), r.copy()
        plus[atom, axis] += h
        minus[atom, axis] -= h
        fd = -(xtb_energy_forces(z, plus)[0] - xtb_energy_forces(z, minus)[0]) / (2 * h)
        assert fd == pytest.approx(f[atom, axis], abs=5e-4), (atom, axis)


def test_labels_are_written_in_the_trainers_format_and_units(tmp_path, ethanol):
    z, r = ethanol
    rng = np.random.default_rng(1)
    frames = r[None] + rng.normal(scale=0.03, size=(3, len(z), 3))
    out = label_frames(z, frames, tmp_path / "labels.npz", workers=1)
    data = read_rmd17(out)
    assert data.energy_unit == "kcal/mol" and len(data) == 3
    e1, f1 = xtb_energy_forces(z, frames[1])
    # a fresh calculator starts its SCF from scratch, the labeller's from the previous frame: they agree to
    # the SCF convergence (~1e-4 eV/Å in forces), far below the unit factor being checked (23.06)
    assert data.energies[1] == pytest.approx(e1 * KCAL_PER_EV, rel=1e-8)
    np.testing.assert_allclose(data.frame(1)[3], f1 * KCAL_PER_EV, atol=SCF_FORCE_TOL)
    # rerunning finds the finished chunk and does not recompute it
    (tmp_path / "labels.npz.parts" / "chunk00000.npz").touch()
    before = (tmp_path / "labels.npz.parts" / "chunk00000.npz").stat().st_mtime
    label_frames(z, frames, tmp_path / "labels.npz", workers=1)
    assert (tmp_path / "labels.npz.parts" / "chunk00000.npz").stat().st_mtime == before


def test_frames_the_reference_fails_on_are_left_out_and_listed(tmp_path, ethanol, monkeypatch, capsys):
    """A geometry where the SCF does not converge (e.g. the last frame of a blown-up run) must not sink the
    whole job, nor enter the data set with made-up labels."""
    from ase.calculators.calculator import CalculationFailed

    import schnet_md.reference as reference

    z, r = ethanol
    frames = np.stack([r, r + 0.01, r + 0.02, r + 0.03])
    frames[2, 0] = frames[2, 1]          # two atoms on top of each other
    real = reference.xtb_energy_forces

    def flaky(numbers, positions, *args, **kwargs):
        if np.linalg.norm(positions[0] - positions[1]) < 1e-6:
            raise CalculationFailed("SCF not converged in 250 cycles")
        return real(numbers, positions, *args, **kwargs)

    monkeypatch.setattr(reference, "xtb_energy_forces", flaky)
    out = label_frames(z, frames, tmp_path / "labels.npz", workers=1)
    data = np.load(out)
    assert data["old_indices"].tolist() == [0, 1, 3] and np.isfinite(data["energies"]).all()
    assert json.loads((tmp_path / "labels.npz.failed.json").read_text())["failed_frames"] == [2]
    assert "left out" in capsys.readouterr().out
    frames[:] = frames[2]
    with pytest.raises(RuntimeError, match="failed on every one"):
        label_frames(z, frames, tmp_path / "all_bad.npz", workers=1)


def test_sampling_makes_consistent_labelled_frames_and_resumes(tmp_path):
    structure = SYSTEMS / "ethanol" / "ethanol.pdb"
    out = sample(structure, tmp_path / "md.npz", ps=0.01, timestep_fs=0.5, every=5, trajectories=2)
    data = read_rmd17(out)
    assert len(data) == 8        # 2 trajectories x 20 steps / 5
    z, r, e, f = data.frame(5)
    e_ref, f_ref = xtb_energy_forces(z, r)
    assert e == pytest.approx(e_ref * KCAL_PER_EV, rel=1e-8)
    np.testing.assert_allclose(f, f_ref * KCAL_PER_EV, atol=SCF_FORCE_TOL)
    first = data.positions.copy()
    data2 = read_rmd17(sample(structure, tmp_path / "md.npz", ps=0.02, timestep_fs=0.5, every=5, trajectories=2))
    assert len(data2) == 16
    np.testing.assert_array_equal(data2.subset(range(4)).positions, first[: 4 * 9])   # earlier frames kept


def test_cli_label(tmp_path):
    assert main(["label", str(SYSTEMS / "ethanol" / "ethanol.pdb"), "--out", str(tmp_path / "l.npz"),
                 "--workers", "1"]) == 0
    assert len(read_rmd17(tmp_path / "l.npz")) == 1


def test_pyscf_labels_reproduce_rmd17_up_to_a_constant():
    """PBE/def2-SVP in PySCF against rMD17's own labels (same functional and basis, ORCA): energies agree up to
    a constant offset, forces agree. Two ethanol frames, ~10 s each."""
    pytest.importorskip("pyscf")
    from conftest import shared_file
    from schnet_md.data import read_rmd17
    from schnet_md.reference import KCAL_PER_EV, dft_energy_forces

    data = read_rmd17(shared_file("rmd17/rmd17_ethanol_train_01.npz"))
    offsets, worst_force = [], 0.0
    for k in (0, 500):
        z, r, e_ref, f_ref = data.frame(k)
        e, f = dft_energy_forces(z, r)
        offsets.append(e * KCAL_PER_EV - e_ref)
        worst_force = max(worst_force, float(np.abs(f * KCAL_PER_EV - f_ref).max()))
    assert abs(offsets[0] - offsets[1]) < 0.05          # kcal/mol: the same surface, shifted
    assert worst_force < 0.1                            # kcal/mol/Å


def test_a_small_job_is_cut_so_every_worker_has_work_and_resumes_with_its_chunks(tmp_path, ethanol):
    """3 frames on 2 workers: chunks of 2 (not one 50-frame chunk on one worker); a rerun keeps the cut, and a
    different job in the same place is refused instead of mixing labels."""
    z, r = ethanol
    frames = np.stack([r, r + 0.01, r - 0.01])
    out = tmp_path / "l.npz"
    label_frames(z, frames, out, workers=2)
    job = json.loads((tmp_path / "l.npz.parts" / "job.json").read_text())
    assert job["chunk"] == 2 and len(list((tmp_path / "l.npz.parts").glob("chunk*.npz"))) == 2
    first = read_rmd17(out).energies
    for k, r_k in enumerate(frames):                 # strided chunks are put back in the input order
        assert np.isclose(first[k], xtb_energy_forces(z, r_k)[0] * KCAL_PER_EV, atol=1e-5)
    (tmp_path / "l.npz.parts" / "chunk00001.npz").unlink()          # as if stopped before the last chunk
    label_frames(z, frames, out, workers=1)
    assert json.loads((tmp_path / "l.npz.parts" / "job.json").read_text())["chunk"] == 2
    assert np.allclose(read_rmd17(out).energies, first, atol=1e-6)
    with pytest.raises(ValueError, match="another labelling job"):
        label_frames(z, frames[:2], out, workers=2)
