"""mdtraj analysis: transitions found exactly on a trajectory whose dihedral is driven, and clear errors."""

from __future__ import annotations

import json

import mdtraj
import numpy as np
import pytest

from conftest import SYSTEMS, shared_file
from schnet_md.analysis import assign_states, load_trajectory, rotatable_dihedrals, transitions
from schnet_md.analysis.analyze import analyze
from schnet_md.analysis.compare import compare, compare_to
from schnet_md.cli import main
from schnet_md.structures import molecule_topology


def butane_like(phis_deg: np.ndarray, noise: float = 0.0, seed: int = 0) -> mdtraj.Trajectory:
    """Four carbons C1-C2-C3-C4 whose C1-C2-C3-C4 dihedral follows `phis_deg` (positions in nm)."""
    rng = np.random.default_rng(seed)
    xyz = np.zeros((len(phis_deg), 4, 3))
    for t, phi in enumerate(np.radians(phis_deg)):
        xyz[t, 0] = [-0.5, 1.4, 0.0]
        xyz[t, 1] = [0.0, 0.0, 0.0]
        xyz[t, 2] = [1.5, 0.0, 0.0]
        xyz[t, 3] = [2.0, 1.4 * np.cos(phi), 1.4 * np.sin(phi)]
    xyz += rng.normal(scale=noise, size=xyz.shape)
    top = mdtraj.Topology.from_openmm(molecule_topology([6, 6, 6, 6], xyz[0]))
    return mdtraj.Trajectory(xyz / 10.0, top, time=np.arange(len(phis_deg)) * 0.01)


def driven_dihedral():
    """t (180) for 40 frames with a barrier excursion to 120 that returns; then g+ (60) from frame 40; back
    to t at frame 75 after hovering between cores; then g- (300) at frame 110."""
    rng = np.random.default_rng(1)
    phi = np.concatenate([
        180 + rng.uniform(-25, 25, 20), [150, 130, 120, 125, 140], 180 + rng.uniform(-25, 25, 15),   # 0..39
        60 + rng.uniform(-25, 25, 25), [100, 110, 120, 110, 100], 60 + rng.uniform(-25, 25, 5),       # 40..74
        180 + rng.uniform(-25, 25, 35),                                                             # 75..109
        300 + rng.uniform(-25, 25, 30),                                                             # 110..139
    ])
    return phi, [(40, 1, 0), (75, 0, 1), (110, 1, 2)]


def test_transitions_on_a_driven_dihedral_are_found_exactly():
    phi, expected = driven_dihedral()
    traj = butane_like(phi)
    quads, names = rotatable_dihedrals(traj.topology)
    assert quads.tolist() == [[0, 1, 2, 3]] and names == ["C1-C2-C3-C4"]
    angles = np.degrees(mdtraj.compute_dihedrals(traj, quads))[:, 0] % 360
    np.testing.assert_allclose((angles - phi + 180) % 360 - 180, 0, atol=1e-3)
    assert transitions(assign_states(angles)) == expected


def test_analyze_reports_the_transitions_and_conformers(tmp_path):
    from schnet_md.analysis.load import LoadedTrajectory

    phi, expected = driven_dihedral()
    summary = analyze(LoadedTrajectory(butane_like(phi), "driven"))
    d = summary["dihedrals"][0]
    assert d["n_transitions"] == 3
    assert [(t["frame"], t["from"], t["to"]) for t in d["transitions"]] == [(40, "t", "g+"), (75, "g+", "t"),
                                                                           (110, "t", "g-")]
    pops = dict((c["states"], c["population"]) for c in summary["conformers"])
    assert pops == pytest.approx({"t": 75 / 140, "g+": 35 / 140, "g-": 30 / 140})
    assert summary["chemistry_changes"]["n_frames_changed"] == 0


def test_bond_changes_are_flagged():
    from schnet_md.analysis.load import LoadedTrajectory

    traj = butane_like(np.full(10, 180.0))
    traj.xyz[5:, 3] += [0.3, 0.0, 0.0]     # C4 leaves: the C3-C4 bond breaks from frame 5
    summary = analyze(LoadedTrajectory(traj, "broken"))
    ch = summary["chemistry_changes"]
    assert ch["n_frames_changed"] == 5 and ch["first"][0]["frame"] == 5
    assert ch["first"][0]["broken"] == ["MOL1:C3-MOL1:C4"]


