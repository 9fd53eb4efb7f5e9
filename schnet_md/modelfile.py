"""The model file: tensors plus JSON metadata, never code.

`train` writes it; export, evaluate, simulate and every adapter read it through `load_model`. It is
read with torch's weights-only loader, so opening a file someone shared cannot execute code.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Tuple

import torch

from .model import SchNet, SchNetConfig

MODELS_DIR = Path(__file__).resolve().parent / "models"
FORMAT = "schnet-md/model"
FORMAT_VERSION = 3          # 3: one SHA-256 over config, metadata and tensors (2: tensors only; 1: none)
READABLE_VERSIONS = (1, 2, 3)

_log = logging.getLogger(__name__)
_warned: set = set()


class ModelFileError(ValueError):
    """A model file that is missing, damaged, of the wrong kind, or carries code."""


PRECISIONS = {"float32": torch.float32, "float64": torch.float64}


def _add_tensors(digest, state_dict: dict) -> None:
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")


def tensors_sha256(state_dict: dict) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of the tensors, in name order (format 2's checksum)."""
    digest = hashlib.sha256()
    _add_tensors(digest, state_dict)
    return digest.hexdigest()


def contents_sha256(config: str, metadata: str, state_dict: dict) -> str:
    """SHA-256 over everything that determines a number: the config JSON (architecture, element table, energy
    unit), the metadata JSON (units, training record) and the tensors (weights and energy statistics)."""
    digest = hashlib.sha256()
    for name, text in (("config", config), ("metadata", metadata)):
        data = text.encode()
        digest.update(f"{name}|{len(data)}|".encode() + data)
    _add_tensors(digest, state_dict)
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
    payload["sha256"] = contents_sha256(payload["config"], payload["metadata"], payload["state_dict"])
    from .runs import atomic_write

    return atomic_write(path, writer=lambda fh: torch.save(payload, fh))


def trained_labels(metadata: dict) -> str:
    """The label set a model was trained on (a key of data.LABEL_SETS), "" if its file does not record one."""
    return (metadata.get("labels") or {}).get("set") or ""


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
    if path.is_dir():
        inside = path / "model.pt"
        raise ModelFileError(f"{path} is a folder, not a model file" +
                             (f"; did you mean {inside}?" if inside.is_file() else ""))
    raise ModelFileError(f"model {spec} is neither a file nor a shipped model "
                         f"(shipped: {', '.join(shipped) or 'none'})")


# What a file that is not a model file is, for the one-line error that says so.
FILE_KINDS = {
    "openmm-force": "an exported OpenMM force (TorchScript, written by `schnet-md export`)",
    "lammps-module": "an exported LAMMPS module (TorchScript, written by `schnet-md export --engine lammps`)",
    "torchscript": "a TorchScript module",
    "npz": "a NumPy .npz archive (a data set?)",
    "pdb": "a PDB structure file",
    "xyz": "an XYZ structure file",
    "text": "a text file",
    "empty": "an empty file",
}
EXPORT_METADATA_FILE = "schnet_md.json"   # the TorchScript extra file of every schnet-md export


def file_kind(path: str | os.PathLike) -> str:
    """What a file is, from its first bytes and, for a zip archive, the names inside: one of FILE_KINDS,
    'archive' (a torch.save zip: perhaps a model file) or 'unknown' (binary: let the loader judge)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError:
        return "unknown"
    if not head:
        return "empty"
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
                exported = [n for n in names if n.endswith("/extra/" + EXPORT_METADATA_FILE)]
                if exported:
                    kind = json.loads(archive.read(exported[0])).get("format")
                    return {"schnet-md/openmm-force": "openmm-force", "schnet-md/lammps": "lammps-module"}.get(
                        kind, "torchscript")
        except (zipfile.BadZipFile, OSError, ValueError, AttributeError):
            return "unknown"
        if any("/code/" in name for name in names):
            return "torchscript"
        if names and all(name.endswith(".npy") for name in names):
            return "npz"
        return "archive"
    if b"\0" in head:
        return "unknown"
    text = head.decode("utf-8", errors="replace")
    if re.search(r"^(ATOM  |HETATM|CRYST1|HEADER)", text, re.MULTILINE):
        return "pdb"
    if text.split("\n", 1)[0].strip().isdigit():
        return "xyz"
    return "text"


def warn_once(path: Path, message: str) -> None:
    """A one-line warning about a file, once per file and process (older files are loaded again and again)."""
    key = (str(path.resolve()), message)
    if key not in _warned:
        _warned.add(key)
        _log.warning(f"warning: {message}")


def _checksum_matches(payload: dict) -> bool:
    try:   # a payload whose parts have the wrong types does not match
        if payload["format_version"] >= 3:
            return payload.get("sha256") == contents_sha256(payload["config"], payload["metadata"],
                                                            payload["state_dict"])
        return payload.get("tensors_sha256") == tensors_sha256(payload["state_dict"])
    except Exception:
        return False


def load_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Tuple[SchNet, dict]:
    """Read a model file (or a shipped model by name); returns (model in eval mode, metadata).
    Raises ModelFileError on missing, damaged or foreign files."""
    path = resolve_model_path(path)
    kind = file_kind(path)
    if kind in FILE_KINDS:
        raise ModelFileError(f"{path} is {FILE_KINDS[kind]}, not a schnet-md model file: give the model.pt that "
                             f"`schnet-md train` writes, or a shipped model name ({', '.join(shipped_models())})")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        raise ModelFileError(
            f"{path} was refused by the weights-only loader: it holds objects other than tensors and plain data "
            f"(possibly code{', ' + found.group(1) if found else ''}), so it is not a schnet-md model file and was "
            "not opened") from None
    except Exception as err:   # on corrupt bytes the unpickler raises nearly anything (IndexError, KeyError, ...)
        raise ModelFileError(f"{path} is not a readable model file (damaged or truncated?): {_reason(err)}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelFileError(f"{path} is not a schnet-md model file (no '{FORMAT}' marker)")
    version = payload.get("format_version")
    if version not in READABLE_VERSIONS:
        raise ModelFileError(f"{path} has model format version {version}; "
                             f"this schnet-md reads versions {', '.join(map(str, READABLE_VERSIONS))}")
    if version >= 2 and not _checksum_matches(payload):
        damaged = "its config, metadata or weights do not" if version >= 3 else "its weights do not"
        raise ModelFileError(f"{path} is damaged: {damaged} match the checksum written with them (a copy cut short "
                             "or altered?); get the file again")
    if version < FORMAT_VERSION:
        warn_once(path, f"{path} is a model file of format {version}: its checksum covers "
                        f"{'nothing' if version == 1 else 'only the weights'}, not its config, element table, energy "
                        "statistics or metadata; save it again with this schnet-md (modelfile.save_model) to cover them")
    try:
        config = SchNetConfig(**json.loads(payload["config"]))
        metadata = json.loads(payload["metadata"])
        model = SchNet(config)
        model.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise ModelFileError(f"{path} has an inconsistent config or weights: {err}") from None
    return model.to(dtype).eval(), metadata


def _reason(err: Exception) -> str:
    """The first line of a loader's error, without torch's advice to load with weights_only=False (which
    would run any code in the file)."""
    text = str(err).strip()
    if not text or "weights_only" in text:
        return type(err).__name__
    return f"{type(err).__name__}: {text.splitlines()[0]}"
