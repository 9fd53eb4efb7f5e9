"""Where one CUDA forward+backward of schnet2018 on a water box spends its time (torch profiler), before any
kernel work: if elementwise passes over [pairs, F] dominate, a fused CFConv is the next step (issue #17)."""

from __future__ import annotations

import numpy as np
import torch
from openmm import unit

from schnet_md.bench import benchmark_model, water_box
from schnet_md.export import build_module

for n_atoms in (3000, 24000):
    topology, positions = water_box(n_atoms)
    box = np.array(topology.getPeriodicBoxVectors().value_in_unit(unit.nanometer))
    z = [a.element.atomic_number for a in topology.atoms()]
    model, _ = benchmark_model("schnet2018", z, True)
    module, meta = build_module(model, z, periodic=True, box_nm=box, positions_nm=positions, check_errors=False)
    module = module.cuda()
    x = torch.as_tensor(positions, dtype=torch.float32, device="cuda").requires_grad_(True)
    b = torch.as_tensor(box, dtype=torch.float32, device="cuda")
    for _ in range(5):
        torch.autograd.grad(module(x, b), x)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        torch.autograd.grad(module(x, b), x)
    end.record()
    torch.cuda.synchronize()
    print(f"== {len(z)} atoms, {meta['neighbor_list']}, capacity {meta['pair_capacity']}: "
          f"{start.elapsed_time(end) / 20:.2f} ms per forward+backward ({torch.cuda.get_device_name(0)})")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            torch.autograd.grad(module(x, b), x)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
