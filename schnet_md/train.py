"""Training on energies and forces: loss = rho |E - Ê|^2 + mean_i |F_i - F̂_i|^2 (paper: rho = 0.01).

Writes OUT/model.pt (the best model on the validation split), OUT/checkpoint.pt (the state after the
last finished epoch, for --resume) and OUT/metrics.json.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from . import __version__
from .data import Dataset, batches
from .model import SchNet, SchNetConfig, count_parameters
from .modelfile import ModelFileError, save_model


@dataclass
class TrainSettings:
    epochs: int = 100
    batch_size: int = 32
    learning_rate: float = 1e-3
    rho: float = 0.01                 # energy weight relative to forces (paper: 0.01)
    validation_fraction: float = 0.05
    seed: int = 0
    lr_patience: int = 10             # epochs without improvement before the learning rate drops
    lr_factor: float = 0.5
    min_learning_rate: float = 1e-5


def fit_energy_statistics(data: Dataset, model: SchNet) -> None:
    """Fit per-element reference energies (least squares on composition), shift and scale.

    scale is the RMS force component when forces exist (as in MACE), otherwise the spread of the
    per-atom residual energy; either way the network's output starts at O(1)."""
    elements = model.config.elements
    counts = np.zeros((len(data), len(elements)))
    species = {z: s for s, z in enumerate(elements)}
    frame_of_atom = np.repeat(np.arange(len(data)), data.n_atoms)
    for z in np.unique(data.atomic_numbers):
        np.add.at(counts[:, species[int(z)]], frame_of_atom[data.atomic_numbers == z], 1.0)
    reference, *_ = np.linalg.lstsq(counts, data.energies, rcond=None)
    per_atom = (data.energies - counts @ reference) / data.n_atoms
    shift = float(per_atom.mean())
    if data.forces is not None and np.any(data.forces):
        scale = float(np.sqrt(np.mean(data.forces ** 2)))
    else:
        scale = float(per_atom.std()) or 1.0
    readout = model.readout
    with torch.no_grad():
        readout.reference_energies.copy_(torch.as_tensor(reference, dtype=readout.reference_energies.dtype))
        readout.shift.fill_(shift)
        readout.scale.fill_(scale)


def split_indices(n_frames: int, validation_fraction: float, seed: int):
    """Deterministic train/validation split of frame indices."""
    order = np.random.default_rng(seed).permutation(n_frames)
    n_val = max(1, int(round(validation_fraction * n_frames))) if n_frames > 1 else 0
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def predict_batch(model: SchNet, batch: dict, create_graph: bool):
    """Energies [n_mol] and forces [n_atoms, 3] of one batch (forces by autograd)."""
    positions = batch["positions"].requires_grad_(True)
    species = model.species(batch["atomic_numbers"])
    energies = model.batch_energy(species, positions, batch["pair_i"], batch["pair_j"],
                                  batch["molecule"], batch["n_molecules"])
    (grad,) = torch.autograd.grad(energies.sum(), positions, create_graph=create_graph)
    return energies, -grad


def evaluate_split(model: SchNet, data: Dataset, indices: np.ndarray, batch_size: int = 100) -> dict:
    """MAE and RMSE of energies and force components, in the data's units."""
    dtype = next(model.parameters()).dtype
    err_e, err_f = [], []
    for batch in batches(data, indices, batch_size, dtype):
        energies, forces = predict_batch(model, batch, create_graph=False)
        err_e.append((energies.detach() - batch["energies"]).double().numpy())
        if batch["forces"] is not None:
            err_f.append((forces.detach() - batch["forces"]).double().numpy().ravel())
    e = np.concatenate(err_e)
    out = {"energy_mae": float(np.abs(e).mean()), "energy_rmse": float(np.sqrt((e ** 2).mean()))}
    if err_f:
        f = np.concatenate(err_f)
        out.update(forces_mae=float(np.abs(f).mean()), forces_rmse=float(np.sqrt((f ** 2).mean())))
    return out


