"""The model file: tensors plus JSON metadata, never code.

`train` writes it; export, evaluate, simulate and every adapter read it through `load_model`. It is
read with torch's weights-only loader, so opening a file someone shared cannot execute code.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
from pathlib import Path
from typing import Tuple

import torch

from .model import SchNet, SchNetConfig

MODELS_DIR = Path(__file__).resolve().parent / "models"
FORMAT = "schnet-md/model"
FORMAT_VERSION = 2          # 2: a SHA-256 of the tensors guards against damaged bytes (1 had none)
READABLE_VERSIONS = (1, 2)


class ModelFileError(ValueError):
    """A model file that is missing, damaged, of the wrong kind, or carries code."""


PRECISIONS = {"float32": torch.float32, "float64": torch.float64}


def tensors_sha256(state_dict: dict) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of the tensors, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def model_at(model, precision: str = "float32") -> Tuple[SchNet, dict]:
    """(model in eval mode at `precision`, metadata) from a SchNet, a model file or a shipped name."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be 'float32' or 'float64', got {precision!r}")
    if isinstance(model, SchNet):
        if model.readout.scale.dtype != PRECISIONS[precision]:
            model = copy.deepcopy(model)   # Module.to() converts in place: leave the caller's model as it was
        return model.to(PRECISIONS[precision]).eval(), {}
    return load_model(model, dtype=PRECISIONS[precision])


def save_model(model: SchNet, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write `model` (float32 weights) with its config and metadata. Written atomically."""
    path = Path(path)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": json.dumps(model.config.to_dict()),
        "metadata": json.dumps(metadata or {}),
        "state_dict": {k: v.detach().cpu().to(torch.float32) if v.is_floating_point() else v.detach().cpu()
                       for k, v in model.state_dict().items()},
    }
    payload["tensors_sha256"] = tensors_sha256(payload["state_dict"])
    from .runs import atomic_write

    return atomic_write(path, writer=lambda fh: torch.save(payload, fh))


def shipped_models() -> dict:
    """Names and paths of the trained models shipped inside the package (see models/*/MODEL_CARD.md)."""
    return {p.parent.name: p for p in sorted(MODELS_DIR.glob("*/model.pt"))}


def resolve_model_path(spec: str | os.PathLike) -> Path:
    """A model file path, or the name of a shipped model ('ethanol')."""
    path = Path(spec)
    if path.is_file():
        return path
    shipped = shipped_models()
    if str(spec) in shipped:
        return shipped[str(spec)]
    raise ModelFileError(f"model {spec} is neither a file nor a shipped model "
                         f"(shipped: {', '.join(shipped) or 'none'})")


def load_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Tuple[SchNet, dict]:
    """Read a model file (or a shipped model by name); returns (model in eval mode, metadata).
    Raises ModelFileError on missing, damaged or foreign files."""
    path = resolve_model_path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ModelFileError(
            f"{path} was refused by the weights-only loader: it holds objects other than tensors and plain "
            f"data (possibly code), so it is not a schnet-md model file and was not opened. ({err})") from None
    except Exception as err:   # on corrupt bytes the unpickler raises nearly anything (IndexError, KeyError, ...)
        raise ModelFileError(f"{path} is not a readable model file (damaged or truncated?): "
                             f"{type(err).__name__}: {err}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelFileError(f"{path} is not a schnet-md model file (no '{FORMAT}' marker)")
    if payload.get("format_version") not in READABLE_VERSIONS:
        raise ModelFileError(f"{path} has model format version {payload.get('format_version')}; "
                             f"this schnet-md reads versions {', '.join(map(str, READABLE_VERSIONS))}")
    if payload["format_version"] >= 2:
        try:
            intact = payload.get("tensors_sha256") == tensors_sha256(payload["state_dict"])
        except Exception:   # a state_dict that is not a dict of tensors
            intact = False
        if not intact:
            raise ModelFileError(f"{path} is damaged: its weights do not match the checksum written with them "
                                 "(a copy cut short or altered?); get the file again")
    try:
        config = SchNetConfig(**json.loads(payload["config"]))
        metadata = json.loads(payload["metadata"])
        model = SchNet(config)
        model.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise ModelFileError(f"{path} has an inconsistent config or weights: {err}") from None
    return model.to(dtype).eval(), metadata
