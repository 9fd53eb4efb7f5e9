"""Training on real rMD17 frames: the error drops, resume is exact, model files are data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import shared_file
from schnet_md.cli import main
from schnet_md.data import DataError, read_rmd17
from schnet_md.model import config_from_preset
from schnet_md.modelfile import load_model
from schnet_md.train import TrainSettings, read_checkpoint, train

SMALL = dict(n_features=24, n_interactions=2)


@pytest.fixture(scope="module")
def ethanol_frames():
    return read_rmd17(shared_file("rmd17/rmd17_ethanol_train_01.npz")).subset(range(60))


def quiet(_):
    pass


def test_training_lowers_validation_error(tmp_path, ethanol_frames):
    config = config_from_preset("schnet2017", ethanol_frames.elements, **SMALL)
    summary = train(ethanol_frames, config, tmp_path, TrainSettings(epochs=25, batch_size=8, validation_fraction=0.2),
                    log=quiet)
    history = summary["history"]
    assert history[-1]["validation_forces_mae"] < 0.6 * history[0]["validation_forces_mae"]
    model, meta = load_model(tmp_path / "model.pt")
    assert meta["units"] == {"length": "Angstrom", "energy": "kcal/mol"}
    assert meta["training"]["data_sha256"] == ethanol_frames.sha256 and meta["training"]["n_train"] == 48
    assert json.loads((tmp_path / "metrics.json").read_text())["n_validation"] == 12


def test_resume_continues_exactly(tmp_path, ethanol_frames):
    config = config_from_preset("schnet2017", ethanol_frames.elements, **SMALL)
    straight = TrainSettings(epochs=4, batch_size=16, validation_fraction=0.2, seed=3)
    train(ethanol_frames, config, tmp_path / "a", straight, log=quiet)
    train(ethanol_frames, config, tmp_path / "b", TrainSettings(**{**straight.__dict__, "epochs": 2}), log=quiet)
    summary = train(ethanol_frames, config, tmp_path / "b", straight, resume=True, log=quiet)
    assert [h["epoch"] for h in summary["history"]] == [0, 1, 2, 3]
    a = read_checkpoint(tmp_path / "a" / "checkpoint.pt")
    b = read_checkpoint(tmp_path / "b" / "checkpoint.pt")
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert a["optimizer"]["state"][0]["step"] == b["optimizer"]["state"][0]["step"]


def test_frames_per_epoch_draws_afresh_each_epoch(tmp_path, ethanol_frames, monkeypatch):
    """Short epochs over a large set (refine on iso17x): each epoch trains on `frames_per_epoch` training frames
    drawn anew, none twice, so together they spread over the whole set; 0 (the default) keeps whole epochs."""
    import schnet_md.train as training

    orders = []
    real = training.global_batches

    def spy(data, order, *args, **kwargs):
        orders.append(np.array(order))
        return real(data, order, *args, **kwargs)

    monkeypatch.setattr(training, "global_batches", spy)
    config = config_from_preset("schnet2017", ethanol_frames.elements, **SMALL)
    validation = ethanol_frames.subset(range(50, 60))
    summary = train(ethanol_frames.subset(range(50)), config, tmp_path / "short", TrainSettings(
        epochs=4, batch_size=8, frames_per_epoch=12), log=quiet, validation=validation)
    assert len(orders) == 4 and len(summary["history"]) == 4
    drawn = [frozenset(order.tolist()) for order in orders]
    assert all(len(order) == 12 and len(d) == 12 and d <= set(range(50)) for order, d in zip(orders, drawn))
    assert len(set(drawn)) == 4 and len(frozenset().union(*drawn)) > 25     # fresh draws over the whole set
    orders.clear()
    train(ethanol_frames.subset(range(50)), config, tmp_path / "whole", TrainSettings(epochs=1, batch_size=8),
          log=quiet, validation=validation)
    assert sorted(orders[0].tolist()) == list(range(50))
    with pytest.raises(ValueError, match="frames_per_epoch"):
        TrainSettings(frames_per_epoch=-1)


def test_keep_within_keeps_the_latest_epoch_near_the_best(tmp_path, ethanol_frames):
    """keep_within: model.pt is the latest epoch whose validation loss lies within the fraction of the best (refine
    prefers, of equally good epochs, the one that trained longest on its new frames); 0 keeps the best."""
    config = config_from_preset("schnet2017", ethanol_frames.elements, **SMALL)
    validation = ethanol_frames.subset(range(50, 60))
    runs = {}
    for name, within, lr in (("best", 0.0, 0.0), ("latest", 1e-9, 0.0), ("learning", 0.0, 3e-3)):
        # lr 0: six equally good epochs
        runs[name] = train(ethanol_frames.subset(range(50)), config, tmp_path / name, TrainSettings(
            epochs=6, batch_size=10, learning_rate=lr, keep_within=within), log=quiet, validation=validation)
    assert runs["best"]["model_epoch"] == runs["best"]["best_epoch"] == 1
    assert runs["latest"]["model_epoch"] == 6 and runs["latest"]["best_epoch"] == 1
    losses = [h["validation_loss"] for h in runs["learning"]["history"]]
    assert runs["learning"]["model_epoch"] == int(np.argmin(losses)) + 1
    assert load_model(tmp_path / "latest" / "model.pt")[1]["training"]["epoch"] == 6


def test_warmup_ramps_the_learning_rate_then_hands_it_to_the_schedule(tmp_path, ethanol_frames, monkeypatch):
    """warmup_steps: the first N optimiser steps run at lr x (k / N), the rest at the full rate."""
    config = config_from_preset("schnet2017", ethanol_frames.elements, **SMALL)
    rates = []
    real_step = torch.optim.Adam.step

    def recorded(self, *args, **kwargs):
        rates.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recorded)
    train(ethanol_frames.subset(range(50)), config, tmp_path / "warm", TrainSettings(
        epochs=2, batch_size=10, learning_rate=1e-3, warmup_steps=8), log=quiet,
        validation=ethanol_frames.subset(range(50, 60)))
    np.testing.assert_allclose(rates, [1e-3 * k / 8 for k in range(1, 9)] + [1e-3, 1e-3])   # 5 batches an epoch
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainSettings(warmup_steps=-1)


def test_cli_train(tmp_path, capsys):
    data = shared_file("rmd17/rmd17_ethanol_train_01.npz")
    assert main(["train", "--data", str(data), "--labels", "old", "--max-frames", "30", "--epochs", "2",
                 "--features", "16", "--interactions", "1", "--batch-size", "10", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "model.pt").is_file()
    _, meta = load_model(tmp_path / "model.pt")
    assert "old labels" in meta["training"]["data"]


def test_reader_errors(tmp_path):
    water = np.array([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]])     # Å (atoms on one site are refused)
    forces = np.full((4, 3, 3), 0.1)                                                 # (all-zero forces are refused)
    good = dict(nuclear_charges=np.array([8, 1, 1], dtype=np.uint8), coords=np.tile(water, (4, 1, 1)),
                energies=np.zeros(4), forces=forces, old_energies=np.zeros(4), old_forces=forces)
    np.savez(tmp_path / "good.npz", **good)
    assert len(read_rmd17(tmp_path / "good.npz")) == 4
    np.savez(tmp_path / "missing.npz", **{k: v for k, v in good.items() if k != "forces"})
    with pytest.raises(DataError, match="missing key.*forces"):
        read_rmd17(tmp_path / "missing.npz")
    np.savez(tmp_path / "shape.npz", **{**good, "forces": np.zeros((4, 2, 3))})
    with pytest.raises(DataError, match="forces has shape"):
        read_rmd17(tmp_path / "shape.npz")
    nan_e = good["energies"].copy()
    nan_e[2] = np.nan
    np.savez(tmp_path / "nan.npz", **{**good, "energies": nan_e})
    with pytest.raises(DataError, match="energies contain NaN"):
        read_rmd17(tmp_path / "nan.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(DataError, match="not a readable npz"):
        read_rmd17(tmp_path / "junk.npz")


def test_cli_evaluate_reports_both_units(tmp_path, capsys):
    data = shared_file("rmd17/rmd17_ethanol_test_01.npz")
    train(read_rmd17(data).subset(range(20)), config_from_preset("schnet2017", [1, 6, 8], n_features=16,
                                                                  n_interactions=1),
          tmp_path, TrainSettings(epochs=1, batch_size=10), log=quiet)
    assert main(["evaluate", str(tmp_path / "model.pt"), "--data", str(data), "--json",
                 str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert "forces MAE/Å" in out and "1000 frames" in out
    m = json.loads((tmp_path / "m.json").read_text())
    # 1 kcal/mol = 43.364 meV: the two columns must agree through that factor
    assert m["forces_mae_meV"] == pytest.approx(m["forces_mae_kcal_mol"] * 43.3641, rel=1e-4)


def test_frame_weights_scale_each_frames_loss(tmp_path, ethanol_frames):
    """Weights of one are no weights; a frame with wrong labels and weight zero changes nothing (the refine
    loop down-weights far-from-data frames this way)."""
    from dataclasses import replace

    from schnet_md.data import concatenate

    config = config_from_preset("schnet2017", ethanol_frames.elements, **SMALL)
    validation = ethanol_frames.subset(range(40, 60))
    base = ethanol_frames.subset(range(40))
    settings = TrainSettings(epochs=2, batch_size=41, learning_rate=1e-3)   # one batch per epoch: one order

    def history(data, name):
        return train(data, config, tmp_path / name, settings, log=quiet, validation=validation)["history"]

    plain = history(base, "plain")
    ones = history(base.weighted(np.ones(len(base))), "ones")
    assert [h["validation_loss"] for h in ones] == [h["validation_loss"] for h in plain]
    broken = base.subset([0])
    broken = replace(broken, energies=broken.energies + 1e4, forces=broken.forces + 1e3)
    with_broken = concatenate([base, broken]).weighted(np.r_[np.ones(len(base)), 0.0])
    # the loss sums over 41 frames instead of 40: gradients scale by 40/41, and Adam barely notices a scale
    muted = history(with_broken, "muted")
    assert np.allclose([h["validation_loss"] for h in muted], [h["validation_loss"] for h in plain], rtol=1e-3)
    counted = history(concatenate([base, broken]), "counted")       # the same frame counted does change it
    assert counted[-1]["validation_loss"] > 1.05 * plain[-1]["validation_loss"]
    with pytest.raises(DataError, match="weights"):
        base.weighted(np.full(len(base), -1.0))
