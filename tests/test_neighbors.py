"""In-graph neighbour search against a plain numpy brute force over periodic images."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from conftest import random_model, reduced_box
from schnet_md.neighbors import (all_pairs, batched_unique_pairs, box_heights, check_box, minimum_image,
                                unique_pairs)


def brute_force_pairs(positions: np.ndarray, box: np.ndarray | None, cutoff: float, reach: int = 5):
    """Every (i, j, vector) with i != j, over every periodic image of j within `reach` cells, closer
    than the cutoff (plain numpy, no minimum-image assumption)."""
    shifts = [np.zeros(3)] if box is None else [np.array(s) @ box
                                                for s in itertools.product(range(-reach, reach + 1), repeat=3)]
    found = []
    diff = positions[None, :, :] - positions[:, None, :]          # [i, j, 3] = r_j - r_i
    for shift in shifts:
        v = diff + shift
        d = np.linalg.norm(v, axis=-1)
        for i, j in zip(*np.nonzero((d < cutoff) & (d > 0))):
            found.append((int(i), int(j), v[i, j]))
    return found


def test_pair_lists_hold_every_pair_once():
    for n in (1, 2, 5, 19):
        i, j = all_pairs(n, torch.device("cpu"))
        got = sorted(zip(i.tolist(), j.tolist()))
        assert got == sorted(itertools.permutations(range(n), 2))
        i, j = unique_pairs(n, torch.device("cpu"))
        assert sorted(zip(i.tolist(), j.tolist())) == sorted(itertools.combinations(range(n), 2))
    i, j = batched_unique_pairs([3, 2], torch.device("cpu"))
    assert sorted(zip(i.tolist(), j.tolist())) == sorted(
        list(itertools.combinations(range(3), 2)) + list(itertools.combinations(range(3, 5), 2)))


@pytest.mark.parametrize("seed", range(4))
def test_molecule_pairs_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    pos = rng.random((15, 3)) * 8.0
    cutoff = 3.0
    i, j = all_pairs(15, torch.device("cpu"))
    v = torch.as_tensor(pos)[j] - torch.as_tensor(pos)[i]
    d = torch.linalg.norm(v, dim=1)
    ours = {(a, b) for a, b, dist in zip(i.tolist(), j.tolist(), d.tolist()) if dist < cutoff}
    assert ours == {(a, b) for a, b, _ in brute_force_pairs(pos, None, cutoff)}


@pytest.mark.parametrize("kind", ["orthorhombic", "triclinic"])
@pytest.mark.parametrize("seed", range(5))
def test_periodic_pairs_match_brute_force_over_images(kind, seed):
    rng = np.random.default_rng(100 + seed)
    box = reduced_box(kind, rng, size=9.0)
    cutoff = 0.5 * float(box_heights(box).min()) * 0.999
    n = 30
    # positions anywhere, including far outside the primary cell
    pos = (torch.as_tensor(rng.random((n, 3)) * 3 - 1) @ box).numpy()
    check_box(box, cutoff)
    i, j = all_pairs(n, torch.device("cpu"))
    v = minimum_image(torch.as_tensor(pos)[j] - torch.as_tensor(pos)[i], box).numpy()
    d = np.linalg.norm(v, axis=1)
    ours = {(a, b): v[k] for k, (a, b) in enumerate(zip(i.tolist(), j.tolist())) if d[k] < cutoff}
    reference = brute_force_pairs(pos, box.numpy(), cutoff)
    assert len({(a, b) for a, b, _ in reference}) == len(reference), "an image appeared twice"
    assert set(ours) == {(a, b) for a, b, _ in reference}
    for a, b, vec in reference:
        np.testing.assert_allclose(ours[(a, b)], vec, atol=1e-9)


@pytest.mark.parametrize("kind", ["orthorhombic", "triclinic"])
def test_periodic_energy_equals_energy_from_brute_force_pair_list(kind):
    rng = np.random.default_rng(7)
    box = reduced_box(kind, rng, size=10.0)
    model = random_model("schnet2018", elements=(1, 8), n_features=16, n_interactions=2, cutoff=4.5)
    n = 20
    pos = torch.as_tensor(rng.random((n, 3))) @ box
    z = torch.as_tensor(rng.choice([1, 8], size=n))
    reference = brute_force_pairs(pos.numpy(), box.numpy(), 4.5)
    i = torch.tensor([a for a, _, _ in reference])
    j = torch.tensor([b for _, b, _ in reference])
    vectors = torch.as_tensor(np.array([v for _, _, v in reference]))
    with torch.no_grad():
        e_ref = model.atomic_energies(model.species(z), vectors, i, j).sum()
        e = model(z, pos, box)
    assert torch.allclose(e, e_ref, rtol=1e-12, atol=1e-10)


def test_box_too_small_for_cutoff_is_refused():
    box = torch.diag(torch.tensor([9.0, 12.0, 12.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="larger than half the smallest box height"):
        check_box(box, 5.0)
    check_box(box, 4.5)
    # a skewed box: widths are 12 but the heights are smaller
    skewed = torch.tensor([[12.0, 0, 0], [6.0, 12.0, 0], [6.0, 6.0, 12.0]], dtype=torch.float64)
    assert float(box_heights(skewed).min()) < 11.0
    with pytest.raises(ValueError, match="half the smallest box height"):
        check_box(skewed, 5.9)


def test_non_reduced_box_is_refused():
    with pytest.raises(ValueError, match="reduced triclinic form"):
        check_box(torch.tensor([[10.0, 1.0, 0], [0, 10.0, 0], [0, 0, 10.0]], dtype=torch.float64), 3.0)
    with pytest.raises(ValueError, match="reduced triclinic form"):
        check_box(torch.tensor([[10.0, 0, 0], [7.0, 10.0, 0], [0, 0, 10.0]], dtype=torch.float64), 3.0)


def test_model_without_cutoff_refuses_periodic_box(ethanol):
    z, r = ethanol
    model = random_model("schnet2017")
    with pytest.raises(ValueError, match="finite cutoff"):
        model(z, r, torch.eye(3, dtype=torch.float64) * 30.0)
