"""Where one CUDA forward+backward of schnet2018 on a water box spends its time (torch profiler), and what
fusing the elementwise work buys (issue #17).

For each box: the exported TorchScript module's time per forward+backward; the CUDA kernel time grouped into
matrix products (cuBLAS/CUTLASS), elementwise passes (incl. TorchScript's own fused kernels), gathers and
scatters over the pair list (index_select / index_add), the neighbour search's sorts and reductions, and the
rest; the 25 costliest kernels. Then the same module with the hand-fused Triton CFConv (schnet_md.fused; float32
and TF32 products) and through torch.compile (inductor: the elementwise passes over [pairs, F] and their
gathers/scatters fused into generated Triton kernels), each checked against the TorchScript forces and timed. Usage (GPU machine): python3 benchmarks/gpu/profile_cuda.py [--atoms 3000 24000]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np
import torch
from openmm import unit

from pathlib import Path

from schnet_md.bench import benchmark_model, preset_model, water_box_arrays
from schnet_md.export import build_module
from schnet_md.structures import read_structure

ROOT = Path(__file__).resolve().parents[2]

CATEGORIES = [   # first match wins; kernel names as the CUDA profiler reports them
    ("matrix products", ("gemm", "cutlass", "cublas", "sm80_", "sm90_", "ampere_", "hopper", "nvjet", "splitk")),
    ("gathers/scatters", ("index", "scatter", "gather")),
    ("sorts/scans/reductions", ("sort", "radix", "scan", "reduce", "cub::", "unique", "cumsum")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "fused", "fusion", "triton_", "copy", "fill")),
]


def category(name: str) -> str:
    low = name.lower()
    for label, keys in CATEGORIES:
        if any(k in low for k in keys):
            return label
    return "other"


def time_calls(module, x, b, calls: int = 20) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        torch.autograd.grad(module(x, b), x)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


def kernel_time(event) -> float:
    """Self CUDA time (us) of a profiler row, across torch versions' attribute names."""
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, attr):
            return float(getattr(event, attr))
    return 0.0


def graph_replay_ms(module, x, b, replays: int = 500) -> float:
    """ms per replay of one forward+backward captured in a CUDA graph (warmed up on a side stream first)."""
    static_x = x.detach().clone().requires_grad_(True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            torch.autograd.grad(module(static_x, b), static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        (grad,) = torch.autograd.grad(module(static_x, b), static_x)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays


def openmm_floor(n_particles: int = 19, steps: int = 3000) -> None:
    """Steps/s of OpenMM's CUDA platform with a TorchForce whose module does almost nothing (E = sum r^2): the
    per-step cost of the integrator and of openmm-torch's hand-over, which no model can go below."""
    import openmm
    import openmmtorch

    class Harmonic(torch.nn.Module):
        def forward(self, positions: torch.Tensor) -> torch.Tensor:
            return (positions ** 2).sum()

    for graphs in ("false", "true"):
        system = openmm.System()
        for _ in range(n_particles):
            system.addParticle(12.0)
        force = openmmtorch.TorchForce(torch.jit.script(Harmonic()))
        force.setProperty("useCUDAGraphs", graphs)
        system.addForce(force)
        integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1 / unit.picosecond, 0.5 * unit.femtosecond)
        context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("CUDA"))
        context.setPositions(np.random.default_rng(0).normal(scale=0.3, size=(n_particles, 3)))
        integrator.step(100)
        context.getState(getEnergy=True)
        t0 = time.perf_counter()
        integrator.step(steps)
        context.getState(getEnergy=True)
        rate = steps / (time.perf_counter() - t0)
        print(f"== the floor: TorchForce of E = sum r^2, {n_particles} particles, CUDA graphs {graphs}: {rate:.0f} steps/s "
              f"({1000 / rate:.3f} ms per step)", flush=True)
        del context, integrator


