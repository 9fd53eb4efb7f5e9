"""`schnet-md refine` runs a whole round end to end on real data: check, committee, committee MD, frame
choice, GFN2-xTB labels, fine-tuning, the record; and a second call resumes instead of redoing the round."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import SYSTEMS, shared_file

pytest.importorskip("tblite")


def test_one_refinement_round_on_an_iso17x_isomer(tmp_path, capsys, monkeypatch):
    import schnet_md.refine as refining
    from schnet_md.cli import main
    from schnet_md.simulate import SimulationSettings, run_simulation

    folder = shared_file("iso17x/iso17x.npz").parent
    # a user's run to learn from (as if the blow-up guard had stopped it): its last frames get labelled
    production = tmp_path / "production"
    run_simulation(SYSTEMS / "c7o2h10_7" / "c7o2h10_7.pdb", "iso17x", production, SimulationSettings(
        steps=60, report_interval=10, temperature_k=500.0, platform="CPU", seed=3), progress=False)
    # as iso17x did at 500 K: H4 moving from C2 onto C3 in the run's last frame (a transfer under way)
    import mdtraj

    traj = mdtraj.load(str(production / "trajectory.dcd"), top=str(production / "topology.pdb"))
    c3, h4 = traj.xyz[-1, 2], traj.xyz[-1, 12]
    traj.xyz[-1, 12] = c3 + 0.12 * (h4 - c3) / np.linalg.norm(h4 - c3)
    traj.save_dcd(str(production / "trajectory.dcd"))
    # the transfer's relaxed path, in three short windows here (the defaults take ~1.5 min per transfer)
    import schnet_md.reference as reference

    short = dict(xi_end=-0.7, equilibrate=2, steps=4, every=2)
    real_sample, real_walk = reference.sample_transfer, refining.model_transfer_frames
    monkeypatch.setattr(reference, "sample_transfer", lambda *a, **k: real_sample(*a, **(k | short)))
    monkeypatch.setattr(refining, "model_transfer_frames", lambda *a, **k: real_walk(*a, **(k | short)))
    assert main(["refine", "iso17x", str(SYSTEMS / "c7o2h10_63" / "c7o2h10_63.pdb"), "--data", str(folder),
                 "--out", str(tmp_path / "bad"), "--from-runs", str(tmp_path)]) == 1   # not a run folder
    assert "not a simulate run folder" in capsys.readouterr().err
    # labels an earlier refinement made (here: 4 jiggled copies of isomer 7) are trained on again
    from schnet_md.reference import label_frames
    from schnet_md.structures import read_structure

    isomer7 = read_structure(SYSTEMS / "c7o2h10_7" / "c7o2h10_7.pdb")
    jiggled = isomer7.positions_nm * 10.0 + np.random.default_rng(0).normal(0.0, 0.03, (4, *isomer7.positions_nm.shape))
    earlier = label_frames(isomer7.atomic_numbers, jiggled, tmp_path / "earlier" / "labels.npz")
    assert main(["refine", "iso17x", str(SYSTEMS / "c7o2h10_63" / "c7o2h10_63.pdb"), "--data", str(folder),
                 "--out", str(tmp_path / "bad"), "--previous-labels", str(production / "state.csv")]) == 1
    assert "not a labels file" in capsys.readouterr().err
    args = ["refine", "iso17x", str(SYSTEMS / "c7o2h10_63" / "c7o2h10_63.pdb"), "--data", str(folder),
            "--max-frames", "120", "--test", str(folder), "--test-split", "test_within", "test_other",
            "--test-frames", "200", "--out", str(tmp_path / "refine"),
            "--temperatures", "500", "--md-steps", "100", "--members", "2", "--member-epochs", "1",
            "--frames", "6", "--epochs", "1", "--rounds", "1", "--check-steps", "60", "--threads", "1",
            "--frames-per-epoch", "100", "--from-runs", str(production), "--label-weight", "3",
            "--previous-labels", str(earlier)]
    fine_tunings = []
    real_train = refining._train

    def spy(model, data, out, *rest, **settings):
        fine_tunings.append((out.name, data, settings))
        return real_train(model, data, out, *rest, **settings)

    monkeypatch.setattr(refining, "_train", spy)
    code = main(args)
    data, settings = next((d, s) for name, d, s in fine_tunings if name == "model")
    new = data.weights[data.weights != 1.0]       # the original frames weigh 1; learnable new ones 3 x (0.01-1)
    assert len(new) and new.max() <= 3.0 and new.min() >= 0.03 - 1e-12 and np.isclose(data.weights.max(), 3.0)
    assert settings["frames_per_epoch"] == 100 and settings["keep_within"] == refining.KEEP_WITHIN
    assert settings["warmup_steps"] == refining.WARMUP_STEPS
    positions = data.positions.reshape(-1, len(isomer7.positions_nm), 3)[-len(new):]       # (all 19-atom frames)
    assert all(np.abs(positions - x).max(axis=(1, 2)).min() < 1e-9 for x in jiggled)   # the earlier labels are in
    assert code in (0, 2)
    record = json.loads((tmp_path / "refine" / "rounds.json").read_text())
    assert len(record["rounds"]) == 1
    r = record["rounds"][0]
    assert 1 <= r["frames_from_md"] <= 6
    assert r["runs"] == [str(production.resolve())] and r["frames_from_runs"] == 6      # all 6 frames it wrote
    # H4 from C2 to C3: 3 windows x 2 frames x 2 walks along the reference's relaxed path, as many along the model's
    assert record["transfers"] == [{"run": str(production.resolve()), "hydrogen": 13, "donor": 2, "acceptor": 3}]
    assert [(t["path"], t["frames"]) for t in r["transfer_frames"]] == [("reference", 12), ("model", 12)]
    assert r["frames_from_md"] + r["frames_from_failed_checks"] + 6 + 24 >= r["frames_added"] >= 7 + 24
    labels = [np.load(path) for path in r["labels"]]        # the structure's frames, then the run's
    assert sum(x["energies"].shape[0] for x in labels) == r["frames_added"]
    assert all(np.isfinite(x["forces"]).all() for x in labels) and labels[1]["energies"].shape[0] == 6
    # GFN2-xTB through tblite is iso17x's own labelling: the energy zeros agree
    offset = record["energy_offsets"]["C7H10O2"]
    assert abs(offset["offset"]) < 1e-3 and len(offset["frames"]) == 3
    assert set(r["test"]) == {"iso17x.npz [test_within]", "iso17x.npz [test_other]"}
    assert all(m["before"]["n_frames"] == m["after"]["n_frames"] > 0 for m in r["test"].values())
    assert isinstance(r["test_not_worse"], bool) and r["labelled_after"]["n_frames"] == r["frames_added"] + 4
    assert "final_check" in record and (tmp_path / "refine" / "round1" / "model" / "model.pt").is_file()
    # resumed: the finished round is not redone
    before = (tmp_path / "refine" / "round1" / "model" / "model.pt").stat().st_mtime
    assert main(args) in (0, 2)
    assert (tmp_path / "refine" / "round1" / "model" / "model.pt").stat().st_mtime == before
    # resuming with other previous labels would train another model under the same record: refused
    assert main(args[:-2]) == 1 and "other previous labels" in capsys.readouterr().err
    # polishing continues the last round's fine-tuning from its checkpoint and re-evaluates it
    assert main(args + ["--polish-epochs", "1"]) in (0, 2)
    record = json.loads((tmp_path / "refine" / "rounds.json").read_text())
    assert record["rounds"][0]["fine_tuning_epochs"] == 2
    history = json.loads((tmp_path / "refine" / "round1" / "model" / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [0, 1]
    # a second round walks the transfer again with the refined model (its own path moves as it learns); the
    # run's lead-up and the reference's path are not labelled twice
    rounds = args.index("--rounds") + 1
    assert main(args[:rounds] + ["2"] + args[rounds + 1:]) in (0, 2)
    record = json.loads((tmp_path / "refine" / "rounds.json").read_text())
    if "passed_after_round" not in record:          # (a round-1 model that passes every check ends the loop)
        r2 = record["rounds"][1]
        assert r2["runs"] == [] and [(t["path"], t["frames"]) for t in r2["transfer_frames"]] == [("model", 12)]
        assert any("round2/transfers/0_H13_3.npz" in path for path in r2["labels"])


def test_frames_far_from_the_data_weigh_less_in_proportion():
    """Inside the data's band (2x its RMS force, 3 standard deviations of energy) a frame counts fully; k times
    further out it weighs 1/k^2, so its errors count relative to its size."""
    from dataclasses import replace

    from conftest import shared_file
    from schnet_md.data import read_rmd17
    from schnet_md.refine import energy_spread, frame_weights

    data = read_rmd17(shared_file("rmd17/rmd17_ethanol_train_01.npz"))
    rms = float(np.sqrt(np.mean(data.forces ** 2)))
    spread = energy_spread(data)
    mean, std = spread["C2H6O"]
    frames = data.subset([0, 1, 2])
    forces = frames.forces.copy()
    unit = lambda f: f / np.sqrt(np.mean(f ** 2))  # noqa: E731
    forces[0:9] = 0.5 * rms * unit(forces[0:9])                                   # frame 0: calm
    forces[9:18] = 4.0 * rms * unit(forces[9:18])                                  # frame 1: RMS force 4x the data's
    forces[18:27] = 0.5 * rms * unit(forces[18:27])
    energies = np.array([mean, mean, mean + 6 * std])                             # frame 2: 6 sigma out
    w = frame_weights(replace(frames, energies=energies, forces=forces), rms, spread)
    assert w[0] == 1.0 and np.isclose(w[1], 0.25) and np.isclose(w[2], 0.25)


def test_a_refinement_refuses_a_model_name_that_now_names_another_file(tmp_path):
    """A shipped name can be replaced by a refined model; resuming must not quietly refine the new file."""
    from schnet_md.data import read_rmd17
    from schnet_md.refine import RefineSettings, refine

    from conftest import shared_file

    data = read_rmd17(shared_file("rmd17/rmd17_ethanol_train_01.npz")).subset(range(10))
    structure = str(SYSTEMS / "ethanol" / "ethanol.pdb")
    (tmp_path / "rounds.json").write_text(json.dumps({
        "model": "ethanol", "structures": [structure], "data": data.source, "settings": {},
        "rounds": [], "model_sha256": "0" * 64}))
    with pytest.raises(ValueError, match="another file"):
        refine("ethanol", [structure], data, tmp_path, RefineSettings(), log=lambda _: None)
    with pytest.raises(ValueError, match="label_weight"):
        refine("ethanol", [structure], data, tmp_path, RefineSettings(label_weight=0.0), log=lambda _: None)
    # the file the name used to point to, under its own path: the same model, so the refinement goes on
    from dataclasses import asdict

    from schnet_md.data import file_sha256

    from conftest import FIXTURES

    before = FIXTURES / "ethanol_unrefined.pt"
    settings = RefineSettings(rounds=0)
    written_before = {k: v for k, v in asdict(settings).items() if k != "frames_per_epoch"}   # a later setting
    (tmp_path / "rounds.json").write_text(json.dumps({
        "model": "ethanol", "structures": [structure], "data": data.source, "settings": written_before,
        "rounds": [], "model_sha256": file_sha256(before), "energy_offsets": {"C2H6O": {"offset": 0.0}},
        "final_check_of": file_sha256(before), "final_check": {"passed": False}}))
    record = refine(str(before), [structure], data, tmp_path, settings, log=lambda _: None)
    assert record["model_sha256"] == file_sha256(before)
    with pytest.raises(ValueError, match="another file"):   # and the name, now another file, is still refused
        refine("ethanol", [structure], data, tmp_path, settings, log=lambda _: None)


def _small_fine_tuning(tmp_path):
    """(16 synthetic 9-atom frames, a small random model file) for fine-tuning tests."""
    from conftest import random_model
    from schnet_md.data import Dataset
    from schnet_md.modelfile import save_model

    rng = np.random.default_rng(0)
    n, atoms = 16, 9
    base = rng.normal(size=(atoms, 3)) * 1.2
    data = Dataset(atomic_numbers=np.tile([6, 6, 8, 1, 1, 1, 1, 1, 1], n),
                   positions=np.concatenate([base + 0.05 * rng.normal(size=base.shape) for _ in range(n)]),
                   offsets=np.arange(n + 1) * atoms, energies=rng.normal(size=n), forces=rng.normal(size=(n * atoms, 3)),
                   energy_unit="kcal/mol", source="synthetic")
    start = save_model(random_model("schnet2017", elements=(1, 6, 8), n_features=8, n_interactions=1),
                       tmp_path / "start.pt")
    return data, start


def test_an_interrupted_fine_tuning_goes_on_from_its_checkpoint(tmp_path):
    """A refine run stopped mid fine-tuning (a session ends) keeps its finished epochs: the next call resumes
    after the last one in checkpoint.pt instead of starting over; a checkpoint of another model starts over."""
    from conftest import random_model
    from schnet_md.modelfile import save_model
    from schnet_md.refine import _train

    data, start = _small_fine_tuning(tmp_path)
    out = tmp_path / "fine"
    lines = []
    _train(start, data, out, lines.append, epochs=2, lr_patience=25)
    (out / "metrics.json").unlink()             # as if the session ended after epoch 2 of 3
    _train(start, data, out, lines.append, epochs=3, lr_patience=25)
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert any("resuming after epoch 2" in line for line in lines)
    (out / "metrics.json").unlink()
    lines.clear()
    wider = save_model(random_model("schnet2017", elements=(1, 6, 8), n_features=16, n_interactions=1),
                       tmp_path / "wider.pt")
    _train(wider, data, out, lines.append, epochs=2, lr_patience=25)    # a checkpoint of another model
    assert any("starts over" in line for line in lines)
    assert [h["epoch"] for h in json.loads((out / "metrics.json").read_text())["history"]] == [0, 1]


def test_new_labels_are_put_on_the_data_energy_zero_in_the_data_unit(tmp_path):
    """rMD17 ethanol (kcal/mol, PBE/def2-SVP) against GFN2-xTB (eV, another zero altogether): the offset is
    E_xTB - E_data in kcal/mol, computed here independently through tblite's ASE calculator, and once
    subtracted, xTB energies lie on the data's zero to within the two methods' disagreement."""
    from ase import Atoms
    from tblite.ase import TBLite

    from schnet_md.data import read_rmd17
    from schnet_md.refine import _energy_offset

    data = read_rmd17(shared_file("rmd17/rmd17_ethanol_test_01.npz")).subset(np.arange(40))
    z = data.frame(0)[0]
    result = _energy_offset(data, z, "GFN2-xTB", tmp_path / "offset")
    assert result["unit"] == "kcal/mol" and len(result["frames"]) == 3
    ev_in_kcal_mol = 23.060547830619029   # 1 eV = 96.485332 kJ/mol, 1 kcal = 4.184 kJ
    direct = []
    for k in result["frames"]:
        atoms = Atoms(numbers=z, positions=data.frame(k)[1])
        atoms.calc = TBLite(method="GFN2-xTB", verbosity=0)
        direct.append(atoms.get_potential_energy() * ev_in_kcal_mol - data.energies[k])
    assert abs(result["offset"]) > 1e4                        # different zeros: a wrong factor would show
    assert result["offset"] == pytest.approx(np.mean(direct), abs=1e-3)
    assert result["spread"] == pytest.approx(np.ptp(direct), abs=1e-3)
    assert result["spread"] < 5.0                             # the zero is one constant, not frame-dependent


def test_fine_tuning_continues_with_the_base_model_batch_and_ema():
    from schnet_md.modelfile import load_model
    from schnet_md.refine import fine_tuning_recipe

    assert fine_tuning_recipe(load_model("iso17x")[1]) == {"batch_size": 32, "ema_decay": 0.999}
    assert fine_tuning_recipe({}) == {"batch_size": 16, "ema_decay": 0.99}
    assert fine_tuning_recipe({"training": {"settings": {"batch_size": 8, "ema_decay": 0.0}}}) == \
        {"batch_size": 8, "ema_decay": 0.99}


def test_the_model_walks_its_own_path_of_a_hydrogen_transfer():
    """Umbrella windows on xi = d(C2-H4) - d(C3-H4), walked by the model in OpenMM: frames for each window,
    xi moving towards the last centre (0.3 Å) from the start's -0.98 Å."""
    from schnet_md.reference import transfer_windows
    from schnet_md.refine import model_transfer_frames
    from schnet_md.structures import read_structure

    isomer7 = read_structure(SYSTEMS / "c7o2h10_7" / "c7o2h10_7.pdb")
    windows = transfer_windows(isomer7.positions_nm * 10.0, 12, 1, 2)
    frames = model_transfer_frames("iso17x", isomer7, 12, 1, 2, temperature=500.0, seed=0, walks=1, equilibrate=20,
                                   steps=20, every=10)
    assert frames.shape == (2 * len(windows), 19, 3) and np.isfinite(frames).all()
    xi = np.linalg.norm(frames[:, 12] - frames[:, 1], axis=1) - np.linalg.norm(frames[:, 12] - frames[:, 2], axis=1)
    assert xi[:2].mean() < -0.6 and xi[-2:].mean() > 0.0
    assert np.abs(xi[-2:] - windows[-1]).max() < 0.3