def train(data: Dataset, config: SchNetConfig, out_dir: str | Path, settings: TrainSettings,
          resume: bool = False, log: Callable[[str], None] = print) -> dict:
    """Train a SchNet on `data`; returns the final metrics (also written to OUT/metrics.json)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if config.energy_unit != data.energy_unit:
        data = data.converted(config.energy_unit)
    train_idx, val_idx = split_indices(len(data), settings.validation_fraction, settings.seed)
    torch.manual_seed(settings.seed)
    model = SchNet(config)
    model.species(torch.as_tensor(data.elements))
    fit_energy_statistics(data.subset(train_idx), model)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, factor=settings.lr_factor, patience=settings.lr_patience, min_lr=settings.min_learning_rate)
    history: list = []
    best = math.inf
    first_epoch = 0
    checkpoint_path = out / "checkpoint.pt"
    if resume:
        if not checkpoint_path.is_file():
            raise ModelFileError(f"cannot resume: {checkpoint_path} does not exist")
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history = json.loads(state["history"])
        best = float(state["best"])
        first_epoch = int(state["epoch"]) + 1
        log(f"resuming after epoch {first_epoch} (best validation loss {best:.5g})")

    has_forces = data.forces is not None
    log(f"training {count_parameters(model):,} parameters on {len(train_idx)} frames, validating on "
        f"{len(val_idx)} ({data.source}); energies in {config.energy_unit}")
    started = time.perf_counter()
    for epoch in range(first_epoch, settings.epochs):
        t0 = time.perf_counter()
        model.train()
        generator = torch.Generator().manual_seed(settings.seed * 100_003 + epoch)
        order = train_idx[torch.randperm(len(train_idx), generator=generator).numpy()]
        total, n_batches = 0.0, 0
        for batch in batches(data, order, settings.batch_size):
            energies, forces = predict_batch(model, batch, create_graph=has_forces)
            loss = ((energies - batch["energies"]) ** 2).mean()
            if has_forces:
                force_loss = ((forces - batch["forces"]) ** 2).sum(-1).mean()
                loss = settings.rho * loss + force_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            n_batches += 1
        model.eval()
        metrics = evaluate_split(model, data, val_idx)
        val_loss = metrics["energy_rmse"] ** 2 * (settings.rho if has_forces else 1.0) + (
            3 * metrics["forces_rmse"] ** 2 if has_forces else 0.0)
        scheduler.step(val_loss)
        row = {"epoch": epoch, "train_loss": total / max(n_batches, 1), "validation_loss": val_loss,
               "learning_rate": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - t0,
               **{f"validation_{k}": v for k, v in metrics.items()}}
        history.append(row)
        if val_loss < best:
            best = val_loss
            save_model(model, out / "model.pt", _metadata(data, config, settings, len(train_idx),
                                                           len(val_idx), epoch, metrics))
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "epoch": epoch, "best": best,
                    "history": json.dumps(history)}, checkpoint_path)
        force_part = f"  F MAE {metrics['forces_mae']:.4f}" if has_forces else ""
        log(f"epoch {epoch + 1:5d}/{settings.epochs}  loss {row['train_loss']:.5g}  val E MAE "
            f"{metrics['energy_mae']:.4f}{force_part} {config.energy_unit}(/Å)  lr {row['learning_rate']:.2g}"
            f"  {row['seconds']:.1f}s")
    summary = {"history": history, "best_validation_loss": best, "energy_unit": config.energy_unit,
               "n_train": len(train_idx), "n_validation": len(val_idx),
               "wall_seconds_this_run": time.perf_counter() - started, "settings": asdict(settings)}
    (out / "metrics.json").write_text(json.dumps(summary, indent=1))
    return summary


def _metadata(data, config, settings, n_train, n_val, epoch, metrics) -> dict:
    return {
        "schnet_md_version": __version__,
        "preset": config.preset,
        "units": {"length": "Angstrom", "energy": config.energy_unit},
        "training": {"data": data.source, "data_sha256": data.sha256, "n_train": n_train,
                     "n_validation": n_val, "epoch": epoch + 1, "settings": asdict(settings),
                     "validation": metrics},
    }
