"""GFN2-xTB reference labels (tblite): exact forces, units on writing, sampling and resume."""

from __future__ import annotations

import json
import os
import sys

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


def test_frames_with_two_atoms_on_one_site_are_left_out(tmp_path, ethanol, capsys):
    """GFN2-xTB labels two hydrogens 0.05 Å apart without complaint (the end of a minimisation that fused them),
    but training data with such a frame is refused: the labels file must not hold it, or a refinement round
    would stop at reading its own labels."""
    z, r = ethanol
    frames = np.stack([r, r + 0.01, r + 0.02])
    frames[1, 4] = frames[1, 3] + [0.05, 0.0, 0.0]          # H5 onto H4
    out = label_frames(z, frames, tmp_path / "labels.npz", workers=1)
    assert np.load(out)["old_indices"].tolist() == [0, 2] and len(read_rmd17(out)) == 2
    assert "1 of 3 frames put two atoms closer than 0.3 Å [1]" in capsys.readouterr().out


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
    with pytest.raises(ValueError, match=r"started with other settings: n_frames \(recorded 3, now 2\); frames_sha256"):
        label_frames(z, frames[:2], out, workers=2)


def test_the_transfer_restraint_forces_are_minus_its_gradient():
    """The umbrella bias on xi = d(donor-H) - d(acceptor-H), added to a reference (here Lennard-Jones), gives
    forces = -dE/dr (float64 central differences)."""
    from ase import Atoms
    from ase.calculators.lj import LennardJones

    from schnet_md.reference import TransferRestraint

    s = read_structure(SYSTEMS / "c7o2h10_7" / "c7o2h10_7.pdb")
    atoms = Atoms(numbers=s.atomic_numbers, positions=s.positions_nm * 10.0)
    restraint = TransferRestraint(LennardJones(sigma=1.0, epsilon=0.01, rc=6.0), 12, 1, 2, k_ev_per_A2=20.0)
    restraint.xi0 = -0.4                     # far from the start's -0.98: the bias pulls hard
    e, f = restraint.energy_forces(atoms)
    assert e > 0.5 * 20.0 * 0.5 ** 2        # 1/2 k (xi - xi0)^2 with |xi - xi0| > 0.5 Å
    h = 1e-5
    for atom in (12, 1, 2, 0):
        for axis in range(3):
            plus, minus = atoms.copy(), atoms.copy()
            plus.positions[atom, axis] += h
            minus.positions[atom, axis] -= h
            fd = -(restraint.energy_forces(plus)[0] - restraint.energy_forces(minus)[0]) / (2 * h)
            assert fd == pytest.approx(f[atom, axis], abs=1e-6), (atom, axis)


def test_a_hydrogen_transfer_under_way_is_found():
    from schnet_md.reference import hydrogen_transfers

    s = read_structure(SYSTEMS / "c7o2h10_7" / "c7o2h10_7.pdb")
    z, r = s.atomic_numbers, s.positions_nm * 10.0
    bonds = [(b[0].index, b[1].index) for b in s.topology.bonds()]
    assert hydrogen_transfers(z, bonds, r) == []              # every H at home (1,2 neighbours ~2.1 Å away)
    moved = r.copy()
    moved[12] = r[2] + 1.1 * (r[12] - r[2]) / np.linalg.norm(r[12] - r[2])   # H4 onto C3, as iso17x did
    assert hydrogen_transfers(z, bonds, moved) == [(12, 1, 2)]


def test_two_hydrogens_pinched_together_are_found():
    """Isomer 63's 100 ps run stopped with its methyl's H2 and H3 0.64 Å apart, both still ~1.05 Å from C1."""
    from schnet_md.reference import hydrogen_transfers

    s = read_structure(SYSTEMS / "c7o2h10_63" / "c7o2h10_63.pdb")
    z, r = s.atomic_numbers, s.positions_nm * 10.0
    bonds = [(b[0].index, b[1].index) for b in s.topology.bonds()]
    assert hydrogen_transfers(z, bonds, r) == []
    pinched = r.copy()
    mid, half = (r[10] + r[11]) / 2, (r[11] - r[10]) / np.linalg.norm(r[11] - r[10]) * 0.32
    pinched[10], pinched[11] = mid - half, mid + half         # H2 and H3 (0-based 10, 11) on C1 (0)
    assert hydrogen_transfers(z, bonds, pinched) == [(10, 0, 11)]
    assert hydrogen_transfers(z, bonds, pinched, pinch=0.5) == []


