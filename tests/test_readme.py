"""The README's Python example runs as written and gives the model's energy; shipped models cover the systems."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from conftest import ROOT


def readme_block(section: str) -> str:
    """The first Python block after the README heading `section`."""
    text = (ROOT / "README.md").read_text()
    return text.split(section, 1)[1].split("```python", 1)[1].split("```", 1)[0]


def run_in_root(block: str) -> dict:
    namespace: dict = {}
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        exec(compile(block, "README.md", "exec"), namespace)
    finally:
        os.chdir(cwd)
    return namespace


def test_readme_python_example_runs():
    namespace = run_in_root(readme_block("## Python API"))
    import openmm

    system, pdb = namespace["system"], namespace["pdb"]
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(pdb.positions)
    energy = context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(openmm.unit.kilojoule_per_mole)
    assert energy == pytest.approx(-406182.0, abs=1.0)   # the shipped ethanol model at systems/ethanol


SHIPPED_FOR_SYSTEM = {"ethanol": "ethanol", "aspirin": "aspirin", "iso17x": "c7o2h10_1",
                      "alanine-dipeptide": "alanine-dipeptide"}


def test_every_system_has_a_shipped_model_with_a_card():
    """Each ready-to-run system has a trained model in the package whose card and test metrics exist, and the
    model gives finite energies and forces of a sane size on that system."""
    from schnet_md.model import energy_and_forces
    from schnet_md.modelfile import load_model, shipped_models
    from schnet_md.structures import read_structure

    systems = {p.name for p in (ROOT / "systems").iterdir() if p.is_dir() and not p.name.startswith("_")}
    covered = set(SHIPPED_FOR_SYSTEM.values()) | {s for s in systems if s.startswith("c7o2h10_")}
    assert systems <= covered, f"systems without a shipped model: {sorted(systems - covered)}"
    models = shipped_models()
    for name, system in SHIPPED_FOR_SYSTEM.items():
        assert name in models
        card = models[name].with_name("MODEL_CARD.md").read_text()
        assert "## Test metrics" in card and "forces MAE" in card
        metrics = json.loads(models[name].with_name("metrics.json").read_text())
        assert all(np.isfinite(t["forces_mae_kcal_mol"]) for t in metrics["test"])
        model, _ = load_model(name, dtype=torch.float64)
        s = read_structure(ROOT / "systems" / system / f"{system}.pdb")
        energy, forces = energy_and_forces(model, torch.as_tensor(s.atomic_numbers),
                                           torch.as_tensor(s.positions_nm * 10.0))
        assert torch.isfinite(energy) and torch.isfinite(forces).all()
        assert float(forces.abs().max()) < 200.0    # near-equilibrium structures: no huge forces


def test_readme_metadynamics_example_runs(tmp_path):
    """The XML + metadynamics example, as written but 200 steps long and with its files in a scratch folder."""
    from conftest import isolated

    block = readme_block("## Saving a System, metadynamics")
    assert "meta.step(simulation, 100_000)" in block and 'biasDir="bias"' in block and "frequency=250, saveFrequency=1000" in block
    block = block.replace("100_000", "200").replace("frequency=250, saveFrequency=1000", "frequency=50, saveFrequency=100")
    block = block.replace('"system.xml"', repr(str(tmp_path / "system.xml")))
    block = block.replace('biasDir="bias"', f"biasDir={str(tmp_path)!r}")

    @isolated
    def run():
        namespace = run_in_root(block)
        free_energy = np.asarray(namespace["free_energy"]._value)
        assert np.isfinite(free_energy).all() and free_energy.max() > free_energy.min()

    run()
