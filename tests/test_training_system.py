"""The training system: config files, EMA, early stopping, time budget, energy-only data, units."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import shared_file
from schnet_md.cli import main
from schnet_md.data import Dataset, read_data, read_iso17x, read_qm9, read_rmd17
from schnet_md.export import create_torch_force
from schnet_md.model import config_from_preset
from schnet_md.modelfile import load_model
from schnet_md.train import TrainSettings, read_checkpoint, resolve_config, train

SMALL = dict(n_features=16, n_interactions=2)


def quiet(_):
    pass


@pytest.fixture(scope="module")
def ethanol60():
    return read_rmd17(shared_file("rmd17/rmd17_ethanol_train_01.npz")).subset(range(60))


def test_config_file_with_command_line_overrides(tmp_path):
    data = shared_file("rmd17/rmd17_ethanol_train_01.npz")
    (tmp_path / "run.toml").write_text(f"""
[data]
path = "{data}"
labels = "old"
max_frames = 40

[model]
preset = "schnet2017"
n_features = 16
n_interactions = 1

[training]
epochs = 5
batch_size = 10
rho = 0.05
""")
    out = tmp_path / "out"
    assert main(["train", "--config", str(tmp_path / "run.toml"), "--epochs", "2", "--out", str(out)]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["training"]["epochs"] == 2 and saved["training"]["rho"] == 0.05   # flag beats file
    assert saved["data"]["labels"] == "old" and saved["model"]["n_features"] == 16
    assert len(json.loads((out / "metrics.json").read_text())["history"]) == 2
    # resume reuses the saved config, with more epochs from the command line
    assert main(["train", "--resume", "--epochs", "3", "--out", str(out)]) == 0
    assert len(json.loads((out / "metrics.json").read_text())["history"]) == 3
    with pytest.raises(ValueError, match="unknown training setting"):
        resolve_config(None, {"data": {"path": str(data)}, "training": {"epoch": 3}})
    with pytest.raises(ValueError, match="no training data"):
        resolve_config(None, {})


def test_ema_early_stopping_and_time_budget(tmp_path, ethanol60):
    config = config_from_preset("schnet2017", ethanol60.elements, **SMALL)
    s = train(ethanol60, config, tmp_path / "ema", TrainSettings(epochs=3, batch_size=10, ema_decay=0.9), log=quiet)
    state = read_checkpoint(tmp_path / "ema" / "checkpoint.pt")
    assert "ema" in state and len(s["history"]) == 3
    # the saved model is the averaged one, not the raw weights
    model, _ = load_model(tmp_path / "ema" / "model.pt")
    raw = state["model"]["embedding.weight"]
    assert not torch.equal(model.state_dict()["embedding.weight"], raw)
    # early stopping: with lr = 0 nothing improves after the first epoch
    s = train(ethanol60, config, tmp_path / "stop",
              TrainSettings(epochs=50, batch_size=30, learning_rate=0.0, early_stopping_patience=2), log=quiet)
    assert len(s["history"]) == 3 and s["stop_reason"].startswith("early stop")
    s = train(ethanol60, config, tmp_path / "budget", TrainSettings(epochs=50, batch_size=30, max_hours=1e-9),
              log=quiet)      # checked between batches: it stops within the first epoch, after a checkpoint
    assert s["history"] == [] and "time budget" in s["stop_reason"] and "after batch 1 of 2" in s["stop_reason"]
    assert not s["finished"] and read_checkpoint(tmp_path / "budget" / "checkpoint.pt")["batch"] == 1


def test_energy_only_training_on_qm9():
    qm9 = read_qm9(shared_file("qm9/qm9_u0.npz"), indices=np.arange(300))
    assert qm9.forces is None and qm9.energy_unit == "Hartree"
    config = config_from_preset("schnet2018", qm9.elements, energy_unit="eV", n_features=32, n_interactions=2)
    import tempfile
    with tempfile.TemporaryDirectory() as out:
        s = train(qm9, config, out, TrainSettings(epochs=15, batch_size=20, validation_fraction=0.2,
                                                  learning_rate=3e-3), log=quiet)
    maes = [h["validation_energy_mae"] for h in s["history"]]
    assert "validation_forces_mae" not in s["history"][0]
    assert min(maes[-3:]) < 0.7 * maes[0], maes


def test_iso17x_reader_and_splits():
    path = shared_file("iso17x/iso17x.npz").parent
    within = read_iso17x(path, "test_within")
    other = read_data(path, split="test_other")
    assert (len(within), len(other)) == (20600, 26000)
    assert within.energy_unit == "eV" and set(within.n_atoms) == {19} and within.elements == [1, 6, 8]
    assert within.forces.shape == (20600 * 19, 3)
    with pytest.raises(ValueError, match="unknown iso17x split"):
        read_iso17x(path, "test")


def test_ase_extxyz_reader_matches_the_npz(tmp_path):
    ase_io = pytest.importorskip("ase.io")
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    rmd = read_rmd17(shared_file("rmd17/rmd17_ethanol_test_01.npz")).subset(range(5))
    frames = []
    for k in range(5):
        z, r, e, f = rmd.frame(k)
        atoms = Atoms(numbers=z, positions=r)
        atoms.calc = SinglePointCalculator(atoms, energy=e / 23.060548, forces=f / 23.060548)   # kcal/mol -> eV
        frames.append(atoms)
    ase_io.write(tmp_path / "frames.extxyz", frames)
    data = read_data(tmp_path / "frames.extxyz")
    assert data.energy_unit == "eV" and len(data) == 5
    back = data.converted("kcal/mol")
    np.testing.assert_allclose(back.energies, rmd.energies, rtol=1e-6)
    np.testing.assert_allclose(back.forces, rmd.forces, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(data.positions, rmd.positions, atol=1e-8)


def test_same_frames_in_kcal_and_ev_train_to_the_same_model(tmp_path, ethanol60):
    """Adam's steps do not depend on the loss's unit, and the readout statistics are fitted in the data's
    unit, so training on kcal/mol or eV labels of the same frames gives the same model up to the unit."""
    ev = ethanol60.converted("eV")
    assert ev.energies[0] == pytest.approx(ethanol60.energies[0] / 23.060548, rel=1e-6)
    settings = TrainSettings(epochs=3, batch_size=10, seed=5)
    train(ethanol60, config_from_preset("schnet2017", [1, 6, 8], energy_unit="kcal/mol", **SMALL),
          tmp_path / "kcal", settings, log=quiet)
    train(ev, config_from_preset("schnet2017", [1, 6, 8], energy_unit="eV", **SMALL), tmp_path / "ev", settings,
          log=quiet)
    m_kcal, meta_kcal = load_model(tmp_path / "kcal" / "model.pt", dtype=torch.float64)
    m_ev, meta_ev = load_model(tmp_path / "ev" / "model.pt", dtype=torch.float64)
    assert meta_ev["units"]["energy"] == "eV"
    z, r, _, _ = ethanol60.frame(7)
    z, r = torch.as_tensor(z), torch.as_tensor(r)
    with torch.no_grad():
        e_kcal, e_ev = float(m_kcal(z, r)), float(m_ev(z, r))
    assert e_ev * 23.060548 == pytest.approx(e_kcal, rel=1e-6, abs=2e-3)
    # and both export to the same OpenMM energy in kJ/mol
    import openmm
    energies = []
    for model in (m_kcal, m_ev):
        system = openmm.System()
        for _ in range(len(z)):
            system.addParticle(12.0)
        system.addForce(create_torch_force(model, z.tolist(), dtype="float64"))
        context = openmm.Context(system, openmm.VerletIntegrator(1e-3), openmm.Platform.getPlatformByName("Reference"))
        context.setPositions(r.numpy() / 10)
        energies.append(context.getState(getEnergy=True).getPotentialEnergy()._value)
    assert energies[0] == pytest.approx(e_kcal * 4.184, rel=1e-9)
    assert energies[1] == pytest.approx(energies[0], rel=1e-6, abs=1e-2)


def test_dataset_converted_round_trip():
    d = Dataset(np.array([1, 1]), np.zeros((2, 3)), np.array([0, 2]), np.array([1.0]), np.ones((2, 3)), "Hartree")
    assert d.converted("kcal/mol").energies[0] == pytest.approx(627.5095, rel=1e-6)
    assert d.converted("eV").converted("Hartree").energies[0] == pytest.approx(1.0, rel=1e-12)