def test_transfer_path_frames_are_sampled_labelled_and_resumed(tmp_path):
    """Umbrella windows from the start's xi (-0.98 Å for isomer 7's H4 between C2 and C3) to xi_end: frames
    labelled without the bias, xi recorded per frame, finished walks not redone."""
    from schnet_md.reference import sample_transfer

    s = read_structure(SYSTEMS / "c7o2h10_7" / "c7o2h10_7.pdb")
    z, r = s.atomic_numbers, s.positions_nm * 10.0
    with pytest.raises(ValueError, match="not a hydrogen"):
        sample_transfer(z, r, 1, 0, 2, tmp_path / "bad.npz")
    kwargs = dict(xi_end=-0.7, equilibrate=2, steps=4, every=2, walks=2)
    out = sample_transfer(z, r, 12, 1, 2, tmp_path / "path.npz", **kwargs)
    data = read_rmd17(out)
    meta = json.loads((tmp_path / "path.npz.json").read_text())
    assert meta["windows_A"] == [-0.9, -0.8, -0.7] and len(data) == 2 * 3 * 2
    x = data.positions.reshape(len(data), len(z), 3)
    xi = np.linalg.norm(x[:, 12] - x[:, 1], axis=1) - np.linalg.norm(x[:, 12] - x[:, 2], axis=1)
    np.testing.assert_allclose(xi, meta["xi_A"], atol=1e-4)
    assert meta["window_of_frame"][:6] == [-0.9, -0.9, -0.8, -0.8, -0.7, -0.7]
    z1, r1, e1, f1 = data.frame(5)
    # the label is the reference alone: the bias would add k (xi - xi0) ~ 500 kcal/mol/Å^2 x 0.1 Å on H4, C2, C3;
    # SCF started from another guess differs by ~5e-3 kcal/mol/Å on these strained frames
    e_ref, f_ref = xtb_energy_forces(z1, r1)
    assert e1 == pytest.approx(e_ref * KCAL_PER_EV, rel=1e-7)
    np.testing.assert_allclose(f1, f_ref * KCAL_PER_EV, atol=0.05)
    walk = tmp_path / "path.npz.parts" / "walk00.npz"
    before = walk.stat().st_mtime
    sample_transfer(z, r, 12, 1, 2, tmp_path / "path.npz", **kwargs)
    assert walk.stat().st_mtime == before


def _trajectory_file(path, frames_angstrom):
    """Frames (Å) of ethanol as a DCD file beside the structure's PDB, as `label` reads them."""
    import mdtraj

    pdb = SYSTEMS / "ethanol" / "ethanol.pdb"
    mdtraj.Trajectory(np.asarray(frames_angstrom) / 10.0, mdtraj.load_topology(str(pdb))).save_dcd(str(path))
    return path, pdb


def test_a_second_labeller_is_refused_and_a_killed_one_resumes_to_the_same_labels(tmp_path, ethanol, capsys):
    """Two real processes on one output (in a folder named in French and Japanese): the second is refused, naming
    the first's PID and host. The first, killed (kill -9) after its first chunk, leaves no output; a rerun after its
    input file changed is refused, naming the file; with the input restored it labels the rest, and the labels are
    those of an uninterrupted run."""
    import socket

    from processes import paused_command
    from schnet_md.reference import frames_from

    z, r = ethanol
    dcd, pdb = _trajectory_file(tmp_path / "in.dcd", r[None] + np.random.default_rng(2).normal(0, 0.03, (60, 9, 3)))
    out = tmp_path / "résultats" / "データ" / "labels.npz"
    argv = ["label", str(dcd), "--top", str(pdb), "--out", str(out), "--workers", "1"]    # 2 chunks of 30 frames
    first = paused_command("schnet_md.reference", "_label_chunk", 2, argv)                # chunk 0 written
    try:
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert f"in use by PID {first.pid} on {socket.gethostname()}" in err and err.count("\n") == 1
    finally:
        first.kill()
        first.wait()
    parts = tmp_path / "résultats" / "データ" / "labels.npz.parts"
    assert sorted(p.name for p in parts.glob("chunk*.npz")) == ["chunk00000.npz"] and not out.exists()
    kept = dcd.read_bytes()
    _trajectory_file(dcd, r[None] + np.random.default_rng(3).normal(0, 0.03, (60, 9, 3)))   # regenerated
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"{dcd} has the same size but other content" in err and err.count("\n") == 1
    dcd.write_bytes(kept)
    assert main(argv) == 0
    resumed = read_rmd17(out)
    job = json.loads((parts / "job.json").read_text())
    assert job["input_files"] == [str(dcd), str(pdb)] and len(job["run_id"]) == 32
    z_dcd, frames, _ = frames_from(str(dcd), str(pdb))
    whole = read_rmd17(label_frames(z_dcd, frames, tmp_path / "whole.npz", workers=1))
    np.testing.assert_allclose(resumed.energies, whole.energies, rtol=1e-12)      # (tblite's last bits vary)
    np.testing.assert_allclose(resumed.forces, whole.forces, rtol=1e-10, atol=1e-10)


