"""Committee uncertainty: several models of one system used together.

Members come from one base model fine-tuned with different seeds (`schnet-md train --init BASE --seed k`; the
data order differs, so the members agree where the data is and drift apart where it is not). The exported
force is the committee mean (`export.CommitteeMean`), and during MD `ForceDisagreement` reports, at every
report, the largest atomic force deviation

    sigma_F = max_i sqrt( mean_k |F_i^(k) - mean_k F_i^(k)|^2 )      (kJ/mol/nm)

so a run shows when it leaves what the models know. Cost: the force evaluates every member each step (K
model calls instead of one), and the disagreement K more forward+backward passes per report.

A committee is named on the command line as member files joined by commas: `--model m1.pt,m2.pt,m3.pt`.
"""

from __future__ import annotations

from typing import List, Sequence

import numpy as np
import torch

from .units import ANGSTROM_PER_NM, energy_factor


def committee_members(spec) -> List[str]:
    """The member files of a committee spec ("a.pt,b.pt" or a list); one entry for a single model."""
    if isinstance(spec, (list, tuple)):
        return [str(s) for s in spec]
    return [part for part in str(spec).split(",") if part]


def is_committee(spec) -> bool:
    return len(committee_members(spec)) > 1


class ForceDisagreement:
    """sigma_F of a committee for one system's positions (nm), in kJ/mol/nm."""

    def __init__(self, spec, atomic_numbers: Sequence[int], box: bool = False):
        from .modelfile import model_at

        members = committee_members(spec)
        if len(members) < 2:
            raise ValueError("a committee needs at least two models (--model m1.pt,m2.pt,...)")
        self.models = [model_at(m, "float64")[0] for m in members]
        units = {m.config.energy_unit for m in self.models}
        if len(units) != 1:
            raise ValueError(f"committee members disagree on the energy unit ({', '.join(sorted(units))})")
        self.z = torch.as_tensor(np.asarray(atomic_numbers))
        self.to_kj_nm = energy_factor(units.pop(), "kJ/mol") * ANGSTROM_PER_NM
        self.box = box

    def __call__(self, positions_nm: np.ndarray, box_nm=None) -> float:
        from .model import energy_and_forces

        r = torch.as_tensor(np.asarray(positions_nm) * ANGSTROM_PER_NM, dtype=torch.float64)
        box = None if box_nm is None or not self.box else torch.as_tensor(np.asarray(box_nm) * ANGSTROM_PER_NM)
        forces = torch.stack([energy_and_forces(m, self.z, r, box)[1] for m in self.models])   # [K, n, 3]
        deviation = ((forces - forces.mean(0)) ** 2).sum(-1).mean(0).sqrt()                   # [n]
        return float(deviation.max()) * self.to_kj_nm
