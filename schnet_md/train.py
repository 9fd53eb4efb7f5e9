"""Training on energies and forces: loss = rho |E - Ê|^2 + mean_i |F_i - F̂_i|^2 (paper: rho = 0.01).
Without forces in the data (QM9) the loss is |E - Ê|^2. A data set with frame weights (`Dataset.weighted`)
scales each frame's terms by its weight.

Writes OUT/model.pt (the best model on the validation set), OUT/checkpoint.pt (the whole state, after every
epoch and every `checkpoint_minutes` within one: `resume=True` continues exactly), OUT/metrics.json (when the run
ends) and, through train_from_config, OUT/config.json (the settings, the run's id and its input files).
"""

from __future__ import annotations

import copy
import io
import json
import math
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Optional, Tuple

import numpy as np
import torch
from torch import nn

from . import __version__, parallel, runs
from .data import Dataset, batches
from .model import SchNet, SchNetConfig, count_parameters
from .modelfile import ModelFileError, save_model

RECORD = "config.json"                                        # a run's settings, run id and input files
RUN_FILES = ("model.pt", "checkpoint.pt", "metrics.json")    # what a run writes besides its record


class TrainingError(RuntimeError):
    """Training could not go on (diverged, damaged checkpoint); the files already written are kept."""


@dataclass
class TrainSettings:
    epochs: int = 100
    batch_size: int = 32
    learning_rate: float = 1e-3
    rho: float = 0.01                 # energy weight relative to forces (paper: 0.01)
    validation_fraction: float = 0.05  # used when no separate validation set is given
    seed: int = 0
    lr_patience: int = 10             # epochs without improvement before the learning rate drops
    lr_factor: float = 0.5
    min_learning_rate: float = 1e-5
    ema_decay: float = 0.0            # > 0: validate and save an exponential moving average of the weights
    early_stopping_patience: int = 0  # > 0: stop after this many epochs without improvement
    max_hours: float = 0.0            # > 0: stop after this much wall time (resume continues)
    frames_per_epoch: int = 0         # > 0: each epoch trains on this many frames drawn afresh from the training set
    warmup_steps: int = 0             # > 0: the learning rate ramps up linearly over the first N optimiser steps
                                      # (fine-tuning: a fresh Adam's first full-size steps knock a trained model off)
    keep_within: float = 0.0          # > 0: model.pt is the latest epoch with validation loss within this fraction
                                      # of the best (refine: of equally good epochs, the one that learned new frames longest)
    checkpoint_minutes: float = 10.0  # > 0: also write checkpoint.pt within an epoch after this much wall time, so
                                      # a long epoch (iso17x: > 10 min on 2 cores) is resumable; 0: at epoch ends only
    device: str = "auto"              # "auto": CUDA when present, else CPU

    def __post_init__(self) -> None:
        for f in fields(self):
            value, default = getattr(self, f.name), f.default
            if isinstance(default, bool) or isinstance(default, str):
                ok = isinstance(value, type(default))
            elif isinstance(default, int):
                ok = isinstance(value, int) and not isinstance(value, bool)
            else:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok:
                kind = {str: "a string", int: "a whole number", float: "a number"}[type(default)]
                raise ValueError(f"training setting {f.name} must be {kind}, got {value!r}")
        checks = [(self.epochs >= 1, "epochs must be at least 1"),
                  (self.batch_size >= 1, "batch_size must be at least 1"),
                  (self.learning_rate >= 0, "learning_rate must be >= 0 (0 freezes the weights)"),
                  (self.rho >= 0, "rho (the energy weight) must be >= 0"),
                  (0 <= self.validation_fraction < 1, "validation_fraction must lie in [0, 1): some frames must be "
                                                      "left to train on"),
                  (0 <= self.seed < 2 ** 63, "seed must be a non-negative whole number"),
                  (self.lr_patience >= 0, "lr_patience must be >= 0"),
                  (0 < self.lr_factor < 1, "lr_factor must lie in (0, 1)"),
                  (self.min_learning_rate >= 0, "min_learning_rate must be >= 0"),
                  (0 <= self.ema_decay < 1, "ema_decay must lie in [0, 1)"),
                  (self.early_stopping_patience >= 0, "early_stopping_patience must be >= 0"),
                  (self.max_hours >= 0, "max_hours must be >= 0"),
                  (self.frames_per_epoch >= 0, "frames_per_epoch must be >= 0 (0: every frame, every epoch)"),
                  (self.keep_within >= 0, "keep_within must be >= 0 (0: model.pt is the best epoch)"),
                  (self.warmup_steps >= 0, "warmup_steps must be >= 0 (0: no warm-up)"),
                  (self.checkpoint_minutes >= 0, "checkpoint_minutes must be >= 0 (0: checkpoints at epoch ends only)"),
                  (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
                   "device must be auto, cpu, cuda or cuda:N")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainSettings":
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown training setting(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
        return cls(**values)


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
    w = np.ones(len(data)) if data.weights is None else data.weights     # weighted frames count as in the loss
    root = np.sqrt(w)
    reference, *_ = np.linalg.lstsq(counts * root[:, None], data.energies * root, rcond=None)
    per_atom = (data.energies - counts @ reference) / data.n_atoms
    shift = float(np.average(per_atom, weights=w))
    if data.forces is not None and np.any(data.forces):
        w_atom = np.repeat(w, data.n_atoms)
        scale = float(np.sqrt(np.average((data.forces ** 2).mean(axis=1), weights=w_atom)))
    else:
        scale = float(np.sqrt(np.average((per_atom - shift) ** 2, weights=w))) or 1.0
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


def predict_batch(model: SchNet, batch: dict, create_graph: bool, need_forces: bool = True, forward=None):
    """Energies [n_mol] and forces [n_atoms, 3] (or None) of one batch (forces by autograd). `forward` runs
    the energy (a DistributedDataParallel wrapper of BatchEnergy in data-parallel training)."""
    positions = batch["positions"].requires_grad_(need_forces)
    species = model.species(batch["atomic_numbers"])
    forward = forward or model.batch_energy
    energies = forward(species, positions, batch["pair_i"], batch["pair_j"], batch["molecule"], batch["n_molecules"])
    if not need_forces:
        return energies, None
    (grad,) = torch.autograd.grad(energies.sum(), positions, create_graph=create_graph)
    return energies, -grad


class BatchEnergy(nn.Module):
    """SchNet.batch_energy as a module's forward, so DistributedDataParallel sees (and synchronises) it."""

    def __init__(self, model: SchNet):
        super().__init__()
        self.model = model

    def forward(self, species, positions, i, j, molecule, n_molecules: int):
        return self.model.batch_energy(species, positions, i, j, molecule, n_molecules)


def evaluate_split(model: SchNet, data: Dataset, indices: np.ndarray, batch_size: int = 100,
                   group: Optional[parallel.Group] = None) -> dict:
    """MAE and RMSE of energies and force components, in the data's units. In data-parallel training each
    rank evaluates its share of `indices` and the sums are added up, so every rank gets the same numbers."""
    group = group or parallel.Group()
    parameter = next(model.parameters())
    has_forces = data.forces is not None
    # sums of |dE|, dE^2, count; |dF|, dF^2, count - in float64
    sums = torch.zeros(6, dtype=torch.float64, device=parameter.device)
    for batch in batches(data, indices[group.rank::group.world], batch_size, parameter.dtype, parameter.device):
        with torch.set_grad_enabled(has_forces):
            energies, forces = predict_batch(model, batch, create_graph=False, need_forces=has_forces)
        e = (energies.detach() - batch["energies"]).double()
        sums[0:3] += torch.stack([e.abs().sum(), (e ** 2).sum(), torch.tensor(float(e.numel()), device=e.device)])
        if has_forces:
            f = (forces.detach() - batch["forces"]).double().reshape(-1)
            sums[3:6] += torch.stack([f.abs().sum(), (f ** 2).sum(), torch.tensor(float(f.numel()), device=f.device)])
    sums = parallel.all_reduce_sum(group, sums).cpu().numpy()
    out = {"energy_mae": float(sums[0] / sums[2]), "energy_rmse": float(np.sqrt(sums[1] / sums[2]))}
    if has_forces:
        out.update(forces_mae=float(sums[3] / sums[5]), forces_rmse=float(np.sqrt(sums[4] / sums[5])))
    return out


def global_batches(data: Dataset, order: np.ndarray, batch_size: int, group: parallel.Group, device):
    """The epoch's batches of `batch_size` frames (the global batch), each rank taking every world-th frame of
    each. Yields (this rank's batch, weight, frames in the global batch, atoms in the global batch); a rank
    left without frames (a short last batch) gets one frame with weight 0, so all ranks run every step."""
    for start in range(0, len(order), batch_size):
        frames = order[start:start + batch_size]
        mine = frames[group.rank::group.world]
        weight = 1.0
        if len(mine) == 0:
            mine, weight = frames[:1], 0.0
        batch = next(batches(data, mine, len(mine), device=device))
        yield batch, weight, len(frames), int(data.n_atoms[frames].sum())


def _silent(_message: str) -> None:
    pass


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _holding(out: Path):
    """The run folder's lock (runs.exclusive) for the process that writes it: rank 0 of a group, or a process on
    its own. A second writer is refused, naming the holder."""
    if not parallel.main_process():
        return nullcontext()
    return runs.exclusive(out, "schnet-md train")


def _stop_requested(stops: runs.StopRequests, started: float, settings: TrainSettings, group: parallel.Group,
                    device) -> Tuple[str, int]:
    """Whether to stop now, the same answer on every rank: ("", 0) to go on, else (why, the signal or 0)."""
    out_of_time = bool(settings.max_hours) and time.perf_counter() - started > settings.max_hours * 3600
    flags = torch.tensor([float(stops.signum > 0), float(out_of_time)], device=device)
    flags = parallel.all_reduce_sum(group, flags).tolist()
    if flags[0] > 0:
        signum = stops.signum or signal.SIGTERM       # (when another rank got it)
        return f"stopped by {signal.Signals(signum).name}", int(signum)
    if flags[1] > 0:
        return f"time budget of {settings.max_hours} h reached", 0
    return "", 0


def epoch_order(train_idx: np.ndarray, settings: TrainSettings, epoch: int) -> np.ndarray:
    """The training frames of `epoch`, in the order they are trained on: a function of the seed and the epoch
    alone, so a resume recomputes it and goes on from the batch it stopped at."""
    generator = torch.Generator().manual_seed(settings.seed * 100_003 + epoch)
    order = train_idx[torch.randperm(len(train_idx), generator=generator).numpy()]
    if 0 < settings.frames_per_epoch < len(order):
        order = order[:settings.frames_per_epoch]
    return order


def read_checkpoint(path: str | Path, device="cpu", run_id: Optional[str] = None) -> dict:
    """The state in a training checkpoint (what a resume continues from); refused when damaged or when it belongs
    to another run than `run_id` (None: not checked, for callers without a record of the run)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"cannot resume: {path} does not exist")
    try:
        header, data = runs.unsealed(path.read_bytes(), path)
        if header is None and run_id:
            raise runs.SealError(f"{path} has no seal (size and SHA-256), which every checkpoint of this run has")
        state = torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    except runs.SealError as err:
        raise ModelFileError(f"cannot resume: {err}; the best model so far is {path.parent / 'model.pt'}") from None
    except Exception as err:   # truncated or corrupt bytes raise all sorts of errors from the unpickler
        raise ModelFileError(f"cannot resume: {path} is damaged ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''}); the best model so far is "
                             f"{path.parent / 'model.pt'}") from None
    if not isinstance(state, dict):
        raise ModelFileError(f"cannot resume: {path} is not a training checkpoint")
    if run_id is not None and state.get("run_id") != run_id:
        raise runs.RunFolderError(
            f"cannot resume: {path} belongs to another run (run id {state.get('run_id') or 'none'}) than "
            f"{path.parent / RECORD} records ({run_id}): copied in from elsewhere, or left by an earlier run in this "
            "folder. A resume continues exactly the run it names: restore its own checkpoint, or start this one again "
            "with --overwrite")
    return state


def _write_model(path: Path, config: SchNetConfig, weights: dict, metadata: dict) -> None:
    model = SchNet(config)
    model.load_state_dict(weights)
    save_model(model, path, metadata)


def train(data: Dataset, config: SchNetConfig, out_dir: str | Path, settings: TrainSettings,
          resume: bool = False, log: Callable[[str], None] = print, validation: Optional[Dataset] = None,
          on_start: Optional[Callable[[], None]] = None, init_state: Optional[dict] = None,
          run_id: Optional[str] = None) -> dict:
    """Train a SchNet on `data` (validated on `validation`, or on a random fraction of `data`); returns the
    summary also written to OUT/metrics.json.

    OUT is locked for the call (rank 0 holds it and writes every file). A new run first retires what an earlier
    run left there (model.pt, checkpoints, metrics.json, config.json: the caller decided they may go), once
    everything is checked; then `on_start` runs (train_from_config records config.json there, so a refused run
    changes nothing). `run_id` is stamped into every checkpoint, and a resume refuses a checkpoint of another run
    (None: a new run gets a fresh id, and a resume takes the checkpoint's).

    Each commit writes whole files (runs.atomic_write) in this order: checkpoint.pt (the whole state, with the
    weights model.pt should hold), model.pt, and when the run ends metrics.json. A resume writes model.pt again
    from the checkpoint and removes metrics.json until the run ends, so a process killed between any two writes
    resumes to the same files; a run killed after its last checkpoint is completed by a resume.

    `max_hours`, SIGTERM and SIGINT stop training at the next batch boundary after a checkpoint (a signal then
    raises runs.RunInterrupted). A checkpoint within an epoch (those and every `checkpoint_minutes`) holds the
    position in the epoch's frame order (epoch_order) and the running loss sum, so a resume goes on from that
    batch and ends where an uninterrupted run would.

    With `settings.frames_per_epoch`, each epoch draws that many training frames afresh: short epochs (a
    validation, a checkpoint and a best-model choice every few minutes) that together cover a large set, each
    frame at its share of the data."""
    out = Path(out_dir)
    with _holding(out), runs.StopRequests() as stops:
        return _train(data, config, out, settings, resume, log, validation, on_start, init_state, run_id, stops)


def _train(data, config, out, settings, resume, log, validation, on_start, init_state, run_id, stops) -> dict:
    if config.energy_unit != data.energy_unit:
        data = data.converted(config.energy_unit)          # the one conversion of labels into model units
    if validation is None:
        train_idx, val_idx = split_indices(len(data), settings.validation_fraction, settings.seed)
        val_data = data
    else:
        train_idx, val_idx = np.arange(len(data)), np.arange(len(validation))
        val_data = validation.converted(config.energy_unit) if validation.energy_unit != config.energy_unit \
            else validation
    if len(train_idx) < 1 or len(val_idx) < 1:
        raise ValueError(f"{data.source}: {len(data)} frame(s) leave {len(train_idx)} to train on and {len(val_idx)} "
                         "to validate on; at least one of each is needed (more data, or --validation-data)")
    device = _device(settings.device)
    group = parallel.setup(device)
    if group.active and device.type == "cuda":
        device = torch.device("cuda", group.local_rank)
    if not group.main:
        log = _silent                       # one voice: rank 0 logs and writes every file
    torch.manual_seed(settings.seed)
    model = SchNet(config)
    model.species(torch.as_tensor(sorted(set(data.elements) | set(val_data.elements))))
    if init_state is not None:                # fine-tuning: the base model's weights and statistics
        model.load_state_dict(init_state)
    elif group.main:
        fit_energy_statistics(data.subset(train_idx), model)
    model.to(device)
    for buffer in (model.readout.reference_energies, model.readout.shift, model.readout.scale):
        parallel.broadcast_from_main(group, buffer)    # fitted once, on rank 0, and shared
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, factor=settings.lr_factor, patience=settings.lr_patience, min_lr=settings.min_learning_rate)
    ema = None
    if settings.ema_decay > 0:
        ema = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(settings.ema_decay))
    history: list = []
    best, best_epoch, saved_epoch = math.inf, -1, -1
    saved = None                      # (weights, metadata) of model.pt, which the checkpoint carries
    # where training goes on: epoch, batches of it done, their loss sum and seconds; "finished": an early stop
    first_epoch, first_batch, loss_sum, epoch_seconds, finished = 0, 0, 0.0, 0.0, ""
    checkpoint_path = out / "checkpoint.pt"
    if resume:
        state = read_checkpoint(checkpoint_path, device, run_id)
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if ema is not None:
                ema.load_state_dict(state["ema"])
            history = json.loads(state["history"])
            best, best_epoch = float(state["best"]), int(state.get("best_epoch", -1))
            saved_epoch = int(state.get("saved_epoch", best_epoch))
            first_epoch = int(state["epoch"]) + 1
            first_batch, loss_sum = int(state.get("batch", 0)), float(state.get("loss_sum", 0.0))
            epoch_seconds, finished = float(state.get("epoch_seconds", 0.0)), str(state.get("finished", ""))
            if "saved_model" in state:
                saved = (state["saved_model"], json.loads(state["saved_metadata"]))
            run_id = run_id or state.get("run_id")
        except (RuntimeError, KeyError, ValueError, TypeError) as err:
            raise ModelFileError(f"cannot resume: {checkpoint_path} does not match this run's model and settings "
                                 f"({str(err).splitlines()[0]})") from None
        if first_epoch + (first_batch > 0) > settings.epochs or \
                ((finished or first_epoch >= settings.epochs) and (out / "metrics.json").is_file()):
            raise ValueError(f"{out} already finished ({finished}); there is nothing to continue" if finished else
                             f"{out} already finished {first_epoch} of {settings.epochs} epochs; give a larger "
                             "--epochs to continue it")
        log((f"resuming epoch {first_epoch + 1} after batch {first_batch}" if first_batch else
             f"resuming after epoch {first_epoch}") + f" (best validation loss {best:.5g})")
    run_id = run_id or runs.new_run_id()
    if group.main:
        if resume:
            (out / "metrics.json").unlink(missing_ok=True)     # written again when the run ends
            if saved is not None:         # (a process killed between checkpoint.pt and model.pt left the older one)
                _write_model(out / "model.pt", config, *saved)
        else:
            runs.claim(out, RECORD, RUN_FILES, "training", overwrite=True)
        if on_start is not None:
            on_start()

    def write_checkpoint(last_epoch: int, batch: int = 0, batch_loss_sum: float = 0.0, seconds: float = 0.0) -> None:
        """The whole state after epoch `last_epoch` (counted from 0; -1: none yet) and `batch` batches of the next,
        whose losses sum to `batch_loss_sum` and which took `seconds`."""
        if not group.main:
            return
        state = {"run_id": run_id, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "epoch": last_epoch, "batch": batch,
                 "loss_sum": batch_loss_sum, "epoch_seconds": seconds, "best": best, "best_epoch": best_epoch,
                 "saved_epoch": saved_epoch, "history": json.dumps(history), "finished": finished}
        if ema is not None:
            state["ema"] = ema.state_dict()
        if saved is not None:
            state["saved_model"], state["saved_metadata"] = saved[0], json.dumps(saved[1])
        # (no random state: the frame order is derived from seed and epoch, and training draws nothing else)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        # sealed with its SHA-256: a resume refuses a damaged checkpoint rather than training on (and writing
        # into model.pt, under a fresh checksum) whatever the damage left
        runs.atomic_write(checkpoint_path, runs.sealed(buffer.getvalue(), run_id=run_id))

    forward = None
    if group.active:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(BatchEnergy(model), device_ids=[device.index] if device.type == "cuda"
                                          else None)

    has_forces = data.forces is not None
    log(f"training {count_parameters(model):,} parameters on {len(train_idx)} frames ({data.source}), validating "
        f"on {len(val_idx)} ({val_data.source if validation is not None else 'random split'}); energies in "
        f"{config.energy_unit}; {'energies and forces' if has_forces else 'energies only'}; device {device}"
        + (f"; {group.world} processes, global batch {settings.batch_size}" if group.active else "")
        + (f"; {min(settings.frames_per_epoch, len(train_idx))} drawn afresh per epoch" if settings.frames_per_epoch
           else ""))
    started = time.perf_counter()
    last_checkpoint = started
    bar = None
    if sys.stderr.isatty() and group.main:
        from tqdm import tqdm
        bar = tqdm(total=settings.epochs, initial=first_epoch, unit="epoch", file=sys.stderr)
        log = bar.write
    # (without a terminal every epoch still logs a line: progress for log files and batch queues)
    stop_reason, stopped_by = "", 0
    for epoch in range(first_epoch, first_epoch if finished else settings.epochs):
        resumed_here = epoch == first_epoch
        t0 = time.perf_counter() - (epoch_seconds if resumed_here else 0.0)
        model.train()
        order = epoch_order(train_idx, settings, epoch)
        n_batches = first_batch if resumed_here else 0
        total = loss_sum if resumed_here else 0.0
        batches_per_epoch = -(-len(order) // settings.batch_size)
        last_line = time.perf_counter()
        for batch, weight, n_frames, n_atoms in global_batches(data, order[n_batches * settings.batch_size:],
                                                               settings.batch_size, group, device):
            if bar is None and time.perf_counter() - last_line > 60:   # long epochs in a log file: a line a minute
                log(f"epoch {epoch + 1}: batch {n_batches}/{batches_per_epoch}, mean loss so far "
                    f"{total / max(n_batches, 1):.5g}")
                last_line = time.perf_counter()
            energies, forces = predict_batch(model, batch, create_graph=has_forces, need_forces=has_forces,
                                             forward=forward)
            # this rank's share of the global batch's loss (sums over its frames / the global counts); DDP
            # averages gradients over ranks, so the share is scaled by the world size
            frame_weight = batch["weights"]        # None: every frame counts once
            e2 = (energies - batch["energies"]) ** 2
            loss = (e2 if frame_weight is None else frame_weight * e2).sum() / n_frames
            if has_forces:
                f2 = ((forces - batch["forces"]) ** 2).sum(dim=1)
                if frame_weight is not None:
                    f2 = frame_weight[batch["molecule"]] * f2
                loss = settings.rho * loss + f2.sum() / n_atoms
            loss = loss * (weight * group.world)
            global_loss = parallel.all_reduce_sum(group, loss.detach().clone()) / group.world
            if not torch.isfinite(global_loss):
                kept = f"{out / 'model.pt'} keeps the model of epoch {saved_epoch + 1}" if saved_epoch >= 0 \
                    else "no model was saved"
                raise TrainingError(f"training diverged: the loss became {float(global_loss)} at epoch {epoch + 1}, batch "
                                    f"{n_batches + 1}; {kept}, {checkpoint_path} the state of its last checkpoint. "
                                    "Try a smaller --lr.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            step = epoch * batches_per_epoch + n_batches
            if step < settings.warmup_steps:            # (reaches the full rate before the scheduler first acts)
                for group_lr in optimizer.param_groups:
                    group_lr["lr"] = settings.learning_rate * (step + 1) / settings.warmup_steps
            optimizer.step()
            if ema is not None:
                ema.update_parameters(model)
            total += float(global_loss)
            n_batches += 1
            stop_reason, stopped_by = _stop_requested(stops, started, settings, group, device)
            due = bool(settings.checkpoint_minutes) and \
                time.perf_counter() - last_checkpoint > 60 * settings.checkpoint_minutes
            if stop_reason or (due and n_batches < batches_per_epoch):     # (an epoch's end checkpoints anyway)
                write_checkpoint(epoch - 1, n_batches, total, time.perf_counter() - t0)
                last_checkpoint = time.perf_counter()
            if stop_reason:
                stop_reason += f" in epoch {epoch + 1}, after batch {n_batches} of {batches_per_epoch}"
                break
        if stop_reason:
            break
        evaluated = ema.module if ema is not None else model
        evaluated.eval()
        metrics = evaluate_split(evaluated, val_data, val_idx, group=group)
        val_loss = (settings.rho * metrics["energy_rmse"] ** 2 + 3 * metrics["forces_rmse"] ** 2) if has_forces \
            else metrics["energy_rmse"] ** 2
        if not math.isfinite(val_loss):
            raise TrainingError(f"training diverged: the validation loss became {val_loss} at epoch {epoch + 1}; "
                                + (f"{out / 'model.pt'} keeps the model of epoch {saved_epoch + 1}"
                                   if saved_epoch >= 0 else "no model was saved") + ". Try a smaller --lr.")
        scheduler.step(val_loss)
        row = {"epoch": epoch, "train_loss": total / max(n_batches, 1), "validation_loss": val_loss,
               "learning_rate": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - t0,
               **{f"validation_{k}": v for k, v in metrics.items()}}
        history.append(row)
        improved = val_loss < best
        if improved:
            best, best_epoch = val_loss, epoch
        new_model = improved or (settings.keep_within > 0 and val_loss <= (1 + settings.keep_within) * best)
        if new_model:
            saved_epoch = epoch
            saved = ({k: v.detach().to("cpu", copy=True) for k, v in evaluated.state_dict().items()},
                     _metadata(data, val_data, config, settings, len(train_idx), len(val_idx), epoch, metrics, run_id))
        stop_reason, stopped_by = _stop_requested(stops, started, settings, group, device)    # (asked on every rank)
        if settings.early_stopping_patience and epoch - best_epoch >= settings.early_stopping_patience:
            stop_reason = finished = f"early stop: no improvement for {settings.early_stopping_patience} epochs"
            stopped_by = 0
        elif epoch + 1 == settings.epochs:
            stop_reason, stopped_by = "", 0       # the run is complete: a budget or signal now changes nothing
        elif stop_reason:
            stop_reason += f" after epoch {epoch + 1}"
        write_checkpoint(epoch)
        last_checkpoint = time.perf_counter()
        if new_model and group.main:
            save_model(evaluated, out / "model.pt", saved[1])
        force_part = f"  F MAE {metrics['forces_mae']:.4f}" if has_forces else ""
        log(f"epoch {epoch + 1:5d}/{settings.epochs}  loss {row['train_loss']:.5g}  val E MAE "
            f"{metrics['energy_mae']:.4f}{force_part} {config.energy_unit}(/Å)  lr {row['learning_rate']:.2g}"
            f"  {row['seconds']:.1f}s")
        if bar is not None:
            bar.update(1)
            bar.set_postfix({"val E MAE": f"{metrics['energy_mae']:.4g}",
                             **({"F MAE": f"{metrics['forces_mae']:.4g}"} if has_forces else {})})
        if stop_reason:
            break
    if bar is not None:
        bar.close()
    if stopped_by:
        log(stop_reason)
        raise runs.RunInterrupted(f"training in {out} {stop_reason}; its checkpoint is written and a resume "
                                  "continues from there", stopped_by)
    out_of_time = bool(stop_reason) and not finished
    stop_reason = (stop_reason + " (resume continues)") if out_of_time else (finished or "epochs done")
    log(stop_reason)
    summary = {"run_id": run_id, "history": history, "best_validation_loss": best, "best_epoch": best_epoch + 1,
               "model_epoch": saved_epoch + 1, "stop_reason": stop_reason, "finished": not out_of_time,
               "energy_unit": config.energy_unit, "n_train": len(train_idx),
               "n_validation": len(val_idx), "wall_seconds_this_run": time.perf_counter() - started,
               "settings": asdict(settings), "model": config.to_dict(), "processes": group.world}
    if group.main:
        runs.write_json(out / "metrics.json", summary)
    parallel.barrier(group)
    return summary


def _metadata(data, val_data, config, settings, n_train, n_val, epoch, metrics, run_id) -> dict:
    from .data import LABEL_SETS

    return {
        "schnet_md_version": __version__,
        "preset": config.preset,
        "units": {"length": "Angstrom", "energy": config.energy_unit},
        # which labels, and so which energy zero, the reference energies were fitted to ({}: the data do not say)
        "labels": {"set": data.label_set, "energy_zero": LABEL_SETS[data.label_set]} if data.label_set else {},
        "training": {"data": data.source, "data_sha256": data.sha256, "validation_data": val_data.source,
                     "n_train": n_train, "n_validation": n_val, "epoch": epoch + 1, "run_id": run_id,
                     "settings": asdict(settings), "validation": metrics},
    }


# ---- configuration: a TOML file ([data], [model], [training]) plus command-line overrides ----------

DATA_DEFAULTS = {"path": None, "format": "auto", "labels": "new", "split": "train", "max_frames": 0,
                 "energy_unit": None, "validation_path": None, "validation_split": "validation", "energy_only": False}
MODEL_DEFAULTS = {"preset": "schnet2017"}
TABLES = ("data", "model", "training")


def asked_settings(file: Optional[str | Path] = None, overrides: Optional[dict] = None) -> dict:
    """What is asked, without defaults: the config file's values, then the overrides that are not None
    ({'data': {...}, 'model': {...}, 'training': {...}})."""
    import tomllib

    layers = []
    if file is not None:
        try:
            layers.append(tomllib.loads(Path(file).read_text()))
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise ValueError(f"cannot read config file {file}: {err}") from None
    layers.append(overrides or {})
    asked: dict = {}
    for layer in layers:
        unknown = set(layer) - set(TABLES)
        if unknown:
            raise ValueError(f"unknown config table(s) {', '.join(sorted(unknown))}; use [data], [model], [training]")
        for table, values in layer.items():
            asked.setdefault(table, {}).update({k: v for k, v in values.items() if v is not None})
    return asked


def resolve_config(file: Optional[str | Path] = None, overrides: Optional[dict] = None) -> dict:
    """Defaults < config file < overrides ({'data': {...}, 'model': {...}, 'training': {...}})."""
    asked = asked_settings(file, overrides)
    config = {"data": dict(DATA_DEFAULTS), "model": dict(MODEL_DEFAULTS), "training": asdict(TrainSettings())}
    for table, values in asked.items():
        config[table].update(values)
    unknown = set(config["data"]) - set(DATA_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown [data] key(s) {', '.join(sorted(unknown))}; known: {', '.join(DATA_DEFAULTS)}")
    if not isinstance(config["data"]["energy_only"], bool):
        raise ValueError(f"[data] energy_only must be true or false, got {config['data']['energy_only']!r}")
    model_keys = ({f.name for f in fields(SchNetConfig)} - {"elements", "energy_unit"}) | {"init"}
    unknown = set(config["model"]) - model_keys
    if unknown:
        raise ValueError(f"unknown [model] key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(model_keys))}")
    TrainSettings.from_dict(config["training"])   # validates the keys
    if not config["data"]["path"]:
        raise ValueError("no training data: give --data FILE or [data] path in the config file")
    # chosen once the data is read
    config["_size_defaults"] = sorted(set(SIZE_DEFAULT_KEYS) - set(asked.get("training", {})))
    if file is not None:
        config["_config_file"] = str(Path(file).resolve())     # recorded with the run's inputs
    return config


SIZE_DEFAULT_KEYS = ("batch_size", "lr_patience", "ema_decay", "epochs")


def size_defaults(n_train: int) -> dict:
    """The settings behind the project's published numbers (benchmarks/accuracy.py), by training-set size:
    the (r)MD17 protocol up to 5,000 frames, QM9's up to 60,000, iso17x's beyond. Long epochs budgets are
    meant to be cut by --max-hours or early stopping."""
    if n_train <= 5000:
        return dict(batch_size=16, lr_patience=25, ema_decay=0.99, epochs=5000)
    if n_train <= 60000:
        return dict(batch_size=32, lr_patience=10, ema_decay=0.999, epochs=2000)
    return dict(batch_size=32, lr_patience=3, ema_decay=0.999, epochs=200)


def _labels_note(init, base_labels: str, data) -> Optional[str]:
    """One line when --init crosses label sets (or cannot tell): the base model's reference energies were fitted
    to its labels' energy zero, and fine-tuning moves its energies onto the new one."""
    from .data import compare_labels

    found = compare_labels(f"--init {init}", base_labels, data)
    if found is None:
        return None
    kind, message = found
    if kind == "note":
        return f"note: {message}"
    return (f"{message}: fine-tuning starts from the base model's energy zero (its per-element reference energies), "
            "so its energies will shift to the new labels' as it trains")


# ---- a run folder's record, and what a resume may change ---------------------------------------------

# how long the recorded run goes on, where it runs and how often it checkpoints; nothing that changes its result
RESUME_MAY_CHANGE = {("training", "epochs"), ("training", "max_hours"), ("training", "device"),
                     ("training", "checkpoint_minutes")}
PATH_SETTINGS = (("data", "path"), ("data", "validation_path"), ("model", "init"))
RESUME_READS = ("data", "validation_data", "init")     # the recorded input files a resume reads again


def _absolute(value):
    """A path setting as the absolute path it names; a name that is no file here (a shipped model) stays."""
    return str(Path(value).resolve()) if isinstance(value, str) and Path(value).exists() else value


def _input_records(config: dict, config_file: Optional[str]) -> dict:
    """The files a run reads, by absolute path, size and SHA-256, as config.json keeps them. The config file is
    kept for the record: its settings are in config.json, and a resume compares those one by one."""
    from .modelfile import resolve_model_path

    init = config["model"].get("init")
    files = {"data": config["data"]["path"], "validation_data": config["data"]["validation_path"],
             "init": init and resolve_model_path(init), "config_file": config_file}
    return {name: runs.input_record(path) for name, path in files.items() if path}


def recorded_run(out_dir: str | Path) -> dict:
    """The record (config.json) of the training run in OUT_DIR, which must have a checkpoint to go on from."""
    out = Path(out_dir)
    if not (out / RECORD).is_file():
        raise ValueError(f"cannot resume: {out} holds no training run ({RECORD} is missing); start one without "
                         "--resume")
    record = runs.read_json(out / RECORD, "training run's record")
    if not all(isinstance(record.get(table), dict) for table in TABLES):
        raise runs.RunFolderError(f"{out / RECORD} (the training run's record) is damaged: it lacks its data, model "
                                  "or training settings; restore it, or start a new run with --overwrite")
    if not (out / "checkpoint.pt").is_file():
        raise ValueError(f"cannot resume: the run in {out} stopped before its first checkpoint ({RECORD} but no "
                         "checkpoint.pt), so there is nothing to continue; start it again with --overwrite")
    return record


def resumed_config(out_dir: str | Path, asked: Optional[dict] = None) -> dict:
    """The record of the run in OUT_DIR with the changes `asked` may make on a resume (RESUME_MAY_CHANGE). Any
    other asked setting that differs from the record is refused, by name: a resume continues exactly the run it
    names. `asked`: the settings given again (asked_settings's, or a whole resolve_config's, whose settings left
    to the data's size count as not asked)."""
    record = recorded_run(out_dir)
    asked = asked or {}
    automatic = set(asked.get("_size_defaults", ()))
    given = {(table, key): value for table in TABLES for key, value in asked.get(table, {}).items()
             if value is not None and not (table == "training" and key in automatic)}
    changed = []
    for (table, key), value in given.items():
        was = record[table].get(key)
        if (table, key) in PATH_SETTINGS:
            value, was = _absolute(value), _absolute(was)
        if value != was and (table, key) not in RESUME_MAY_CHANGE:
            changed.append(f"{table}.{key} (recorded {was!r}, asked {value!r})")
    if changed:
        may = sorted(key for _, key in RESUME_MAY_CHANGE)
        raise ValueError("--resume continues the recorded run exactly, but these settings differ from it: "
                         + "; ".join(changed) + f". Only {', '.join(may)} ("
                         + ", ".join("--" + key.replace("_", "-") for key in may) + ") may change; start a new "
                         "run (another --out, or --overwrite) for anything else.")
    for (table, key), value in given.items():
        if (table, key) in RESUME_MAY_CHANGE:
            record[table][key] = value
    return record


def train_from_config(config: Optional[dict], out_dir: str | Path, resume: bool = False, overwrite: bool = False,
                      log: Callable[[str], None] = print) -> dict:
    """Read the data a config names, build the model config, train in OUT_DIR, holding the folder (one writer).

    A new run (`config` from resolve_config): a folder that holds a run, or files train writes, is refused unless
    `overwrite`, which retires the old run's files before anything new is written. config.json records the
    settings (data paths made absolute), a new run id and the input files (absolute path, size, SHA-256).
    A resume (`resume=True`; `config`: what is asked again, or None) continues the recorded run exactly:
    resumed_config refuses changed settings, and changed input files and a checkpoint of another run are refused
    by name."""
    if resume and overwrite:
        raise ValueError("--resume continues the run in the output folder and --overwrite replaces it: give one")
    from .data import read_data
    from .model import config_from_preset

    out = Path(out_dir)
    main = parallel.main_process()
    with _holding(out):
        if resume:
            record = resumed_config(out, config)
            run_id, inputs, config_file = record.get("run_id"), record.get("inputs", {}), None
            if main:
                runs.require_inputs([inputs[name] for name in RESUME_READS if name in inputs], out)
            config = resolve_config(None, {table: record[table] for table in TABLES})
            config.pop("_size_defaults")       # the recorded run's settings, as they were
        else:
            config = copy.deepcopy(config)
            config_file = config.pop("_config_file", None)
            if main and not overwrite:         # refused before any data is read
                runs.claim(out, RECORD, RUN_FILES, "training", overwrite=False)
            run_id, inputs = runs.new_run_id(), None
            for table, key in PATH_SETTINGS:   # a resume from another directory reads the same files
                if config[table].get(key):
                    config[table][key] = _absolute(config[table][key])

        d = config["data"]
        energy_only = d["energy_only"]          # (the validation set's forces are left out too: not scored)
        data = read_data(d["path"], d["format"], labels=d["labels"], split=d["split"], energy_only=energy_only)
        if d["max_frames"]:
            data = data.subset(range(min(int(d["max_frames"]), len(data))))
        validation = None
        if d["validation_path"]:
            validation = read_data(d["validation_path"], labels=d["labels"], split=d["validation_split"],
                                   energy_only=energy_only)
        elif d["format"] in ("auto", "iso17x") and Path(d["path"]).is_dir() and d["split"] == "train":
            validation = read_data(d["path"], "iso17x", split=d["validation_split"],     # iso17x's own split
                                   energy_only=energy_only)
        model_values = dict(config["model"])
        preset = model_values.pop("preset")
        init = model_values.pop("init", None)
        unit = d["energy_unit"] or data.energy_unit
        elements = sorted(set(data.elements) | set(validation.elements if validation is not None else []))
        try:
            model_config = config_from_preset(preset, elements, energy_unit=unit, **model_values)
        except TypeError as err:   # e.g. n_features = "64" in the config file
            raise ValueError(f"[model] settings are not valid: {err}") from None
        init_state = None
        if init:
            from .modelfile import load_model, trained_labels

            base, base_metadata = load_model(init)
            missing = sorted(set(elements) - set(base.config.elements))
            if missing:
                raise ValueError(f"--init {init} was trained for elements {base.config.elements}; the data also has "
                                 f"{missing}")
            model_config, init_state = base.config, base.state_dict()
            note = _labels_note(init, trained_labels(base_metadata), data)
            if note:
                log(note)
        auto = config.pop("_size_defaults", [])
        if auto:
            n_train = len(data) if validation is not None else \
                len(data) - max(1, int(round(config["training"]["validation_fraction"] * len(data))))
            chosen = {k: v for k, v in size_defaults(n_train).items() if k in auto}
            config["training"].update(chosen)
            log(f"settings for {n_train} training frames (benchmarks/accuracy.py's protocol): "
                + ", ".join(f"{k} {v}" for k, v in chosen.items()))

        def record_run():               # once everything is checked, so a refused run changes nothing
            record = {"run_id": run_id} if run_id else {}     # (none: a run recorded before run ids)
            record.update({table: config[table] for table in TABLES})
            record["inputs"] = inputs if inputs is not None else _input_records(config, config_file)
            runs.write_json(out / RECORD, record)

        return train(data, model_config, out, TrainSettings.from_dict(config["training"]), resume=resume, log=log,
                     validation=validation, on_start=record_run, init_state=init_state, run_id=run_id)
