"""What a model file or an exported module holds is what gets computed (issue #28): one checksum over
everything that determines a number, a label set that travels with the model, and exports that know their
atoms. Each test fails without its change."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from conftest import random_model
from schnet_md.modelfile import ModelFileError, load_model, save_model, tensors_sha256


def small_model():
    return random_model(elements=(1, 6, 8), dtype=torch.float32, n_features=8, n_interactions=1)


# ---- the model file: one checksum over config, metadata and weights ------------------------------------------

def test_a_changed_config_or_metadata_is_refused(tmp_path):
    """gamma 10 -> 30 in the config JSON changes every energy; the energy unit in the metadata changes what the
    numbers mean. The weights checksum of format 2 let both through."""
    path = save_model(small_model(), tmp_path / "model.pt", {"units": {"length": "Angstrom", "energy": "kcal/mol"}})
    data = path.read_bytes()
    for old, new in ((b'"gamma": 10.0', b'"gamma": 30.0'), (b'"energy": "kcal/mol"', b'"energy": "kcal/MOL"')):
        assert data.count(old) == 1
        changed = tmp_path / "changed.pt"
        changed.write_bytes(data.replace(old, new))
        with pytest.raises(ModelFileError, match="changed.pt is damaged: its config, metadata or weights do not match "
                                                 "the checksum"):
            load_model(changed)
    load_model(path)


def _older_file(path, version, model, metadata):
    payload = {"format": "schnet-md/model", "format_version": version, "config": json.dumps(model.config.to_dict()),
               "metadata": json.dumps(metadata), "state_dict": model.state_dict()}
    if version == 2:
        payload["tensors_sha256"] = tensors_sha256(payload["state_dict"])
    torch.save(payload, path)
    return path


@pytest.mark.parametrize("version", [1, 2])
def test_older_formats_load_with_a_one_line_warning(tmp_path, caplog, version):
    model = small_model()
    path = _older_file(tmp_path / f"v{version}.pt", version, model, {"preset": "custom"})
    with caplog.at_level(logging.WARNING, logger="schnet_md.modelfile"):
        loaded, metadata = load_model(path)
        load_model(path)                                       # said once per file, not at every load
    assert metadata == {"preset": "custom"}
    assert torch.equal(loaded.readout.reference_energies, model.readout.reference_energies)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert f"v{version}.pt is a model file of format {version}" in lines[0] and "not its config" in lines[0]


def test_saving_again_gives_the_current_format_with_the_same_numbers(tmp_path, ethanol):
    z, r = ethanol
    model = small_model()
    old = _older_file(tmp_path / "old.pt", 2, model, {"preset": "custom"})
    loaded, metadata = load_model(old)
    new = save_model(loaded, tmp_path / "new.pt", metadata)
    assert torch.load(new, weights_only=True)["format_version"] == 3
    again, _ = load_model(new)
    assert torch.equal(again(z, r.float()), model(z, r.float()))
