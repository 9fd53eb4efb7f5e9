"""Accuracy of a model on labelled frames: energy and force MAE / RMSE (forces component-wise)."""

from __future__ import annotations

import numpy as np
import torch

from .data import Dataset, compare_labels
from .model import SchNet
from .train import evaluate_split
from .units import energy_factor


def evaluate(model: SchNet, data: Dataset, batch_size: int = 100) -> dict:
    """Metrics in kcal/mol (/Å) and meV (/Å), whatever units the model and data use."""
    if data.energy_unit != model.config.energy_unit:
        data = data.converted(model.config.energy_unit)
    model.species(torch.as_tensor(data.elements))   # a clear error for elements the model lacks
    raw = evaluate_split(model, data, np.arange(len(data)), batch_size)
    out = {"n_frames": len(data), "data": data.source, "labels": data.label_set}
    for unit, label in (("kcal/mol", "kcal_mol"), ("meV", "meV")):
        f = energy_factor(model.config.energy_unit, unit)
        for key, value in raw.items():
            out[f"{key}_{label}"] = value * f
    return out


def rmd17_labels_for(trained_on: str) -> str:
    """Which labels of an rMD17 file to read for a model trained on `trained_on` (MD17: the original ones)."""
    return "old" if trained_on == "MD17" else "new"


def check_labels(model_name, trained_on: str, data: Dataset, allow_mismatch: bool = False, log=print) -> None:
    """Refuse to compare a model with labels other than those it was trained on: their energies lie on another
    zero, so the energy errors would measure the distance between the zeros (MD17 against rMD17: ~120 kcal/mol).
    allow_mismatch=True compares anyway, with a warning; a model or data set that does not say gets a note."""
    found = compare_labels(model_name, trained_on, data)
    if found is None:
        return
    kind, message = found
    if kind == "note":
        log(f"note: {message}")
    elif not allow_mismatch:
        raise ValueError(f"{message}: their energies lie on another zero; use the model's own labels (for "
                         "rMD17 files: leave out --labels) or pass --allow-label-mismatch")
    else:
        log(f"warning: {message}: their energies lie on another zero, which the energy errors include")


def format_table(metrics: dict) -> str:
    rows = [("energy MAE", "energy_mae", ""), ("energy RMSE", "energy_rmse", ""),
            ("forces MAE", "forces_mae", "/Å"), ("forces RMSE", "forces_rmse", "/Å")]
    lines = [f"{'':14s}{'kcal/mol':>12s}{'meV':>12s}"]
    for name, key, per in rows:
        if f"{key}_kcal_mol" in metrics:
            lines.append(f"{name + per:14s}{metrics[f'{key}_kcal_mol']:12.4f}{metrics[f'{key}_meV']:12.2f}")
    return "\n".join(lines)