def test_a_fine_tuning_killed_after_its_last_epoch_is_done(tmp_path):
    """A kill between a fine-tuning's last checkpoint and its metrics.json (written when training ends) leaves a
    finished fine-tuning: the next call returns its model. (train refuses to resume a run with every epoch done,
    so this used to stop the refinement for good.)"""
    from schnet_md.refine import _train

    data, start = _small_fine_tuning(tmp_path)
    out = tmp_path / "fine"
    _train(start, data, out, lambda _: None, epochs=2, lr_patience=25)
    model = (out / "model.pt").read_bytes()
    (out / "metrics.json").unlink()                      # as if killed just before it was written
    assert _train(start, data, out, lambda _: None, epochs=2, lr_patience=25) == out / "model.pt"
    assert (out / "model.pt").read_bytes() == model


def test_a_refinement_has_one_writer_and_resumes_only_on_the_inputs_it_started_with(tmp_path, capsys, monkeypatch):
    """A real `schnet-md refine`, paused once it holds OUT (before it reads its data): a second refine into OUT is
    refused, naming the first's PID and host. A refinement records its structures and its data, validation and test
    files (path, size, SHA-256) and the frames it selected when it starts; a resume after any of them changed is
    refused, naming it, before any work; so is a damaged rounds.json."""
    import shutil
    import socket

    import schnet_md.refine as refining
    from conftest import FIXTURES
    from processes import paused_command
    from schnet_md.cli import main

    def rmd17_file(path, frames):
        with np.load(shared_file("rmd17/rmd17_ethanol_train_01.npz")) as full:
            np.savez(path, **{key: full[key] if key == "nuclear_charges" else full[key][frames] for key in full.files})
        return path

    data, validation, test = (rmd17_file(tmp_path / f"{name}.npz", frames) for name, frames in
                              (("data", slice(0, 30)), ("validation", slice(30, 40)), ("test", slice(40, 50))))
    structure = tmp_path / "ethanol.pdb"
    shutil.copy(SYSTEMS / "ethanol" / "ethanol.pdb", structure)
    out = tmp_path / "refine"
    argv = ["refine", str(FIXTURES / "ethanol_unrefined.pt"), str(structure), "--data", str(data),
            "--validation-data", str(validation), "--test", str(test), "--rounds", "0", "--out", str(out)]
    first = paused_command("schnet_md.data", "read_data", 1, argv)
    try:
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert f"in use by PID {first.pid} on {socket.gethostname()}" in err and err.count("\n") == 1
    finally:
        first.kill()
        first.wait()
    assert not (out / "rounds.json").exists()
    # (the checks themselves are test_check's: a stand-in report here)
    report = {"passed": False, "minimisation": {"passed": False}, "bond_scans": {"passed": True},
              "molecule_scan": {"passed": True}, "md": []}
    monkeypatch.setattr(refining, "check", lambda *args, **kwargs: report)
    assert main(argv) == 2
    capsys.readouterr()
    record = json.loads((out / "rounds.json").read_text())
    given = (structure, data, validation, test)
    assert sorted(r["path"] for r in record["inputs"]) == sorted(str(p.resolve()) for p in given)
    assert record["data_sets"]["test_file"] == str(test.resolve()) and len(record["run_id"]) == 32
    # regenerated under the same name (other frames, same size): refused, naming the file
    for path, frames in ((data, slice(50, 80)), (validation, slice(50, 60)), (test, slice(60, 70))):
        kept = path.read_bytes()
        rmd17_file(path, frames)
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert f"{path.resolve()} has the same size but other content" in err and err.count("\n") == 1
        path.write_bytes(kept)
    kept = structure.read_bytes()
    structure.write_bytes(kept + b"\n")
    assert main(argv) == 1 and f"{structure.resolve()} changed size" in capsys.readouterr().err
    structure.write_bytes(kept)
    # other frames of the same files, or another test file with the same frames: named too
    assert main(argv + ["--max-frames", "20"]) == 1
    assert "data_frames_sha256 (recorded" in capsys.readouterr().err
    shutil.copy(test, tmp_path / "test-copy.npz")
    k = argv.index("--test") + 1
    assert main([*argv[:k], str(tmp_path / "test-copy.npz"), *argv[k + 1:]]) == 1
    assert f"test_file (recorded '{test.resolve()}', now '{(tmp_path / 'test-copy.npz').resolve()}')" in \
        capsys.readouterr().err
    assert main(argv) == 2                                           # as it started: it goes on
    capsys.readouterr()
    (out / "rounds.json").write_bytes(b'{"rounds": [')
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "rounds.json (the refinement record) is damaged" in err and err.count("\n") == 1
