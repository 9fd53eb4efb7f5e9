"""Write tests/fixtures/schnetpack_2.1.1.pt: a small schnetpack SchNet (its extracted weights) and
schnetpack's own energies and forces on a few structures, so CI can test the import without schnetpack.

Run where schnetpack 2.x is installed (with torch 2.9, define T_co first, as below):
    python plugins/schnetpack/make_fixture.py [--out tests/fixtures/schnetpack_2.1.1.pt]
"""

from __future__ import annotations

import argparse
import typing
from pathlib import Path

import numpy as np
import torch
import torch.utils.data.dataloader as _dataloader

_dataloader.T_co = typing.TypeVar("T_co", covariant=True)   # removed in torch 2.9; schnetpack 2.1.1 imports it
import schnetpack as spk  # noqa: E402
from ase import Atoms  # noqa: E402

from schnet_md.schnetpack_import import extract  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def build(seed: int = 0, cutoff: float = 5.0):
    torch.manual_seed(seed)
    representation = spk.representation.SchNet(
        n_atom_basis=32, n_interactions=3, radial_basis=spk.nn.GaussianRBF(n_rbf=20, cutoff=cutoff),
        cutoff_fn=spk.nn.CosineCutoff(cutoff), n_filters=24)
    atomrefs = torch.zeros(100)
    atomrefs[[1, 6, 8]] = torch.tensor([-13.6, -1029.8, -2041.2])
    # AddOffsets(atomrefs=<tensor>) fails in schnetpack 2.1.1 (`atomrefs or ...` on a tensor): set the buffers
    offsets = spk.transform.AddOffsets("energy", add_mean=True, add_atomrefs=True)
    offsets.atomref = atomrefs
    offsets.mean = torch.tensor([-0.37])
    nnp = spk.model.NeuralNetworkPotential(
        representation=representation,
        input_modules=[spk.atomistic.PairwiseDistances()],
        output_modules=[spk.atomistic.Atomwise(n_in=32, output_key="energy"),
                        spk.atomistic.Forces(energy_key="energy", force_key="forces")],
        postprocessors=[spk.transform.CastTo64(), offsets],
    )
    with torch.no_grad():   # random but non-trivial biases, as a trained model would have
        for p in nnp.parameters():
            if p.dim() == 1:
                p.normal_(0.0, 0.1)
    return nnp.double().eval()


def structures():
    from schnet_md.structures import read_structure

    rng = np.random.default_rng(3)
    out = []
    for name in ("ethanol", "c7o2h10_63"):
        s = read_structure(ROOT / "systems" / name / f"{name}.pdb")
        r = s.positions_nm * 10
        for k in range(2):
            out.append(Atoms(numbers=s.atomic_numbers, positions=r + rng.normal(scale=0.05, size=r.shape)))
    box = Atoms(numbers=rng.choice([1, 8], size=24), scaled_positions=rng.random((24, 3)),
                cell=[[11.0, 0, 0], [2.0, 11.5, 0], [-1.5, 3.0, 12.0]], pbc=True)
    out.append(box)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=str(ROOT / "tests" / "fixtures" / "schnetpack_2.1.1.pt"))
    args = p.parse_args()
    nnp = build()
    converter = spk.interfaces.AtomsConverter(neighbor_list=spk.transform.ASENeighborList(cutoff=5.0),
                                              dtype=torch.float64)
    records = []
    for atoms in structures():
        result = nnp(converter(atoms))
        records.append({"numbers": torch.as_tensor(atoms.numbers), "positions": torch.as_tensor(atoms.positions),
                        "cell": torch.as_tensor(atoms.cell.array) if atoms.pbc.all() else None,
                        "energy_eV": float(result["energy"].detach()), "forces_eV_A": result["forces"].detach()})
    import importlib.metadata
    torch.save({"schnetpack_version": importlib.metadata.version("schnetpack"),
                "torch_version": str(torch.__version__), "elements": [1, 6, 8], "extracted": extract(nnp),
                "structures": records}, args.out)
    print(f"fixture written to {args.out}: {len(records)} structures")


if __name__ == "__main__":
    main()
