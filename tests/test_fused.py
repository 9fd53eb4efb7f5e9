"""The fused Triton CFConv (schnet_md/fused.py) against the reference SchNet, run on the CPU in Triton's
interpreter: energies and forces of molecules (all pairs, half and full lists; with and without the filter
network's last activation; schnet2017's 301 Gaussians and schnet2018's cosine cutoff), of a periodic water box
through the cell list, and through OpenMM's PythonForce (`create_python_force(fused=True)`). Its speed is measured on a GPU (benchmarks/gpu/profile_cuda.py).

The interpreter has to be switched on before Triton compiles the kernels, so the checks run in a child
process with TRITON_INTERPRET=1."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT

pytest.importorskip("triton")

CHILD = textwrap.dedent("""
    import numpy as np, torch
    from conftest import random_model
    from schnet_md.export import build_module, inference_copy
    from schnet_md.fused import FusedSchNet, fused_atomic_energies
    from schnet_md.neighbors import unique_pairs

    def energy_and_forces(energy_of, positions):
        r = positions.clone().requires_grad_(True)
        e = energy_of(r)
        (g,) = torch.autograd.grad(e, r)
        return float(e), -g

    rng = np.random.default_rng(5)
    z = torch.tensor([6, 6, 8, 1, 1, 1, 1, 1, 1])
    positions = torch.tensor(rng.normal(size=(9, 3)) * 1.1, dtype=torch.float32)
    cases = [("schnet2017", dict(n_features=16, n_interactions=2), True),
             ("schnet2018", dict(n_features=32, n_interactions=2, filter_activation="none"), False)]
    for preset, sizes, half in cases:
        model = inference_copy(random_model(preset, elements=(1, 6, 8), dtype=torch.float32, **sizes))
        species = model.species(z)
        i, j = unique_pairs(9, torch.device("cpu"))
        if not half:
            i, j = torch.cat([i, j]), torch.cat([j, i])
        def reference(r):
            return model.atomic_energies(species, r[j] - r[i], i, j, half_list=half).sum()
        def fused(r):
            return fused_atomic_energies(model, species, r[j] - r[i], i, j, half_list=half).sum()
        e_ref, f_ref = energy_and_forces(reference, positions)
        e_fused, f_fused = energy_and_forces(fused, positions)
        assert abs(e_fused - e_ref) < 1e-4 * max(1.0, abs(e_ref)), (preset, e_fused, e_ref)
        torch.testing.assert_close(f_fused, f_ref, rtol=1e-4, atol=1e-4)
        print(preset, "half" if half else "full", "ok", e_ref, float(f_ref.abs().max()))

    # a periodic water box through the exported module's cell list, the model swapped for the fused one
    from schnet_md.bench import water_box_arrays
    zw, pos_nm, box = water_box_arrays(250)
    model = random_model("schnet2018", elements=(1, 8), dtype=torch.float32, n_features=16, n_interactions=2,
                         cutoff=3.0)
    reference, meta = build_module(model, zw, periodic=True, box_nm=box, positions_nm=pos_nm,
                                   neighbor_list="cells", check_errors=False, script=False)
    fused, _ = build_module(model, zw, periodic=True, box_nm=box, positions_nm=pos_nm, neighbor_list="cells",
                            check_errors=False, script=False)
    fused.model = FusedSchNet(fused.model)
    assert meta["neighbor_list"] == "cells"
    x = torch.tensor(pos_nm, dtype=torch.float32)
    b = torch.tensor(box, dtype=torch.float32)
    e_ref, f_ref = energy_and_forces(lambda r: reference(r, b), x)
    e_fused, f_fused = energy_and_forces(lambda r: fused(r, b), x)
    assert abs(e_fused - e_ref) < 1e-5 * abs(e_ref), (e_fused, e_ref)
    torch.testing.assert_close(f_fused, f_ref, rtol=1e-3, atol=1e-3)
    print("water box cells ok", e_ref, float(f_ref.abs().max()))

    # end to end in OpenMM: the PythonForce with fused=True against the plain PythonForce
    import openmm
    from schnet_md.export import create_python_force
    model = random_model("schnet2018", elements=(1, 6, 8), dtype=torch.float32, n_features=16, n_interactions=2)
    states = []
    for fused_force in (False, True):
        system = openmm.System()
        for zz in z.tolist():
            system.addParticle(1.0)
        system.addForce(create_python_force(model, z.tolist(), fused=fused_force))
        context = openmm.Context(system, openmm.VerletIntegrator(0.0005), openmm.Platform.getPlatformByName("Reference"))
        context.setPositions(positions.double().numpy() / 10.0)
        state = context.getState(getEnergy=True, getForces=True)
        states.append((state.getPotentialEnergy()._value, state.getForces(asNumpy=True)._value))
    assert abs(states[1][0] - states[0][0]) < 1e-4 * max(1.0, abs(states[0][0]))
    np.testing.assert_allclose(states[1][1], states[0][1], rtol=1e-3, atol=1e-3)
    print("OpenMM PythonForce fused ok", states[0][0])

    # inference only: trainable weights are refused
    trainable = random_model("schnet2018", elements=(1, 8), dtype=torch.float32, n_features=16, n_interactions=1)
    try:
        fused_atomic_energies(trainable, trainable.species(z[:3] * 0 + 1), positions[:2] - positions[:2], i[:1] * 0,
                              j[:1] * 0 + 1)
    except ValueError as error:
        assert "inference" in str(error)
        print("refuses trainable weights ok")
    else:
        raise AssertionError("trainable weights were accepted")
""")


def test_fused_cfconv_equals_the_reference_in_the_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    assert result.stdout.count(" ok") == 5, result.stdout


@pytest.mark.parametrize("options", [dict(compile=True), dict(dtype="float64")])
def test_fused_python_force_refuses_what_it_cannot_run(options):
    from schnet_md.export import create_python_force

    with pytest.raises(ValueError, match="float32 without torch.compile"):
        create_python_force("ethanol", [6, 6, 8, 1, 1, 1, 1, 1, 1], fused=True, **options)
