"""O(N) cell list with fixed capacities, graph-safe export (no host synchronisation), overflow handling."""

from __future__ import annotations

import numpy as np
import openmm
import pytest
import torch

from conftest import random_model, reduced_box
from schnet_md.export import build_module, create_torch_force
from schnet_md.model import energy_and_forces
from schnet_md.neighbors import all_pairs, cell_grid, cell_list_pairs, minimum_image
from schnet_md.structures import molecule_topology

HOST_SYNC_OPS = ("aten::Bool", "aten::Float", "aten::Int", "aten::item", "aten::nonzero", "aten::is_nonzero",
                 "aten::tolist", "aten::ScalarImplicit", "aten::linalg_inv(", "aten::linalg_det")


def periodic_system(kind, seed, n=300, size=16.0):
    rng = np.random.default_rng(seed)
    box = reduced_box(kind, rng, size=size)
    positions = torch.as_tensor(rng.random((n, 3))) @ box + torch.as_tensor(rng.normal(scale=8.0, size=(n, 3)))
    return box, positions, rng.choice([1, 8], size=n)


@pytest.mark.parametrize("kind", ["orthorhombic", "triclinic"])
@pytest.mark.parametrize("seed", range(3))
def test_cell_list_finds_exactly_the_dense_pairs_once(kind, seed):
    box, r, _ = periodic_system(kind, seed)
    cutoff = 4.5
    cells = cell_grid(box, cutoff)
    assert min(cells) >= 3
    i, j, v, mask, found, overflow = cell_list_pairs(r, box, cutoff, cells, 64, 40000)
    assert not bool(overflow)
    ours = {(a, b): v[k] for k, (a, b, m) in enumerate(zip(i.tolist(), j.tolist(), mask.tolist())) if m}
    assert len(ours) == int(found)
    ii, jj = all_pairs(len(r), r.device)
    vv = minimum_image(r[jj] - r[ii], box)
    d = torch.linalg.norm(vv, dim=1)
    reference = {(a, b): vv[k] for k, (a, b) in enumerate(zip(ii.tolist(), jj.tolist())) if d[k] < cutoff and a < b}
    assert set(ours) == set(reference)
    for key, vec in reference.items():
        assert torch.allclose(ours[key], vec, atol=1e-10)
    # padding entries can never contribute: beyond the cutoff
    assert (torch.linalg.norm(v[~mask], dim=1) > cutoff).all()


def dense_half_pairs(r, box, cutoff):
    ii, jj = all_pairs(len(r), r.device)
    vv = minimum_image(r[jj] - r[ii], box)
    d = torch.linalg.norm(vv, dim=1)
    return {(a, b) for k, (a, b) in enumerate(zip(ii.tolist(), jj.tolist())) if d[k] < cutoff and a < b}


@pytest.mark.parametrize("seed", range(4))
def test_cell_list_with_three_cells_and_atoms_on_cell_faces(seed):
    """The tightest grid (3 cells a side, so the -1 and +1 neighbours of a cell are images of each other's
    neighbours) and atoms exactly on cell faces or a rounding error below the box face."""
    rng = np.random.default_rng(40 + seed)
    cutoff = 4.0
    box = reduced_box("triclinic", rng, size=3.05 * cutoff)
    while min(cell_grid(box, cutoff)) != 3 or float(torch.linalg.det(box)) <= 0:
        box = reduced_box("triclinic", rng, size=3.05 * cutoff * (1.0 + 0.1 * rng.random()))
    n = 120
    frac = rng.random((n, 3))
    frac[:30] = rng.choice([0.0, 1.0 / 3.0, 2.0 / 3.0, 1.0 - 1e-7, -1e-7], size=(30, 3))
    r = torch.as_tensor(frac) @ box
    i, j, v, mask, found, overflow = cell_list_pairs(r, box, cutoff, [3, 3, 3], 64, 20000)
    assert not bool(overflow)
    ours = {(a, b) for a, b, m in zip(i.tolist(), j.tolist(), mask.tolist()) if m}
    assert len(ours) == int(found)
    assert ours == dense_half_pairs(r, box, cutoff)


