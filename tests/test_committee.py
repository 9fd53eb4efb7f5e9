"""Committee uncertainty (issue #15): the exported force is the members' mean, MD reports their force
disagreement (state.csv column, warning and stop thresholds), and `train --init` fine-tunes from a base."""

from __future__ import annotations

import csv

import numpy as np
import openmm
import pytest
import torch
from openmm import unit

from conftest import SYSTEMS, random_model, shared_file
from schnet_md.export import create_torch_force
from schnet_md.modelfile import load_model, save_model
from schnet_md.simulate import SimulationError, SimulationSettings, resume_simulation, run_simulation
from schnet_md.structures import read_structure

ETHANOL = SYSTEMS / "ethanol" / "ethanol.pdb"


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Two members: the shipped ethanol model and a slightly perturbed copy (they agree near the data)."""
    folder = tmp_path_factory.mktemp("committee")
    base, meta = load_model("ethanol")
    other = load_model("ethanol")[0]
    torch.manual_seed(5)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01 * torch.randn_like(p) * p.abs().mean())
    return [str(save_model(base, folder / "m1.pt", meta)), str(save_model(other, folder / "m2.pt", meta))]


def energy_forces(force, s):
    system = openmm.System()
    for atom in s.topology.atoms():
        system.addParticle(atom.element.mass)
    system.addForce(force)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(s.positions_nm)
    state = context.getState(getEnergy=True, getForces=True)
    return (state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole),
            state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer))


def test_committee_force_is_the_mean(members):
    s = read_structure(ETHANOL)
    single = [energy_forces(create_torch_force(m, s.topology, dtype="float64"), s) for m in members]
    e, f = energy_forces(create_torch_force(members, s.topology, dtype="float64"), s)
    assert e == pytest.approx(np.mean([x[0] for x in single]), rel=1e-12)
    np.testing.assert_allclose(f, np.mean([x[1] for x in single], axis=0), rtol=1e-9, atol=1e-9)
    assert abs(single[0][0] - single[1][0]) > 1e-3            # the members really differ


def rows(path):
    return list(csv.DictReader(open(path)))


def test_md_reports_the_disagreement_and_resumes_with_it(tmp_path, members, capsys):
    out = tmp_path / "run"
    settings = SimulationSettings(steps=40, report_interval=10, platform="Reference", disagreement_warn=1e-6)
    run_simulation(ETHANOL, ",".join(members), out, settings, progress=False)
    sigma = [float(r["force_disagreement_kj_mol_nm"]) for r in rows(out / "state.csv")]
    assert len(sigma) == 4 and all(np.isfinite(sigma)) and min(sigma) > 0
    assert "the committee disagrees" in capsys.readouterr().err        # the (tiny) warning threshold
    resume_simulation(out, steps=20, progress=False)
    assert len([r for r in rows(out / "state.csv") if r["force_disagreement_kj_mol_nm"]]) == 6


def test_disagreement_stop_threshold_ends_the_run(tmp_path, members):
    settings = SimulationSettings(steps=40, report_interval=10, platform="Reference", disagreement_stop=1e-6)
    with pytest.raises(SimulationError, match="committee disagrees"):
        run_simulation(ETHANOL, ",".join(members), tmp_path / "run", settings, progress=False)
    assert (tmp_path / "run" / "checkpoint.chk").is_file()


def test_train_init_fine_tunes_from_the_base(tmp_path, capsys):
    from schnet_md.cli import main

    data = shared_file("rmd17/rmd17_ethanol_train_01.npz")
    base = save_model(random_model(elements=(1, 6, 8), dtype=torch.float32, n_features=16, n_interactions=2),
                      tmp_path / "base.pt")
    assert main(["train", "--data", str(data), "--labels", "old", "--max-frames", "20", "--init", str(base),
                 "--lr", "0", "--epochs", "1", "--batch-size", "10", "--out", str(tmp_path / "member")]) == 0
    tuned, _ = load_model(tmp_path / "member" / "model.pt")
    original, _ = load_model(base)
    for key, value in original.state_dict().items():
        assert torch.equal(value, tuned.state_dict()[key]), key     # lr 0: the base, weights and statistics


def test_check_reports_the_committee_disagreement_along_md(members):
    from schnet_md.check import CheckSettings, check, format_report

    report = check(",".join(members), ETHANOL, CheckSettings(md_steps=100, scan_points=5, temperature_k=400),
                   log=lambda _: None)
    sigma = [m["force_disagreement_kj_mol_nm"] for m in report["md"]]
    assert len(sigma) == 2 and all(s["max"] >= s["mean"] > 0 and len(s["along_run"]) == 10 for s in sigma)
    assert "committee force disagreement" in format_report(report)


def test_disagreement_unit_matches_openmm_forces(members):
    """sigma_F in kJ/mol/nm equals the spread of the members' forces as OpenMM reports them (an independent
    path through the export's nm/kJ boundary), so a wrong conversion factor fails here."""
    from schnet_md.committee import ForceDisagreement

    s = read_structure(ETHANOL)
    forces = np.stack([energy_forces(create_torch_force(m, s.topology, dtype="float64"), s)[1] for m in members])
    expected = np.sqrt(((forces - forces.mean(0)) ** 2).sum(-1).mean(0)).max()
    assert ForceDisagreement(members, s.atomic_numbers)(s.positions_nm) == pytest.approx(expected, rel=1e-6)
