"""Physics of the model itself: exact forces, and the symmetries of the energy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import random_model, random_rotation, reduced_box
from schnet_md.model import CosineCutoff, GaussianExpansion, energy_and_forces, shifted_softplus

PRESETS = [("schnet2017", {}), ("schnet2018", dict(n_features=32, n_interactions=3))]


def test_building_blocks_match_the_paper():
    assert float(shifted_softplus(torch.tensor(0.0))) == 0.0
    x = torch.linspace(-5, 5, 11, dtype=torch.float64)
    assert torch.allclose(shifted_softplus(x), torch.log(0.5 * torch.exp(x) + 0.5))
    g = GaussianExpansion(0.0, 30.0, 301, 10.0).double()
    d = torch.tensor([0.0, 1.23, 7.7, 29.99, 45.0], dtype=torch.float64)
    exact = torch.exp(-10.0 * (d[:, None] - g.mu) ** 2)
    # the clamped exponent (a CPU speed-up) changes nothing above 2e-35
    assert torch.allclose(g(d), exact, rtol=1e-15, atol=2e-35)
    assert torch.allclose(g(d)[1, 12], torch.exp(torch.tensor(-10.0 * (1.23 - 1.2) ** 2, dtype=torch.float64)),
                          rtol=1e-6)
    f = CosineCutoff(5.0)(torch.tensor([0.0, 2.5, 5.0, 6.0]))
    assert torch.allclose(f, torch.tensor([1.0, 0.5, 0.0, 0.0]), atol=1e-7)


@pytest.mark.parametrize("preset,overrides", PRESETS)
def test_forces_are_minus_gradient_by_central_differences(ethanol, preset, overrides):
    z, r = ethanol
    model = random_model(preset, **overrides)
    _, forces = energy_and_forces(model, z, r)
    h = 1e-4  # Å; float64 central differences: truncation ~h^2, rounding ~1e-16 E/h (measured optimum)
    fd = torch.zeros_like(r)
    with torch.no_grad():
        for a in range(r.shape[0]):
            for k in range(3):
                rp, rm = r.clone(), r.clone()
                rp[a, k] += h
                rm[a, k] -= h
                fd[a, k] = -(model(z, rp) - model(z, rm)) / (2 * h)
    rel = float(torch.linalg.norm(fd - forces) / torch.linalg.norm(forces))
    assert rel < 1e-6, rel


@pytest.mark.parametrize("preset,overrides", PRESETS)
def test_rotation_and_translation_invariance(ethanol, preset, overrides):
    z, r = ethanol
    model = random_model(preset, **overrides)
    e0, f0 = energy_and_forces(model, z, r)
    rng = np.random.default_rng(1)
    for _ in range(3):
        rot = random_rotation(rng)
        shift = torch.as_tensor(rng.normal(scale=10.0, size=3))
        e1, f1 = energy_and_forces(model, z, r @ rot.T + shift)
        assert torch.allclose(e1, e0, rtol=1e-12, atol=1e-10)
        assert torch.allclose(f1, f0 @ rot.T, atol=1e-9)   # forces rotate with the molecule


def test_permutation_of_identical_atoms(ethanol):
    z, r = ethanol
    model = random_model()
    e0, f0 = energy_and_forces(model, z, r)
    rng = np.random.default_rng(2)
    hydrogens = np.nonzero(z.numpy() == 1)[0]
    perm = rng.permutation(len(z))  # any relabelling of atoms, carrying their elements along
    e1, f1 = energy_and_forces(model, z[perm], r[perm])
    assert torch.allclose(e1, e0, rtol=1e-12, atol=1e-10)
    assert torch.allclose(f1, f0[perm], atol=1e-10)
    # swapping the positions of two hydrogens is the same molecule
    h1, h2 = hydrogens[:2]
    swap = np.arange(len(z))
    swap[[h1, h2]] = [h2, h1]
    e2, _ = energy_and_forces(model, z, r[swap])
    assert torch.allclose(e2, e0, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("kind", ["orthorhombic", "triclinic"])
def test_periodic_energy_is_invariant_under_wrapping(kind):
    rng = np.random.default_rng(3 if kind == "orthorhombic" else 4)
    box = reduced_box(kind, rng, size=11.0)
    model = random_model("schnet2018", n_features=16, n_interactions=2, cutoff=4.0)
    n = 24
    frac = torch.as_tensor(rng.random((n, 3)))
    r = frac @ box
    z = torch.as_tensor(rng.choice([1, 6, 8], size=n))
    e0, f0 = energy_and_forces(model, z, r, box)
    for _ in range(5):
        wrapped = r.clone()
        atom = int(rng.integers(n))
        wrapped[atom] += torch.as_tensor(rng.integers(-2, 3, size=3), dtype=torch.float64) @ box
        e1, f1 = energy_and_forces(model, z, wrapped, box)
        assert torch.allclose(e1, e0, rtol=1e-12, atol=1e-10)
        assert torch.allclose(f1, f0, atol=1e-9)
    # and under translating everything (periodic systems have no fixed origin)
    e2, f2 = energy_and_forces(model, z, r + torch.as_tensor(rng.normal(size=3) * 5), box)
    assert torch.allclose(e2, e0, rtol=1e-12, atol=1e-10)


def test_float32_default_and_float64_on_request(ethanol):
    z, r = ethanol
    m32 = random_model(dtype=torch.float32)
    m64 = random_model(dtype=torch.float64)
    with torch.no_grad():
        e32 = m32(z, r.float())
        e64 = m64(z, r)
    assert e32.dtype == torch.float32 and e64.dtype == torch.float64
    assert abs(float(e32) - float(e64)) < 1e-4 * max(1.0, abs(float(e64)))


@pytest.mark.parametrize("preset,overrides", PRESETS)
def test_half_pair_list_equals_full_pair_list(ethanol, preset, overrides):
    """Each filter W(r_ij) computed once and sent both ways gives what every ordered pair gives."""
    from schnet_md.neighbors import all_pairs, unique_pairs

    z, r = ethanol
    model = random_model(preset, **overrides)
    species = model.species(z)
    results = []
    for pairs, half in ((all_pairs, False), (unique_pairs, True)):
        x = r.clone().requires_grad_(True)
        i, j = pairs(len(z), r.device)
        energy = model.atomic_energies(species, x[j] - x[i], i, j, half_list=half).sum()
        results.append((energy.detach(), torch.autograd.grad(energy, x)[0]))
    assert torch.allclose(results[0][0], results[1][0], rtol=1e-13)
    assert torch.allclose(results[0][1], results[1][1], rtol=1e-10, atol=1e-11)


def test_model_is_torchscript_compatible(ethanol):
    z, r = ethanol
    model = random_model()
    scripted = torch.jit.script(model)
    assert torch.allclose(scripted(z, r), model(z, r), rtol=1e-12)


def test_model_at_leaves_the_callers_model_alone():
    """Converting precision for an export must not convert the model the caller still holds."""
    from schnet_md.modelfile import model_at

    model = random_model(dtype=torch.float64)
    converted, _ = model_at(model, "float32")
    assert converted.readout.scale.dtype == torch.float32
    assert model.readout.scale.dtype == torch.float64 and next(model.parameters()).dtype == torch.float64