def test_rings_and_terminal_bonds_are_not_rotatable():
    from schnet_md.structures import read_structure

    s = read_structure(SYSTEMS / "c7o2h10_1" / "c7o2h10_1.pdb")
    top = mdtraj.Topology.from_openmm(s.topology)
    quads, names = rotatable_dihedrals(top)
    assert len(quads) == 1   # CC12CC(O1)C2C1CO1: only the bond joining the two ring systems
    ethanol = mdtraj.Topology.from_openmm(read_structure(SYSTEMS / "ethanol" / "ethanol.pdb").topology)
    assert len(rotatable_dihedrals(ethanol)[0]) == 0


def test_analyze_a_run_folder_with_nve_drift(tmp_path):
    from schnet_md.simulate import SimulationSettings, run_simulation

    run = tmp_path / "run"
    run_simulation(SYSTEMS / "ethanol" / "ethanol.pdb", "ethanol", run,
                   SimulationSettings(steps=60, timestep_fs=0.25, report_interval=10, platform="Reference",
                                      ensemble="nve"), progress=False)
    assert main(["analyze", str(run), "--out", str(tmp_path / "an")]) == 0
    summary = json.loads((tmp_path / "an" / "summary.json").read_text())
    assert summary["n_frames"] == 6 and "nve_drift_kj_mol_per_ns_per_atom" in summary
    assert summary["time_ps"] == pytest.approx([0.0025, 0.015])
    assert (tmp_path / "an" / "report.md").is_file() and (tmp_path / "an" / "energy.png").is_file()


def test_clear_errors_for_bad_inputs(tmp_path):
    top = SYSTEMS / "ethanol" / "ethanol.pdb"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_trajectory(tmp_path / "missing.dcd", top)
    with pytest.raises(FileNotFoundError, match="not a schnet-md run folder"):
        load_trajectory(tmp_path)
    aspirin = mdtraj.load(str(SYSTEMS / "aspirin" / "aspirin.pdb"))
    aspirin.save_dcd(str(tmp_path / "aspirin.dcd"))
    with pytest.raises(ValueError, match="21 atoms per frame but .* has 9|cannot read"):
        load_trajectory(tmp_path / "aspirin.dcd", top)
    empty = mdtraj.load(str(top))[:0]
    empty.save_dcd(str(tmp_path / "empty.dcd"))
    with pytest.raises(ValueError, match="no frames|cannot read"):
        load_trajectory(tmp_path / "empty.dcd", top)
    with pytest.raises(ValueError, match="needs a topology"):
        load_trajectory(tmp_path / "aspirin.dcd")
    assert main(["analyze", str(tmp_path / "nothing.dcd"), "--top", str(top), "--out", str(tmp_path / "x")]) == 1


def test_compare_divergence_is_zero_for_identical_and_large_for_different():
    from schnet_md.analysis.load import LoadedTrajectory

    rng = np.random.default_rng(3)
    trans = LoadedTrajectory(butane_like(180 + rng.normal(scale=12, size=300)), "trans")
    trans2 = LoadedTrajectory(butane_like(180 + rng.normal(scale=12, size=300)), "trans again")
    gauche = LoadedTrajectory(butane_like(60 + rng.normal(scale=12, size=300)), "gauche")
    result = compare([trans, trans2, gauche])
    js_same, js_diff = result["dihedrals"][0]["js_divergence"]
    assert js_same < 0.1 and js_diff > 0.9
    with pytest.raises(ValueError, match="not the same molecule"):
        compare([trans, LoadedTrajectory(mdtraj.load(str(SYSTEMS / "ethanol" / "ethanol.pdb")), "ethanol")])


def test_iso17x_reference_trajectory_and_comparison(tmp_path):
    folder = shared_file("iso17x/iso17x.npz").parent
    ref = load_trajectory(f"iso17x:1:{folder}")
    assert ref.traj.n_frames == 1000 and ref.traj.n_atoms == 19
    assert ref.traj.time[0] == pytest.approx(0.0025) and ref.traj.time[-1] == pytest.approx(2.5)
    report = compare_to([f"iso17x:1:{folder}", str(SYSTEMS / "c7o2h10_1" / "c7o2h10_1.pdb")], tmp_path,
                        top=str(SYSTEMS / "c7o2h10_1" / "c7o2h10_1.pdb"), labels=["xtb", "eq"])
    assert "dihedral C2-C5-C6-O2" in report.read_text()


def test_rotatable_dihedrals_of_a_copied_topology():
    """A copied topology (mdtraj copies it in make_molecules_whole, atom_slice, ...) may hold other Atom objects
    in its bond graph than in its atom list: the same dihedrals must come out (compared by index)."""
    t = mdtraj.load(str(SYSTEMS / "alanine-dipeptide" / "alanine-dipeptide.pdb"))
    quads, names = rotatable_dihedrals(t.topology, t.xyz[0])
    assert names == ["C-N-CA-CB", "N-CA-C-O"]    # the two amide C-N bonds are planar, not rotatable
    copied, copied_names = rotatable_dihedrals(t.topology.copy(), t.xyz[0])
    assert copied_names == names and (copied == quads).all()


