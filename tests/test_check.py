"""`schnet-md check`: the robustness suite finds the spurious minimum of the ethanol model as first shipped
(kept in tests/fixtures; issue #15: a plain minimizeEnergy() tore ethanol apart) and passes a model that minimises
cleanly; every shipped model minimises cleanly and runs short MD."""

from __future__ import annotations

import json

import pytest

from conftest import FIXTURES, SYSTEMS
from schnet_md.check import CheckSettings, check, format_report

FAST = CheckSettings(md_steps=200, scan_points=9, temperature_k=500.0)
UNREFINED_ETHANOL = str(FIXTURES / "ethanol_unrefined.pt")     # the shipped ethanol model before `refine`


@pytest.fixture(scope="module")
def ethanol_report():
    return check(UNREFINED_ETHANOL, SYSTEMS / "ethanol" / "ethanol.pdb", FAST, log=lambda _: None)


def test_check_finds_the_ethanol_models_spurious_minimum(ethanol_report):
    r = ethanol_report
    assert not r["passed"]
    assert not r["minimisation"]["passed"] and r["minimisation"]["broken"]
    assert r["minimisation"]["largest_bond_change"] > 1.0          # a bond more than doubled
    assert not r["molecule_scan"]["passed"]                          # stretching the molecule lowers the energy
    assert r["molecule_scan"]["lowest_below_relaxed_kcal_mol"] > 10.0
    assert "FAILED" in format_report(r)


def test_check_passes_a_model_that_minimises_cleanly():
    r = check("alanine-dipeptide", SYSTEMS / "alanine-dipeptide" / "alanine-dipeptide.pdb", FAST, log=lambda _: None)
    assert r["minimisation"]["passed"], format_report(r)
    assert r["minimisation"]["largest_bond_change"] < 0.1
    assert all(m["passed"] for m in r["md"]), format_report(r)
    assert len(r["bond_scans"]["bonds"]) == 21


def test_cli_exit_status_and_json(tmp_path, capsys):
    from schnet_md.cli import main

    code = main(["check", UNREFINED_ETHANOL, str(SYSTEMS / "ethanol" / "ethanol.pdb"), "--steps", "100",
                 "--json", str(tmp_path / "check.json")])
    assert code == 2
    report = json.loads((tmp_path / "check.json").read_text())
    assert report["passed"] is False and "bond_scans" in report
    assert "verdict: FAILED" in capsys.readouterr().out



def test_a_bond_scan_is_judged_only_until_the_moving_atom_collides():
    """Isomer 63 has a linear C-C#C: stretching C4-C5 by moving C5 pushes it through C6, where the true energy
    climbs and then falls again; that part is not held against the model. H stretches run the whole range."""
    r = check("iso17x", SYSTEMS / "c7o2h10_63" / "c7o2h10_63.pdb", CheckSettings(md_steps=10, scan_points=9),
              log=lambda _: None)
    rows = {row["bond"]: row for row in r["bond_scans"]["bonds"]}
    assert rows["MOL1:C4-MOL1:C5"]["judged_to_factor"] < 1.6
    assert all(row["judged_to_factor"] == 2.5 for name, row in rows.items() if ":H" in name.split("-")[1])



SHIPPED_ON = [("ethanol", "ethanol"), ("aspirin", "aspirin"), ("alanine-dipeptide", "alanine-dipeptide"),
              ("iso17x", "c7o2h10_63"), ("iso17x", "c7o2h10_128"), ("iso17x", "c7o2h10_7")]


@pytest.mark.parametrize("model,system", SHIPPED_ON, ids=[f"{m}-{s}" for m, s in SHIPPED_ON])
def test_every_shipped_model_minimises_cleanly_and_runs_short_md(model, system):
    """What a user does first with a shipped model: minimizeEnergy(), then MD at 300 K and 500 K."""
    r = check(model, SYSTEMS / system / f"{system}.pdb", CheckSettings(md_steps=400, scan_points=5), log=lambda _: None)
    assert r["minimisation"]["passed"], format_report(r)
    assert all(m["passed"] for m in r["md"]), format_report(r)