def _children(pid: int) -> list:
    from pathlib import Path

    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
            for c in (task / "children").read_text().split()]


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting to be reaped)."""
    from pathlib import Path

    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="worker processes end with the command on Linux")
def test_worker_processes_end_with_a_killed_labeller(tmp_path, ethanol):
    """kill -9 of `schnet-md label` while its workers label: they end with it. Left running, they would go on
    through the queued chunks, writing parts after the lock is gone, beside a rerun. The rerun finishes the job."""
    import signal
    import subprocess
    import time

    z, r = ethanol
    dcd, pdb = _trajectory_file(tmp_path / "in.dcd", r[None] + np.random.default_rng(4).normal(0, 0.03, (400, 9, 3)))
    out = tmp_path / "labels.npz"
    argv = ["label", str(dcd), "--top", str(pdb), "--out", str(out), "--workers", "2"]    # 8 chunks of 50 frames
    proc = subprocess.Popen([sys.executable, "-m", "schnet_md.cli", *argv], stderr=subprocess.PIPE)
    parts = tmp_path / "labels.npz.parts"
    workers = []
    try:
        deadline = time.monotonic() + 300
        while not list(parts.glob("chunk*.npz")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.01)
        workers = _children(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        written = sorted(parts.glob("chunk*.npz"))
        assert len(workers) >= 2 and not out.exists()
        deadline = time.monotonic() + 20
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(w) for w in workers), "worker processes outlived the command"
        assert sorted(parts.glob("chunk*.npz")) == written
    finally:
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)
    assert main(argv) == 0 and len(read_rmd17(out)) == 400


def test_labels_into_a_users_file_a_full_disk_and_a_damaged_record_are_refused_in_one_line(tmp_path, monkeypatch,
                                                                                          capsys):
    """An existing file that no labelling made is replaced only with --overwrite; a full disk names itself, and so
    does a damaged record of the job."""
    import errno

    out = tmp_path / "mine.npz"
    out.write_bytes(b"my own file")
    argv = ["label", str(SYSTEMS / "ethanol" / "ethanol.pdb"), "--out", str(out), "--workers", "1"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "mine.npz exists but no label run made it" in err and err.count("\n") == 1
    assert out.read_bytes() == b"my own file"

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    assert main(argv + ["--overwrite"]) == 1
    err = capsys.readouterr().err
    assert "no space left on the device holding" in err and "mine.npz.parts" in err and err.count("\n") == 1
    monkeypatch.undo()
    assert main(argv + ["--overwrite"]) == 0 and len(read_rmd17(out)) == 1
    (tmp_path / "mine.npz.parts" / "job.json").write_bytes(b'{"method": "GFN2')      # damaged (not by us)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "job.json (the record of the job its parts belong to) is damaged" in err and err.count("\n") == 1


def test_sampling_resumes_only_the_run_it_started(tmp_path, capsys):
    """`sample` records its structure file and settings when it starts; a rerun with another setting, or after the
    structure file changed, is refused, naming it; a longer --ps continues the run."""
    import shutil

    structure = tmp_path / "ethanol.pdb"
    shutil.copy(SYSTEMS / "ethanol" / "ethanol.pdb", structure)
    out = tmp_path / "md.npz"
    argv = ["sample", str(structure), "--out", str(out), "--ps", "0.005", "--every", "5", "--trajectories", "1"]
    assert main(argv) == 0 and len(read_rmd17(out)) == 2
    run_id = json.loads((tmp_path / "md.npz.json").read_text())["run_id"]
    assert main(argv + ["--temperature", "300"]) == 1
    err = capsys.readouterr().err
    assert "temperature_k (recorded 500.0, now 300.0)" in err and err.count("\n") == 1
    structure.write_bytes(structure.read_bytes() + b"\n")                       # regenerated, say
    assert main(argv) == 1
    assert f"{structure} changed size" in capsys.readouterr().err
    shutil.copy(SYSTEMS / "ethanol" / "ethanol.pdb", structure)
    argv[argv.index("0.005")] = "0.01"
    assert main(argv) == 0 and len(read_rmd17(out)) == 4
    assert json.loads((tmp_path / "md.npz.json").read_text())["run_id"] == run_id
