"""GFN2-xTB labels along a 1,2-H shift (issue #15, refine_iso17x.md, round-4 probe): the hydrogen H moves in a
straight line from its carbon A to a C-H bond length on the neighbouring carbon B, the rest of the molecule as
in STRUCTURE, plus jiggled copies. The refined iso17x has almost no barrier there (isomer 7: H4 from C2 to C3).

    python benchmarks/h_shift_frames.py systems/c7o2h10_7/c7o2h10_7.pdb --hydrogen 13 --to 3 --out DIR/labels.npz

Atoms are numbered from 1 as in the PDB. Writes an rMD17-format labels file (`refine --previous-labels` or
`refine_iso17x.py --labels` take it).
"""

from __future__ import annotations

import argparse

import numpy as np

STEPS = 12            # points along the path, start excluded
COPIES = 3            # jiggled copies of each point (0.05 Å on every atom)
C_H = 1.08            # Å, the bond length the hydrogen ends at


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("structure")
    p.add_argument("--hydrogen", type=int, required=True, help="the moving H (PDB serial, from 1)")
    p.add_argument("--to", type=int, required=True, help="the carbon it moves to (PDB serial, from 1)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    from schnet_md.reference import label_frames
    from schnet_md.structures import read_structure

    molecule = read_structure(args.structure)
    r0 = molecule.positions_nm * 10.0
    h, b = args.hydrogen - 1, args.to - 1
    end = r0[b] + C_H * (r0[h] - r0[b]) / np.linalg.norm(r0[h] - r0[b])
    rng = np.random.default_rng(0)
    frames = []
    for t in np.linspace(0.0, 1.0, STEPS + 1)[1:]:
        x = r0.copy()
        x[h] = (1 - t) * r0[h] + t * end
        frames += [x] + [x + rng.normal(0.0, 0.05, x.shape) for _ in range(COPIES)]
    print(label_frames(molecule.atomic_numbers, np.array(frames), args.out, method="GFN2-xTB"))


if __name__ == "__main__":
    main()
