"""Speed measurements behind `schnet-md bench` and benchmarks/speed.py.

Model-only: median time of one forward+backward of the exported TorchScript module (the work openmm-torch
does each step), after warm-up. MD: steps/s of an OpenMM Context with only the SchNet force, after warm-up.
Peak memory: CUDA's allocator peak on a GPU; on a CPU the process's resident-set peak (ru_maxrss) and how
far the model calls raised it above the resident set before them (meaningful in a fresh process).
Weights do not change speed, so a random-weight model of a preset stands in where no trained one fits.
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch

from .export import build_module, create_torch_force
from .model import SchNet, config_from_preset


@dataclass
class BenchResult:
    system: str
    n_atoms: int
    model: str
    platform: str
    neighbor_list: str
    cuda_graphs: bool
    torch_threads: int
    model_ms: float
    steps_per_second: float
    ns_per_day: float
    peak_memory_mb: float
    model_memory_mb: float = float("nan")
    backend: str = "torch"      # "torch" (TorchForce) or "python" (PythonForce)
    compile: bool = False       # PythonForce: through torch.compile
    fused: bool = False         # PythonForce: the Triton CFConv
    tabulate: bool = False      # filters from spline tables (schnet_md.tabulated)

    def as_dict(self) -> dict:
        return asdict(self)


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (for benchmark records)."""
    import platform

    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def preset_model(preset: str, elements, cutoff: Optional[float] = None) -> SchNet:
    """A random-weight model of a preset (optionally with a cosine cutoff added, for periodic boxes)."""
    torch.manual_seed(0)
    overrides = {} if cutoff is None else {"cutoff": cutoff, "cutoff_function": "cosine"}
    return SchNet(config_from_preset(preset, sorted(set(int(z) for z in elements)), **overrides)).eval()


def benchmark_model(preset: str, elements, periodic: bool, cutoff: float = 5.0):
    """(random-weight model, label) of a preset for a benchmark system. In a periodic box schnet2017, which has
    no cutoff of its own, gets a cosine cutoff of `cutoff` Å."""
    cutoff = cutoff if (periodic and preset == "schnet2017") else None
    return preset_model(preset, elements, cutoff), preset + (f" + {cutoff:g} Å cosine cutoff" if cutoff else "")


def water_box(n_atoms: int):
    """(Topology, positions nm) of a cubic TIP3P-geometry water box with about `n_atoms` atoms."""
    import openmm
    import openmm.app as app
    from openmm import unit

    edge_nm = (n_atoms / 100.0) ** (1.0 / 3.0)          # liquid water: ~100 atoms per nm^3
    forcefield = app.ForceField("amber14/tip3p.xml")
    modeller = app.Modeller(app.Topology(), [])
    modeller.addSolvent(forcefield, model="tip3p", boxSize=openmm.Vec3(edge_nm, edge_nm, edge_nm) * unit.nanometer)
    positions = np.array(modeller.positions.value_in_unit(unit.nanometer))
    return modeller.topology, positions