def profile_molecule(name: str, preset: str) -> None:
    """Kernel launches and times of one forward+backward for a molecule: a step of a small system is bound by
    the number of kernels, not by arithmetic."""
    s = read_structure(ROOT / "systems" / name / f"{name}.pdb")
    z = s.atomic_numbers.tolist()
    model = preset_model(preset, z)
    module, meta = build_module(model, z, periodic=False, positions_nm=s.positions_nm, check_errors=False)
    module = module.cuda()
    x = torch.as_tensor(s.positions_nm, dtype=torch.float32, device="cuda").requires_grad_(True)
    for _ in range(5):
        torch.autograd.grad(module(x, None), x)
    torch.cuda.synchronize()
    ms = time_calls(module, x, None, calls=200)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            torch.autograd.grad(module(x, None), x)
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if kernel_time(e) > 0]
    launches = sum(e.count for e in kernels) / 3
    busy = sum(kernel_time(e) for e in kernels) / 3000
    graphed = graph_replay_ms(module, x, None)
    (f_ref,) = torch.autograd.grad(module(x, None), x)
    print(f"\n== {name} ({len(z)} atoms), {preset}, {meta['neighbor_list']}: TorchScript {ms:.3f} ms per "
          f"forward+backward, {launches:.0f} kernel launches, kernel time {busy:.3f} ms; one CUDA graph of it "
          f"{graphed:.3f} ms per replay ({1000 / graphed:.0f} replays/s)", flush=True)
    for e in sorted(kernels, key=kernel_time, reverse=True)[:10]:
        print(f"  {kernel_time(e) / 3000:8.4f} ms/call  {e.count // 3:4d}x  [{category(e.key)}]  {e.key[:110]}")
    tabulated, meta = build_module(model, z, periodic=False, positions_nm=s.positions_nm, check_errors=False,
                                   tabulate=True)
    tabulated = tabulated.cuda()
    (f_tab,) = torch.autograd.grad(tabulated(x, None), x)
    for _ in range(5):
        torch.autograd.grad(tabulated(x, None), x)
    ms_tab = time_calls(tabulated, x, None, calls=200)
    graphed_tab = graph_replay_ms(tabulated, x, None)
    print(f"== {name}, tabulated filters (spacing {meta['filters']['spacing_angstrom']} Å): TorchScript {ms_tab:.3f} ms "
          f"per forward+backward, one CUDA graph of it {graphed_tab:.3f} ms per replay ({1000 / graphed_tab:.0f} "
          f"replays/s); max |dF| {float((f_tab - f_ref).abs().max()):.2e} kJ/mol/nm", flush=True)
    import schnet_md.fused as fused_cfconv

    plain, _ = build_module(model, z, periodic=False, positions_nm=s.positions_nm, check_errors=False, script=False)
    plain.model = fused_cfconv.FusedSchNet(plain.model)
    plain = plain.cuda()
    (f_fused,) = torch.autograd.grad(plain(x, None), x)
    ms_fused = time_calls(plain, x, None, calls=200)
    graphed_fused = graph_replay_ms(plain, x, None)
    print(f"== {name}, fused Triton CFConv: {ms_fused:.3f} ms per forward+backward (eager), one CUDA graph of it "
          f"{graphed_fused:.3f} ms per replay ({1000 / graphed_fused:.0f} replays/s); max |dF| "
          f"{float((f_fused - f_ref).abs().max()):.2e} of max |F| {float(f_ref.abs().max()):.2e} kJ/mol/nm", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--atoms", type=int, nargs="+", default=[3000, 24000])
    p.add_argument("--molecules", nargs="*", default=["c7o2h10_1"])
    p.add_argument("--molecule-preset", default="schnet2017")
    p.add_argument("--preset", default="schnet2018")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--fused-tf32-only", action="store_true", help="skip the fused CFConv's IEEE-float32 timing (slow)")
    args = p.parse_args()
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__} (CUDA {torch.version.cuda})")
    if args.molecules:
        try:
            openmm_floor()
        except Exception as error:
            print(f"== the floor: failed: {type(error).__name__}: {error}", flush=True)
    for name in args.molecules:
        try:
            profile_molecule(name, args.molecule_preset)
        except Exception as error:   # a molecule's failure must not cost the boxes' profile
            print(f"== {name}: failed: {type(error).__name__}: {error}", flush=True)
    boxes = []   # every box is profiled before any is compiled (compiling takes the longest)
    for n_atoms in args.atoms:
        z, positions, box = water_box_arrays(n_atoms)
        model, label = benchmark_model(args.preset, z, True)
        module, meta = build_module(model, z, periodic=True, box_nm=box, positions_nm=positions, check_errors=False)
        module = module.cuda()
        x = torch.as_tensor(positions, dtype=torch.float32, device="cuda").requires_grad_(True)
        b = torch.as_tensor(box, dtype=torch.float32, device="cuda")
        for _ in range(5):   # TorchScript's profiling executor specialises (and fuses) in the first calls
            torch.autograd.grad(module(x, b), x)
        torch.cuda.synchronize()
        ms = time_calls(module, x, b)
        print(f"\n== {len(z)} atoms, {label}, {meta['neighbor_list']}, pair capacity {meta['pair_capacity']}: "
              f"TorchScript {ms:.2f} ms per forward+backward")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                torch.autograd.grad(module(x, b), x)
            torch.cuda.synchronize()
        totals = defaultdict(float)
        kernels = [e for e in prof.key_averages() if kernel_time(e) > 0]
        for e in kernels:
            totals[category(e.key)] += kernel_time(e)
        whole = sum(totals.values()) or 1.0
        print("where the CUDA time goes: " + ", ".join(
            f"{k} {100 * v / whole:.0f} %" for k, v in sorted(totals.items(), key=lambda kv: -kv[1]))
            + f" (kernel time {whole / 3000:.2f} ms per call against {ms:.2f} ms wall: the rest is launch overhead"
              " and host work)")
        for e in sorted(kernels, key=kernel_time, reverse=True)[:25]:
            print(f"  {kernel_time(e) / 3000:8.3f} ms/call  {e.count // 3:4d}x  [{category(e.key)}]  {e.key[:110]}")
        boxes.append((len(z), model, z, box, positions, module, x, b, ms))
    import schnet_md.fused as fused_cfconv

    for n, model, z, box, positions, module, x, b, ms in boxes:   # the Triton CFConv of schnet_md.fused
        plain, _ = build_module(model, z, periodic=True, box_nm=box, positions_nm=positions, check_errors=False,
                                script=False)
        plain.model = fused_cfconv.FusedSchNet(plain.model)
        plain = plain.cuda()
        e_ref = module(x, b)
        (f_ref,) = torch.autograd.grad(e_ref, x)
        default = fused_cfconv.DOT_PRECISION
        for precision in ("tf32",) if args.fused_tf32_only else ("ieee", "tf32"):
            fused_cfconv.DOT_PRECISION = precision
            t0 = time.perf_counter()
            e_fused = plain(x, b)
            (f_fused,) = torch.autograd.grad(e_fused, x)
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - t0
            torch.cuda.reset_peak_memory_stats()
            ms_fused = time_calls(plain, x, b)
            peak = torch.cuda.max_memory_allocated() / 2 ** 30
            print(f"== {n} atoms, fused Triton CFConv ({precision} products): {ms_fused:.2f} ms per forward+backward, "
                  f"{ms / ms_fused:.2f}x the TorchScript speed (first call {compile_s:.0f} s), peak {peak:.1f} GB; "
                  f"energy {float(e_fused):.4f} vs {float(e_ref):.4f} kJ/mol, max |dF| "
                  f"{float((f_fused - f_ref).abs().max()):.2e} of max |F| {float(f_ref.abs().max()):.2e} kJ/mol/nm",
                  flush=True)
        fused_cfconv.DOT_PRECISION = default
        tabulated, meta = build_module(model, z, periodic=True, box_nm=box, positions_nm=positions, check_errors=False,
                                       tabulate=True)
        tabulated = tabulated.cuda()
        for _ in range(5):
            torch.autograd.grad(tabulated(x, b), x)
        torch.cuda.reset_peak_memory_stats()
        ms_tab = time_calls(tabulated, x, b)
        peak = torch.cuda.max_memory_allocated() / 2 ** 30
        e_tab = tabulated(x, b)
        (f_tab,) = torch.autograd.grad(e_tab, x)
        print(f"== {n} atoms, tabulated filters (TorchScript, spacing {meta['filters']['spacing_angstrom']} Å): "
              f"{ms_tab:.2f} ms per forward+backward, {ms / ms_tab:.2f}x the TorchScript speed, peak {peak:.1f} GB; "
              f"energy {float(e_tab):.4f} vs {float(e_ref):.4f} kJ/mol, max |dF| {float((f_tab - f_ref).abs().max()):.2e}",
              flush=True)
    for n, model, z, box, positions, module, x, b, ms in ([] if args.no_compile else boxes):
        plain, _ = build_module(model, z, periodic=True, box_nm=box, positions_nm=positions, check_errors=False,
                                script=False)
        fused = torch.compile(plain.cuda(), fullgraph=True)
        t0 = time.perf_counter()
        (f_ref,) = torch.autograd.grad(module(x, b), x)
        e_fused = fused(x, b)
        (f_fused,) = torch.autograd.grad(e_fused, x)
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
        e_ref = module(x, b)
        for _ in range(3):
            torch.autograd.grad(fused(x, b), x)
        ms_fused = time_calls(fused, x, b)
        print(f"== {n} atoms, torch.compile (inductor, Triton): {ms_fused:.2f} ms per forward+backward, {ms / ms_fused:.2f}x the "
              f"TorchScript speed (compile {compile_s:.0f} s); energy {float(e_fused):.4f} vs {float(e_ref):.4f} kJ/mol, "
              f"max |dF| {float((f_fused - f_ref).abs().max()):.2e} of max |F| {float(f_ref.abs().max()):.2e} kJ/mol/nm")


if __name__ == "__main__":
    main()