@pytest.mark.parametrize("kind", ["orthorhombic", "triclinic"])
@pytest.mark.parametrize("platform", ["Reference", "CPU"])
def test_cell_list_and_dense_exports_agree_in_openmm(kind, platform):
    box, r, z = periodic_system(kind, 7, n=200, size=14.0)
    model = random_model("schnet2018", elements=(1, 8), n_features=16, n_interactions=2, cutoff=4.5,
                         dtype=torch.float64)
    top = molecule_topology(z.tolist(), box_nm=box.numpy() / 10)
    results = []
    for neighbor_list in ("all_pairs", "cells"):
        system = openmm.System()
        for _ in range(len(z)):
            system.addParticle(16.0)
        system.setDefaultPeriodicBoxVectors(*[openmm.Vec3(*map(float, v)) for v in box.numpy() / 10])
        system.addForce(create_torch_force(model, top, dtype="float64", neighbor_list=neighbor_list,
                                           positions=r.numpy() / 10))
        context = openmm.Context(system, openmm.VerletIntegrator(1e-3), openmm.Platform.getPlatformByName(platform))
        context.setPositions(r.numpy() / 10)
        state = context.getState(getEnergy=True, getForces=True)
        results.append((state.getPotentialEnergy()._value, state.getForces(asNumpy=True)._value))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-10)
    np.testing.assert_allclose(results[1][1], results[0][1], rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("neighbor_list", ["all_pairs", "cells"])
def test_export_drops_gaussians_beyond_the_cutoff_without_changing_energy_or_forces(neighbor_list):
    """schnet2017's expansion reaches 30 Å; under a 5 Å cutoff all but 79 Gaussians are constant (the
    e^-80 clamp) for every pair the envelope lets through, and the export folds them into biases."""
    box, r, z = periodic_system("triclinic", 11, n=250, size=19.0)
    assert min(cell_grid(box, 5.0)) >= 3
    model = random_model("schnet2017", elements=(1, 8), n_features=16, n_interactions=2, cutoff=5.0,
                         cutoff_function="cosine", dtype=torch.float64)
    with torch.no_grad():   # large filter weights magnify any Gaussian dropped that still matters inside the cutoff
        for interaction in model.interactions:
            interaction.cfconv.filter_network.dense1.weight.mul_(1e3)
    # pairs straddling the cutoff, where the kept Gaussians nearest the boundary matter
    r[1] = r[0] + torch.tensor([4.999, 0.0, 0.0], dtype=torch.float64)
    r[2] = r[0] + torch.tensor([0.0, 5.001, 0.0], dtype=torch.float64)
    module, metadata = build_module(model, z.tolist(), periodic=True, dtype="float64", neighbor_list=neighbor_list,
                                    box_nm=box.numpy() / 10, positions_nm=r.numpy() / 10)
    assert metadata["gaussians_in_export"] == 79 and model.expansion.mu.numel() == 301   # the original is untouched
    positions = (r / 10).clone().requires_grad_(True)
    energy = module(positions, box / 10)
    (grad,) = torch.autograd.grad(energy, positions)
    reference, reference_forces = energy_and_forces(model, torch.as_tensor(z), r, box)
    assert energy.item() == pytest.approx(float(reference) * 4.184, rel=1e-12)
    np.testing.assert_allclose(-grad.numpy() / 41.84, reference_forces.numpy(), rtol=1e-9, atol=1e-9)


def test_auto_picks_the_cell_list_for_large_boxes_only():
    model = random_model("schnet2018", elements=(1, 8), n_features=8, n_interactions=1, cutoff=4.0)
    _, small = build_module(model, [8] * 50, periodic=True, box_nm=np.eye(3) * 1.5)
    assert small["neighbor_list"] == "all_pairs"
    _, narrow = build_module(model, [8] * 400, periodic=True, box_nm=np.eye(3) * 1.1)   # under 3 cutoffs across
    assert narrow["neighbor_list"] == "all_pairs"
    _, big = build_module(model, [8] * 1200, periodic=True, box_nm=np.eye(3) * 2.5)
    assert big["neighbor_list"] == "cells" and big["cells"] == [6, 6, 6] and big["pair_capacity"] > 0


@pytest.mark.parametrize("neighbor_list", ["all_pairs", "cells"])
def test_graph_safe_export_has_no_host_synchronisation(neighbor_list):
    model = random_model("schnet2018", elements=(1, 8), n_features=8, n_interactions=1, cutoff=4.0,
                         dtype=torch.float32)
    rng = np.random.default_rng(1)
    box_nm = np.eye(3) * 1.4
    args = dict(periodic=True, neighbor_list=neighbor_list, box_nm=box_nm, positions_nm=rng.random((60, 3)) * 1.4)
    safe, _ = build_module(model, [1, 8] * 30, check_errors=False, **args)
    graph = str(safe.inlined_graph)
    assert not [op for op in HOST_SYNC_OPS if op in graph], [op for op in HOST_SYNC_OPS if op in graph]
    checked, _ = build_module(model, [1, 8] * 30, check_errors=True, **args)
    assert "aten::Bool" in str(checked.inlined_graph)   # the inspection does see syncs when they are there
    # and both give the same energy on good input
    x = torch.as_tensor(args["positions_nm"])
    with torch.no_grad():
        assert float(safe(x, torch.as_tensor(box_nm))) == pytest.approx(float(checked(x, torch.as_tensor(box_nm))),
                                                                          rel=1e-6)


def test_overflow_is_an_error_or_a_nan_never_a_wrong_energy():
    box, r, z = periodic_system("orthorhombic", 3, n=200, size=14.0)
    model = random_model("schnet2018", elements=(1, 8), n_features=8, n_interactions=1, cutoff=4.5,
                         dtype=torch.float64)
    x, b = r / 10, box / 10
    dense, _ = build_module(model, z.tolist(), periodic=True, dtype="float64", neighbor_list="all_pairs")
    for capacity, cell_capacity in ((50, None), (None, 2)):
        # a checked export sizes its cell list at every call: capacities too small for the box cannot bite
        checked, _ = build_module(model, z.tolist(), periodic=True, dtype="float64", neighbor_list="cells",
                                  box_nm=b.numpy(), capacity=capacity, max_per_cell=cell_capacity)
        assert float(checked(x, b)) == pytest.approx(float(dense(x, b)), rel=1e-12)
        safe, _ = build_module(model, z.tolist(), periodic=True, dtype="float64", neighbor_list="cells",
                               box_nm=b.numpy(), capacity=capacity, max_per_cell=cell_capacity, check_errors=False)
        assert torch.isnan(safe(x, b))
    # NaN positions and a box that shrank below the cell grid: NaN in graph-safe mode too
    safe, _ = build_module(model, z.tolist(), periodic=True, dtype="float64", neighbor_list="cells",
                           box_nm=b.numpy(), check_errors=False)
    assert torch.isfinite(safe(x, b))
    assert torch.isnan(safe(x, b * 0.8))
    bad = x.clone()
    bad[3, 0] = float("nan")
    assert torch.isnan(safe(bad, b))


def _node_kinds(block, counts):
    for node in block.nodes():
        counts[node.kind()] = counts.get(node.kind(), 0) + 1
        for inner in node.blocks():
            _node_kinds(inner, counts)
    return counts


@pytest.mark.parametrize("neighbor_list", ["all_pairs", "cells"])
def test_graph_safe_export_neither_copies_from_nor_waits_for_the_host(neighbor_list):
    """What CUDA-graph capture forbids, found on the CPU: a tensor built from host values (torch.tensor: a
    host-to-device copy; it broke capture of the cell list on an H100) or a tensor read back to the host
    (bool(), int(), float(), item(): a sync)."""
    model = random_model("schnet2018", elements=(1, 8), n_features=16, n_interactions=2, cutoff=4.0,
                         dtype=torch.float32)
    n = 1200 if neighbor_list == "cells" else 64
    box_nm = np.eye(3) * max((n / 100.0) ** (1 / 3), 1.3)
    positions = np.random.default_rng(2).random((n, 3)) * box_nm[0, 0]
    kinds = {}
    for check_errors in (False, True):
        module, _ = build_module(model, [1, 8] * (n // 2), periodic=True, box_nm=box_nm, neighbor_list=neighbor_list,
                                 positions_nm=positions, check_errors=check_errors)
        kinds[check_errors] = _node_kinds(module.inlined_graph, {})
    host = {"aten::tensor", "aten::Bool", "aten::Int", "aten::Float", "aten::item"}
    assert not host & set(kinds[False]), {k: kinds[False][k] for k in host & set(kinds[False])}
    assert "aten::Bool" in kinds[True]   # the checked export does read flags back (to raise): the test sees it


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: CUDA-graph capture is checked on a GPU machine")
@pytest.mark.parametrize("neighbor_list", ["all_pairs", "cells"])
def test_graph_safe_export_captures_in_a_cuda_graph(neighbor_list):
    model = random_model("schnet2018", elements=(1, 8), n_features=16, n_interactions=2, cutoff=4.0,
                         dtype=torch.float32)
    rng = np.random.default_rng(2)
    n = 1200 if neighbor_list == "cells" else 64
    edge = (n / 100.0) ** (1 / 3)
    box_nm = np.eye(3) * max(edge, 1.3)
    module, meta = build_module(model, [1, 8] * (n // 2), periodic=True, box_nm=box_nm, neighbor_list=neighbor_list,
                                positions_nm=rng.random((n, 3)) * box_nm[0, 0], check_errors=False)
    module = module.cuda()
    x = torch.as_tensor(rng.random((n, 3)) * box_nm[0, 0], dtype=torch.float32, device="cuda").requires_grad_(True)
    box = torch.as_tensor(box_nm, dtype=torch.float32, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):   # warm-up (TorchScript profiling) outside the capture
            energy = module(x, box)
            (grad,) = torch.autograd.grad(energy, x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):   # raises if anything in forward/backward synchronises with the host
        energy = module(x, box)
        (grad,) = torch.autograd.grad(energy, x)
    graph.replay()
    torch.cuda.synchronize()
    expected = module(x.detach().clone().requires_grad_(True), box)
    assert torch.allclose(energy, expected, rtol=1e-5)


def test_neighbour_search_benchmark_counts_the_same_pairs_both_ways():
    from openmm import unit

    from schnet_md.bench import time_neighbor_search, water_box

    topology, positions = water_box(700)
    box = np.array(topology.getPeriodicBoxVectors().value_in_unit(unit.nanometer))
    cells = time_neighbor_search(positions, box, 5.0, "cells", repeats=1)
    dense = time_neighbor_search(positions, box, 5.0, "all_pairs", repeats=1)
    assert cells["pairs_found"] == dense["pairs_found"] > 0
    # nm -> Å once: liquid water (0.1 atoms/Å^3) has 4/3 pi (5 Å)^3 0.1 / 2 ~ 26 pairs per atom within 5 Å
    assert 20 < cells["pairs_found"] / len(positions) < 33
    assert cells["pair_slots"] < dense["pair_slots"] == len(positions) * (len(positions) - 1) // 2