def _trajectory_files(folder, phis_deg, seed=0):
    """A driven butane-like trajectory as a DCD with its PDB, as `analyze` and `compare` read them."""
    traj = butane_like(phis_deg, noise=0.02, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    traj.save_dcd(str(folder / "md.dcd"))
    traj[0].save_pdb(str(folder / "top.pdb"))
    return folder / "md.dcd", folder / "top.pdb"


def test_one_analysis_at_a_time_and_an_earlier_one_is_replaced_only_when_asked(tmp_path, capsys):
    """A real `schnet-md analyze`, paused once it holds its output folder (named in French and Japanese): a second
    analysis into the folder is refused, naming the first's PID and host. Let go, the first finishes; a rerun into
    its output is refused unless --overwrite, which replaces the earlier files and leaves the user's own."""
    import socket

    from processes import go_on, paused_command

    dcd, pdb = _trajectory_files(tmp_path / "in", driven_dihedral()[0])
    out = tmp_path / "résultats" / "データ"
    argv = ["analyze", str(dcd), "--top", str(pdb), "--timestep", "0.01", "--out", str(out)]
    first = paused_command("schnet_md.analysis.analyze", "analyze", 1, argv)
    try:
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert f"in use by PID {first.pid} on {socket.gethostname()}" in err and err.count("\n") == 1
        assert go_on(first) == 0, first.stderr.read()
    finally:
        first.kill()
        first.wait()
    assert json.loads((out / "summary.json").read_text())["dihedrals"][0]["n_transitions"] == 3
    (out / "notes.txt").write_text("mine")
    (out / "ramachandran.png").write_bytes(b"a plot this trajectory does not make")
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "already holds report.md, summary.json, structure.png, dihedrals.png, ramachandran.png" in err
    assert err.count("\n") == 1 and (out / "notes.txt").read_text() == "mine"
    assert main(argv + ["--overwrite"]) == 0
    assert not (out / "ramachandran.png").exists() and (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == [".schnet-md.lock", "dihedrals.png", "notes.txt", "report.md",
                                                     "structure.png", "summary.json"]


def test_a_full_disk_stops_an_analysis_with_one_line_and_no_partial_file(tmp_path, monkeypatch, capsys):
    import errno
    import os

    dcd, pdb = _trajectory_files(tmp_path / "in", driven_dihedral()[0])

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    assert main(["analyze", str(dcd), "--top", str(pdb), "--timestep", "0.01", "--out", str(tmp_path / "an")]) == 1
    err = capsys.readouterr().err
    assert f"no space left on the device holding {tmp_path / 'an' / 'structure.png'}" in err and err.count("\n") == 1
    assert not (tmp_path / "an").exists()          # nothing partial: the folder it made is gone again


def test_compare_replaces_an_earlier_comparison_only_when_asked(tmp_path, capsys):
    rng = np.random.default_rng(5)
    a = _trajectory_files(tmp_path / "a", 180 + rng.normal(scale=12, size=50), seed=1)
    b = _trajectory_files(tmp_path / "b", 60 + rng.normal(scale=12, size=50), seed=2)
    argv = ["compare", str(a[0]), str(b[0]), "--top", str(a[1]), "--out", str(tmp_path / "cmp")]
    assert main(argv) == 0
    before = (tmp_path / "cmp" / "compare.json").read_text()
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "already holds compare.md, compare.json" in err and err.count("\n") == 1
    assert main(argv + ["--overwrite"]) == 0
    assert (tmp_path / "cmp" / "compare.json").read_text() == before


def test_a_trajectory_under_a_non_ascii_absolute_path_is_read(tmp_path, capsys):
    """mdtraj's DCD reader takes ASCII file names only; analyze and compare read from résultats/ all the same."""
    written = _trajectory_files(tmp_path / "ascii", driven_dihedral()[0])     # (mdtraj writes ASCII names only)
    (tmp_path / "données").mkdir()
    folder = (tmp_path / "ascii").rename(tmp_path / "données" / "分子")
    dcd, pdb = folder / written[0].name, folder / written[1].name
    assert dcd.is_absolute() and not str(dcd).isascii()
    assert main(["analyze", str(dcd), "--top", str(pdb), "--timestep", "0.01", "--out", str(tmp_path / "a")]) == 0
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["dihedrals"][0]["n_transitions"] == 3
    assert main(["compare", str(dcd), str(dcd), "--top", str(pdb), "--out", str(tmp_path / "c")]) == 0
