"""NPT of a periodic water box through the cell list: the barostat moves the box both ways for 10,000 steps and
the SchNet force stays exact at every box (issue #29's 'done when').

    python benchmarks/npt_water.py [--steps 10000] [--atoms 350] [--platform CPU]   -> benchmarks/npt_water.json

System: a cubic TIP3P water box (amber14/tip3p, PME, rigid waters) plus a periodic SchNet force on every atom
through the in-graph cell list (a schnet2018-shaped model, 5 Å cutoff, random weights scaled down: no trained
water model ships, so SchNet is a perturbation here and TIP3P sets the density). MonteCarloBarostat at 1 bar
every 25 steps, LangevinMiddleIntegrator 300 K, 1/ps, 1 fs. Every 500 steps the SchNet energy of the current box
and positions is compared with a fresh all-pairs export at that box. The record keeps scalars: box edge range,
moves up and down, the largest energy difference, wall time and versions.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch  # noqa: F401  (first)
import numpy as np
import openmm
import openmm.app as app
from openmm import unit

from schnet_md import __version__
from schnet_md.bench import water_box
from schnet_md.export import create_torch_force
from schnet_md.model import SchNet, config_from_preset

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10000)
    parser.add_argument("--atoms", type=int, default=350, help="about this many atoms (default 350: 1.5 nm)")
    parser.add_argument("--platform", default="CPU")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "npt_water.json"))
    args = parser.parse_args()

    topology, positions = water_box(args.atoms)
    forcefield = app.ForceField("amber14/tip3p.xml")
    system = forcefield.createSystem(topology, nonbondedMethod=app.PME, nonbondedCutoff=0.7 * unit.nanometer,
                                     constraints=app.HBonds, rigidWater=True)
    torch.manual_seed(11)
    model = SchNet(config_from_preset("schnet2018", [1, 8], energy_unit="kcal/mol", n_features=16,
                                      n_interactions=2)).eval()
    with torch.no_grad():
        model.readout.scale.fill_(0.05)           # ~0.1 kcal/mol per atom: a perturbation of TIP3P
    schnet = create_torch_force(model, topology, neighbor_list="cells", positions=positions)
    schnet.setForceGroup(1)
    system.addForce(schnet)
    barostat = openmm.MonteCarloBarostat(1.0 * unit.bar, 300 * unit.kelvin, 25)
    barostat.setRandomNumberSeed(11)
    system.addForce(barostat)
    integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1 / unit.picosecond, 0.001 * unit.picosecond)
    integrator.setRandomNumberSeed(11)
    simulation = app.Simulation(topology, system, integrator, openmm.Platform.getPlatformByName(args.platform))
    simulation.context.setPositions(positions)
    simulation.minimizeEnergy(maxIterations=200)
    simulation.context.setVelocitiesToTemperature(300 * unit.kelvin, 11)

    # the reference: a fresh all-pairs export, evaluated alone at the run's current box
    reference_system = openmm.System()
    for atom in topology.atoms():
        reference_system.addParticle(atom.element.mass)
    reference_system.addForce(create_torch_force(model, topology, neighbor_list="all_pairs"))
    reference = openmm.Context(reference_system, openmm.VerletIntegrator(0.001),
                               openmm.Platform.getPlatformByName("CPU"))

    edges, worst = [], 0.0
    started = time.perf_counter()
    for _ in range(args.steps // 500):
        simulation.step(500)
        state = simulation.context.getState(getPositions=True, getEnergy=True, groups={1})
        box = state.getPeriodicBoxVectors()
        reference.setPeriodicBoxVectors(*box)
        reference.setPositions(state.getPositions())
        e_ref = reference.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
        worst = max(worst, abs(state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole) - e_ref))
        edges.append(box[0][0].value_in_unit(unit.nanometer))
    wall = time.perf_counter() - started
    start_edge = topology.getPeriodicBoxVectors()[0][0].value_in_unit(unit.nanometer)
    steps = np.diff([start_edge] + edges)
    record = {
        "command": "python benchmarks/npt_water.py " + " ".join(sys.argv[1:]),
        "machine": platform.processor() or platform.machine(), "python": platform.python_version(),
        "torch": torch.__version__, "openmm": openmm.__version__, "schnet_md": __version__,
        "atoms": topology.getNumAtoms(), "steps": args.steps, "platform": args.platform,
        "box_edge_nm": {"start": round(start_edge, 5), "min": round(min(edges), 5), "max": round(max(edges), 5),
                        "end": round(edges[-1], 5)},
        "samples_every_500_steps": {"grew": int((steps > 0).sum()), "shrank": int((steps < 0).sum())},
        "largest_schnet_energy_difference_to_fresh_all_pairs_export_kj_mol": worst,
        "wall_seconds": round(wall, 1),
    }
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