def water_box_arrays(n_atoms: int):
    """(atomic numbers, positions nm [n, 3], box vectors nm [3, 3]) of `water_box(n_atoms)`."""
    from openmm import unit

    topology, positions = water_box(n_atoms)
    box = np.array(topology.getPeriodicBoxVectors().value_in_unit(unit.nanometer))
    return [a.element.atomic_number for a in topology.atoms()], positions, box


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _resident_mb() -> float:
    """The current resident set (Linux /proc), or NaN where it cannot be read."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def time_model(model: SchNet, atomic_numbers, positions_nm: np.ndarray, box_nm: Optional[np.ndarray] = None,
               repeats: int = 50, device: str = "cpu", neighbor_list: str = "auto", compile: bool = False,
               fused: bool = False, tabulate: bool = False):
    """(median ms of forward+backward, neighbour list used, peak memory MB, memory the calls added MB) of the
    exported TorchScript module, or with compile=True of the same module through torch.compile (inductor:
    fused Triton kernels on CUDA), or with fused=True eagerly with the Triton CFConv of schnet_md.fused; tabulate:
    filters from spline tables (schnet_md.tabulated)."""
    dev = torch.device(device)
    module, meta = build_module(model, list(atomic_numbers), periodic=box_nm is not None, box_nm=box_nm,
                                positions_nm=positions_nm, neighbor_list=neighbor_list,
                                check_errors=not (compile or fused), script=not (compile or fused),
                                tabulate=tabulate)
    module = module.to(dev)
    if fused:
        from .fused import FusedSchNet

        module.model = FusedSchNet(module.model)
    if compile:
        module = torch.compile(module, fullgraph=True)
    x = torch.as_tensor(positions_nm, dtype=torch.float32, device=dev)
    box = None if box_nm is None else torch.as_tensor(box_nm, dtype=torch.float32, device=dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    before = torch.cuda.memory_allocated(dev) / 2 ** 20 if dev.type == "cuda" else _resident_mb()
    times = []
    for k in range(repeats + 5):
        p = x.clone().requires_grad_(True)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        module(p, box).backward()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if k >= 5:
            times.append(time.perf_counter() - t0)
    peak = _peak_memory_mb(dev)
    return 1000 * statistics.median(times), meta["neighbor_list"], peak, peak - before


def time_neighbor_search(positions_nm: np.ndarray, box_nm: np.ndarray, cutoff: float = 5.0, method: str = "cells",
                         repeats: int = 5) -> dict:
    """Median ms of the in-graph neighbour search alone (no model), TorchScript, for a periodic system:
    "cells" (the O(N) cell list the export uses) or "all_pairs" (every pair at its minimum image, O(N^2))."""
    from .export import size_cell_list
    from .neighbors import cell_list_pairs, minimum_image, unique_pairs

    r = torch.as_tensor(positions_nm * 10.0, dtype=torch.float32)
    box = torch.as_tensor(box_nm * 10.0, dtype=torch.float32)
    n = len(r)
    if method == "cells":
        cells, per_cell, capacity = size_cell_list(box_nm * 10.0, cutoff, n, positions_nm * 10.0)
        search = torch.jit.script(cell_list_pairs)

        def run():
            out = search(r, box, cutoff, cells, per_cell, capacity)
            return int(out[4]), capacity
    else:
        i, j = unique_pairs(n, r.device)
        image = torch.jit.script(minimum_image)

        def run():
            d = torch.linalg.norm(image(r[j] - r[i], box), dim=1)
            return int((d < cutoff).sum()), len(i)
    times = []
    with torch.no_grad():
        for k in range(repeats + 2):
            t0 = time.perf_counter()
            found, slots = run()
            if k >= 2:
                times.append(time.perf_counter() - t0)
    return {"method": method, "n_atoms": n, "ms": 1000 * statistics.median(times), "pairs_found": found,
            "pair_slots": slots, "peak_memory_mb": _peak_memory_mb(torch.device("cpu"))}


def time_md(model: SchNet, topology, positions_nm: np.ndarray, platform: str = "CPU", steps: int = 200,
            timestep_fs: float = 0.5, cuda_graphs: bool = False, neighbor_list: str = "auto",
            backend: str = "torch", compile: bool = False, fused: bool = False, tabulate: bool = False) -> float:
    """Steps per second of Langevin MD with only the SchNet force: backend "torch" (openmm-torch's
    TorchForce) or "python" (OpenMM's PythonForce, the model on CUDA when the platform is CUDA; compile:
    through torch.compile; fused: with the Triton CFConv; tabulate: spline-table filters)."""
    import openmm
    from openmm import unit

    from .export import create_python_force
    from .simulate import particle_system

    system = particle_system(topology)
    if backend == "python":
        device = "cuda" if platform == "CUDA" else "cpu"
        system.addForce(create_python_force(model, topology, positions=positions_nm, neighbor_list=neighbor_list,
                                            device=device, compile=compile, fused=fused, tabulate=tabulate))
    else:
        system.addForce(create_torch_force(model, topology, positions=positions_nm, neighbor_list=neighbor_list,
                                           cuda_graphs=cuda_graphs, tabulate=tabulate))
    integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1 / unit.picosecond, timestep_fs * unit.femtosecond)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName(platform))
    context.setPositions(positions_nm)
    context.setVelocitiesToTemperature(300 * unit.kelvin, 1)
    integrator.step(max(5, min(20, steps // 10)))  # warm-up: TorchScript profiling runs, graph capture
    context.getState(getEnergy=True)
    t0 = time.perf_counter()
    integrator.step(steps)
    context.getState(getEnergy=True)                # waits for the device
    return steps / (time.perf_counter() - t0)


def bench(name: str, topology, positions_nm: np.ndarray, model: SchNet, model_label: str, platform: str = "CPU",
          steps: int = 200, repeats: int = 50, cuda_graphs: bool = False, neighbor_list: str = "auto",
          timestep_fs: float = 0.5, backend: str = "torch", compile: bool = False,
          fused: bool = False, tabulate: bool = False) -> BenchResult:
    from openmm import unit

    z = [a.element.atomic_number for a in topology.atoms()]
    box = topology.getPeriodicBoxVectors()
    box_nm = None if box is None else np.array(box.value_in_unit(unit.nanometer))
    device = "cuda" if platform == "CUDA" else "cpu"
    ms, used, memory, added = time_model(model, z, positions_nm, box_nm, repeats, device, neighbor_list,
                                         compile=compile, fused=fused, tabulate=tabulate)
    sps = time_md(model, topology, positions_nm, platform, steps, timestep_fs, cuda_graphs, neighbor_list, backend,
                  compile, fused, tabulate)
    return BenchResult(name, len(z), model_label, platform, used, cuda_graphs, torch.get_num_threads(), ms, sps,
                       sps * timestep_fs * 1e-6 * 86400, memory, added, backend, compile, fused, tabulate)
