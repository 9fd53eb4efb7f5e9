"""schnetpack 2.x import: schnet-md reproduces schnetpack's own energies and forces (fixture written by
plugins/schnetpack/make_fixture.py where schnetpack is installed; CI needs no schnetpack)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from schnet_md.model import energy_forces_strain
from schnet_md.modelfile import load_model, save_model
from schnet_md.schnetpack_import import SchnetpackImportError, convert

FIXTURE = Path(__file__).parent / "fixtures" / "schnetpack_2.1.1.pt"


@pytest.fixture(scope="module")
def fixture():
    return torch.load(FIXTURE, weights_only=True)


def test_import_reproduces_schnetpack_energies_and_forces(fixture):
    model = convert(fixture["extracted"], fixture["elements"], energy_unit="eV")
    assert model.config.filter_activation == "none" and model.config.n_filters == 24
    assert model.config.readout_activation == "silu"
    assert fixture["schnetpack_version"].startswith("2.")
    for s in fixture["structures"]:
        cell = None if s["cell"] is None else s["cell"].numpy()
        e, f, _ = energy_forces_strain(model, s["numbers"].numpy(), s["positions"].numpy(), cell)
        assert e == pytest.approx(s["energy_eV"], rel=1e-10, abs=1e-9)
        np.testing.assert_allclose(f, s["forces_eV_A"].numpy(), rtol=1e-8, atol=1e-9)


def test_imported_model_file_round_trip_and_openmm(tmp_path, fixture):
    import openmm

    from schnet_md.export import create_torch_force

    model = convert(fixture["extracted"], fixture["elements"], energy_unit="eV")
    save_model(model, tmp_path / "imported.pt", {"source": "schnetpack"})
    loaded, meta = load_model(tmp_path / "imported.pt", dtype=torch.float64)
    s = fixture["structures"][0]
    system = openmm.System()
    for _ in range(len(s["numbers"])):
        system.addParticle(12.0)
    system.addForce(create_torch_force(loaded, s["numbers"].tolist(), dtype="float64"))
    context = openmm.Context(system, openmm.VerletIntegrator(1e-3), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(s["positions"].numpy() / 10)
    energy = context.getState(getEnergy=True).getPotentialEnergy()._value
    # saved as float32 weights: agreement to float32 precision, in kJ/mol (1 eV = 96.485 kJ/mol)
    assert energy == pytest.approx(s["energy_eV"] * 96.48533212331002, rel=1e-5)


def test_unsupported_variants_are_refused(fixture):
    import copy

    bad = copy.deepcopy(fixture["extracted"])
    bad["rbf_widths"] = bad["rbf_widths"] * torch.linspace(1, 2, len(bad["rbf_widths"]), dtype=torch.float64)
    with pytest.raises(SchnetpackImportError, match="widths differ"):
        convert(bad, [1, 6, 8])
    bad = copy.deepcopy(fixture["extracted"])
    bad["interactions"][0]["filter1"]["activation"] = "tanh"
    with pytest.raises(SchnetpackImportError, match="activations"):
        convert(bad, [1, 6, 8])
    with pytest.raises(SchnetpackImportError, match="not an extracted"):
        convert({"format": "other"}, [1])


def test_cli_import_from_an_extracted_file(tmp_path, fixture, capsys):
    from schnet_md.cli import main

    torch.save(fixture["extracted"], tmp_path / "extracted.pt")
    assert main(["import-schnetpack", str(tmp_path / "extracted.pt"), "--elements", "H", "C", "O",
                 "--out", str(tmp_path / "model.pt")]) == 0
    model, meta = load_model(tmp_path / "model.pt")
    assert model.config.elements == [1, 6, 8] and meta["units"]["energy"] == "eV"
