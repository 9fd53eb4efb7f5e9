"""Regenerate the ready-to-run structures in systems/ from the reference data in ../shared/data/.

    python systems/make_systems.py [--data ../shared/data]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from schnet_md.elements import formula
from schnet_md.structures import molecule_topology, write_pdb
from schnet_md.units import NM_PER_ANGSTROM

HERE = Path(__file__).resolve().parent
STUDY_ISOMERS = (63, 128, 7)   # known, known, unknown: the most rotatable bonds (see benchmarks/iso17_md.py)
# five more for the robustness targets of `iso17x` (issue #15): the next known (22, 81, 94) and unknown (105, 8)
# isomers by number of rotatable heavy-atom dihedrals, the lower isomer id first on ties
ROBUSTNESS_ISOMERS = (22, 81, 94, 105, 8)


def write_system(name: str, numbers, positions_angstrom, source: str) -> None:
    folder = HERE / name
    folder.mkdir(exist_ok=True)
    top = molecule_topology(numbers, positions_angstrom)
    write_pdb(top, positions_angstrom * NM_PER_ANGSTROM, folder / f"{name}.pdb")
    (folder / "README.md").write_text(
        f"# {name} ({formula(numbers)}, {len(numbers)} atoms)\n\n{source}\n\n"
        f"Bonds (CONECT) inferred from covalent radii; regenerate with `python systems/make_systems.py`.\n")
    print(f"{folder / (name + '.pdb')}: {formula(numbers)}, {top.getNumBonds()} bonds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data"))
    data = Path(parser.parse_args().data)
    for molecule in ("ethanol", "aspirin"):
        with np.load(data / "rmd17" / f"rmd17_{molecule}_train_01.npz") as f:
            write_system(molecule, f["nuclear_charges"], f["coords"][0],
                         f"Source: first frame of revised MD17 (rMD17, Christensen & von Lilienfeld 2020), file "
                         f"`rmd17_{molecule}_train_01.npz`, frame 0 (original MD17 index {int(f['old_indices'][0])}); "
                         f"PBE/def2-SVP MD snapshot, coordinates in Å.")
    with np.load(data / "iso17x" / "iso17x.npz") as f, np.load(data / "iso17x" / "splits.npz") as s:
        known = set(s["known_mols"].tolist())
        # the first isomer of each split, the isomers of the ISO17-style MD study (benchmarks/iso17_md.py) and of
        # the robustness targets, chosen for their rotatable bonds
        for mol in sorted({int(np.sort(s["known_mols"])[0]), int(np.sort(s["unknown_mols"])[0]), *STUDY_ISOMERS,
                           *ROBUSTNESS_ISOMERS}):
            split, key = ("known", "known_mols") if mol in known else ("unknown", "unknown_mols")
            frame = int(np.nonzero((f["mol"] == mol) & f["eq"])[0][0])
            write_system(f"c7o2h10_{mol}", f["Z"][frame], f["R"][frame].astype(np.float64),
                         f"Source: iso17x (ISO17-style C7O2H10 set in ../shared/data/iso17x), isomer `mol` = {mol} "
                         f"({split} molecule: in `{key}` of splits.npz), QM9 index {int(f['mol_qm9_index'][mol])}, "
                         f"SMILES `{f['mol_smiles'][mol]}`; its QM9 (B3LYP/6-31G(2df,p)) equilibrium geometry, "
                         f"frame {frame} of iso17x.npz.")


if __name__ == "__main__":
    main()
