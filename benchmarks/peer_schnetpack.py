"""Side by side in one run: schnetpack 2.1.1's SchNet driving MD through its ASE calculator, against
schnet-md driving OpenMM, same architecture, same molecules, same CPU and thread count. Writes
benchmarks/peer_schnetpack.md.

Needs schnetpack (installed with --no-deps next to torch 2.9.1, plus the few packages it imports):
    PYTHONPATH=. python benchmarks/peer_schnetpack.py [--steps 300] [--threads 1]

Architecture (both): F = 64, 3 interactions, 301 Gaussians on 0-30 Å (schnet2017). schnetpack needs a
cutoff for its neighbour list: 30 Å with its cosine cutoff, which keeps every pair of these molecules, as
schnet-md's all-pairs schnet2017 does. MD: Langevin, 0.5 fs, 300 K; ASE's Langevin for schnetpack (its
documented MD route), OpenMM's LangevinMiddleIntegrator on the CPU platform for schnet-md.
"""

from __future__ import annotations

import os

os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")   # schnetpack's calculator unpickles whole models

import argparse  # noqa: E402
import datetime  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import typing  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.utils.data.dataloader as _dataloader  # noqa: E402

_dataloader.T_co = typing.TypeVar("T_co", covariant=True)   # removed in torch 2.9; schnetpack 2.1.1 imports it
import schnetpack as spk  # noqa: E402
from ase import Atoms, units  # noqa: E402
from ase.md.langevin import Langevin  # noqa: E402

from schnet_md.bench import preset_model, time_md  # noqa: E402
from schnet_md.structures import read_structure  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def schnetpack_model(cutoff: float = 30.0):
    representation = spk.representation.SchNet(
        n_atom_basis=64, n_interactions=3, radial_basis=spk.nn.GaussianRBF(n_rbf=301, cutoff=cutoff),
        cutoff_fn=spk.nn.CosineCutoff(cutoff))
    return spk.model.NeuralNetworkPotential(
        representation=representation, input_modules=[spk.atomistic.PairwiseDistances()],
        output_modules=[spk.atomistic.Atomwise(n_in=64, output_key="energy"),
                        spk.atomistic.Forces(energy_key="energy", force_key="forces")],
        postprocessors=[spk.transform.CastTo64()]).eval()


def schnetpack_md(structure, steps: int, model_file: Path) -> float:
    atoms = Atoms(numbers=structure.atomic_numbers, positions=structure.positions_nm * 10)
    atoms.calc = spk.interfaces.SpkCalculator(
        model_file=str(model_file), neighbor_list=spk.transform.ASENeighborList(cutoff=30.0),
        energy_key="energy", force_key="forces", energy_unit="eV", position_unit="Ang", device="cpu",
        dtype=torch.float32)
    dyn = Langevin(atoms, timestep=0.5 * units.fs, temperature_K=300, friction=0.01 / units.fs)
    dyn.run(10)
    t0 = time.perf_counter()
    dyn.run(steps)
    return steps / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import importlib.metadata
    import openmm

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_file = Path(tmp) / "spk_model.pt"
        torch.save(schnetpack_model(), model_file)
        for name in ("c7o2h10_1", "aspirin", "ethanol"):
            s = read_structure(ROOT / "systems" / name / f"{name}.pdb")
            spk_sps = schnetpack_md(s, args.steps, model_file)
            ours = time_md(preset_model("schnet2017", s.atomic_numbers.tolist()), s.topology, s.positions_nm,
                           "CPU", args.steps)
            rows.append((name, s.n_atoms, spk_sps, ours))
            print(name, s.n_atoms, f"schnetpack+ASE {spk_sps:.1f} steps/s", f"schnet-md+OpenMM {ours:.1f} steps/s",
                  f"ratio {ours / spk_sps:.2f}")
    lines = ["# schnet-md against schnetpack, side by side", "",
             f"Measured {datetime.date.today()} in one run of `PYTHONPATH=. python benchmarks/peer_schnetpack.py "
             f"--steps {args.steps} --threads {args.threads}` on this project's 2-core CPU machine (no GPU), idle "
             f"otherwise; torch {torch.__version__}, schnetpack {importlib.metadata.version('schnetpack')}, "
             f"ASE {importlib.metadata.version('ase')}, OpenMM {openmm.__version__}; {args.threads} torch thread(s).", "",
             "Same architecture (schnet2017: F = 64, 3 interactions, 301 Gaussians to 30 Å, every pair of the "
             "molecule), random weights (speed does not depend on them), Langevin MD at 0.5 fs.", "",
             "| molecule | atoms | schnetpack + ASE (steps/s) | schnet-md + OpenMM CPU (steps/s) | ratio |",
             "|---|---|---|---|---|"]
    lines += [f"| {n} | {a} | {x:.1f} | {y:.1f} | {y / x:.2f} |" for n, a, x, y in rows]
    (ROOT / "benchmarks" / "peer_schnetpack.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
