"""The README's Python example runs as written and gives the model's energy."""

from __future__ import annotations

import os

import pytest

from conftest import ROOT


def test_readme_python_example_runs():
    text = (ROOT / "README.md").read_text()
    block = text.split("## Python API", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        exec(compile(block, "README.md", "exec"), namespace)
    finally:
        os.chdir(cwd)
    import openmm

    system, pdb = namespace["system"], namespace["pdb"]
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(pdb.positions)
    energy = context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(openmm.unit.kilojoule_per_mole)
    assert energy == pytest.approx(-406182.0, abs=1.0)   # the shipped ethanol model at systems/ethanol
