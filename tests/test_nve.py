"""Energy conservation in NVE with the shipped ethanol model (float64 model, Reference platform).

Why these bounds: velocity Verlet is symplectic and second order, so with forces that are the exact
gradient of the energy it conserves a "shadow" energy that differs from E = K + U by O(dt^2). The
measured total energy therefore wobbles in a band whose width shrinks 4x when dt halves, with no
secular trend. Forces that are not -dE/dr (a unit mismatch between energy and force, a hard cutoff, a
detached term) break both: the band stops scaling as dt^2 and a drift appears that does not shrink.
Measured with the shipped model (0.5 ps at 300 K, `python` loop as in this test): RMS 0.056 kJ/mol at
0.5 fs and 0.0143 kJ/mol at 0.25 fs, ratio 3.93; linear drift 0.007 kJ/mol/ps at 0.25 fs.
"""

from __future__ import annotations

import numpy as np
import openmm
import pytest
import torch
from openmm import unit

from conftest import SYSTEMS
from schnet_md.export import create_torch_force
from schnet_md.modelfile import load_model, shipped_models
from schnet_md.structures import read_structure

DURATION_FS = 250.0
SAMPLE_FS = 2.0


def total_energy_series(timestep_fs: float, tabulate: bool = False) -> np.ndarray:
    structure = read_structure(SYSTEMS / "ethanol" / "ethanol.pdb")
    model, _ = load_model("ethanol", dtype=torch.float64)
    system = openmm.System()
    for atom in structure.topology.atoms():
        system.addParticle(atom.element.mass)
    system.addForce(create_torch_force(model, structure.topology, dtype="float64", tabulate=tabulate))
    integrator = openmm.VerletIntegrator(timestep_fs * unit.femtosecond)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(structure.openmm_positions())
    context.setVelocitiesToTemperature(300 * unit.kelvin, 1)
    every = int(round(SAMPLE_FS / timestep_fs))
    energies = []
    for _ in range(int(DURATION_FS / SAMPLE_FS)):
        integrator.step(every)
        state = context.getState(getEnergy=True)
        energies.append((state.getPotentialEnergy() + state.getKineticEnergy()).value_in_unit(unit.kilojoule_per_mole))
    return np.array(energies)


@pytest.mark.parametrize("tabulate", [False, True], ids=["network", "tabulated-filters"])
def test_nve_total_energy_is_conserved_to_second_order_in_dt(tabulate):
    """Also with the filters from spline tables (schnet_md.tabulated): C1 in the distance, so its forces are
    exact gradients of the energy it returns."""
    if "ethanol" not in shipped_models():
        pytest.fail("the shipped ethanol model is missing from schnet_md/models/")
    coarse, fine = total_energy_series(0.5, tabulate), total_energy_series(0.25, tabulate)
    assert np.isfinite(coarse).all() and np.isfinite(fine).all()
    ratio = coarse.std() / fine.std()
    assert 3.3 < ratio < 4.8, f"energy band shrank {ratio:.2f}x for dt/2 (Verlet with exact forces: 4x)"
    # no secular drift beyond the O(dt^2) wobble
    t_ps = np.arange(len(fine)) * SAMPLE_FS / 1000.0
    drift = abs(np.polyfit(t_ps, fine, 1)[0]) * t_ps[-1]
    assert drift < fine.max() - fine.min(), f"drift {drift:.4f} kJ/mol exceeds the fluctuation band"
    # and the band itself is small: under 0.05 kT (kT = 2.49 kJ/mol at 300 K) at 0.25 fs
    assert fine.std() < 0.05 * 2.494
