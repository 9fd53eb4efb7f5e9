"""pair_style schnet in production decks (issue #29): LAMMPS inputs as users write them (hybrid styles, molecular
data files, repeated pair_style lines, ghost deep on small boxes, a plain lmp), run by the wheel's lmp under mpirun
on 1, 2 and 4 ranks, each against the numbers it must equal or the one-line error it must give."""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, SYSTEMS, random_model
from schnet_md.lammps import export_lammps
from schnet_md.structures import read_structure

lammps_plugin = pytest.importorskip("schnet_md_lammps")

NKTV2P = 1.6021765e6     # units metal: virial (eV) / volume (Å^3) -> bar, as LAMMPS's force->nktv2p
ELEMENTS = ["H", "C", "O"]
MASS = {"H": 1.008, "C": 12.011, "O": 15.999}
BOX = 13.0


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """128 features, as real models have: the feature rows of a few ghosts fill LAMMPS's smallest communication
    buffers (1000 values), so a buffer sized without them shows (the hybrid crash of issue #29)."""
    lammps_plugin.build(quiet=True)
    model = random_model("schnet2018", elements=(1, 6, 8), n_features=128, n_interactions=3, cutoff=3.0,
                         n_gaussians=12, energy_unit="kcal/mol")
    return export_lammps(model, tmp_path_factory.mktemp("model") / "model-lammps.pt")


@pytest.fixture(scope="module")
def ethanols():
    return ethanol_box()


def ethanol_box():
    """Four ethanol molecules, each whole inside a periodic box 13 Å across: element symbols, positions (Å),
    molecule ids, and bonds (atom index pairs within a molecule closer than 1.65 Å)."""
    s = read_structure(SYSTEMS / "ethanol" / "ethanol.pdb")
    one = s.positions_nm * 10.0
    one = one - one.mean(axis=0)
    symbols1 = [{1: "H", 6: "C", 8: "O"}[int(z)] for z in s.atomic_numbers]
    rng = np.random.default_rng(7)
    positions, symbols, molecule, bonds = [], [], [], []
    while len(molecule) < 4 * len(one):
        q, r = np.linalg.qr(rng.normal(size=(3, 3)))
        candidate = one @ (q * np.sign(np.diag(r))) + 2.5 + rng.random(3) * (BOX - 5.0)
        if positions:
            d = candidate[:, None, :] - np.array(positions)[None, :, :]
            d -= BOX * np.round(d / BOX)
            if np.linalg.norm(d, axis=-1).min() < 2.2:
                continue
        start = len(positions)
        positions += list(candidate)
        symbols += symbols1
        molecule += [start // len(one) + 1] * len(one)
        for a in range(len(one)):
            for b in range(a + 1, len(one)):
                if np.linalg.norm(one[a] - one[b]) < 1.65:
                    bonds.append((start + a, start + b))
    return symbols, np.array(positions), molecule, bonds


def write_data(path, symbols, positions, molecule=None, bonds=()):
    """atom_style atomic, or atom_style full (molecule ids, zero charges, a Bonds section) when molecule is given."""
    full = molecule is not None
    lines = ["schnet-md test data", "", f"{len(symbols)} atoms", f"{len(ELEMENTS)} atom types"]
    if full:
        lines += [f"{len(bonds)} bonds", "1 bond types"]
    lines += ["", f"0 {BOX} xlo xhi", f"0 {BOX} ylo yhi", f"0 {BOX} zlo zhi", "", "Masses", ""]
    lines += [f"{k + 1} {MASS[e]}" for k, e in enumerate(ELEMENTS)]
    lines += ["", "Atoms # " + ("full" if full else "atomic"), ""]
    for n, (e, p) in enumerate(zip(symbols, positions)):
        t = ELEMENTS.index(e) + 1
        middle = f"{molecule[n]} {t} 0.0" if full else f"{t}"
        lines.append(f"{n + 1} {middle} {p[0]:.12f} {p[1]:.12f} {p[2]:.12f}")
    if full:
        lines += ["", "Bonds", ""] + [f"{k + 1} 1 {a + 1} {b + 1}" for k, (a, b) in enumerate(bonds)]
    path.write_text("\n".join(lines) + "\n")


HEADER = """units metal
atom_style {style}
atom_modify map array
boundary p p p
read_data system.data
{bonds}
compute pe_atom all pe/atom
compute stress_atom all stress/atom NULL pair
compute virial all pressure NULL virial
"""

# one `run 0` with a label: thermo numbers in a RESULT line, per-atom forces, energies and virials in LABEL.dump
MEASURE = """dump {label} all custom 1 {label}.dump id fx fy fz c_pe_atom c_stress_atom[*]
dump_modify {label} sort id format float %.17g
run 0
undump {label}
print "RESULT {label} $(pe:%.17g) $(c_virial[1]:%.17g) $(c_virial[2]:%.17g) $(c_virial[3]:%.17g) $(c_virial[4]:%.17g) $(c_virial[5]:%.17g) $(c_virial[6]:%.17g) $(vol:%.17g)"
"""


class Run:
    """The numbers of one labelled `run 0`: energy, global virial [6] (energy units), per atom (by id): forces
    [n, 3], energies [n], virials [n, 6] (energy units, stress/atom turned back into -W)."""

    def __init__(self, folder, label, fields):
        pe, *pressure, volume = map(float, fields)
        self.energy = pe
        self.virial = np.array(pressure) * volume / NKTV2P
        table = np.loadtxt(folder / f"{label}.dump", skiprows=9, ndmin=2)
        self.forces, self.atom_energy = table[:, 1:4], table[:, 4]
        self.atom_virial = -table[:, 5:11] / NKTV2P

    def __add__(self, other):
        total = object.__new__(Run)
        for name in ("energy", "virial", "forces", "atom_energy", "atom_virial"):
            setattr(total, name, getattr(self, name) + getattr(other, name))
        return total


def deck_folder(parent, name, data):
    """A folder for one deck, holding a copy of the data file `data` as system.data."""
    folder = parent / name
    folder.mkdir(parents=True)
    (folder / "system.data").write_text(data.read_text())
    return folder


def run_deck(folder, body, ranks=1, style="atomic", bonds="", check=True):
    """Run HEADER + body in folder; returns {label: Run} or, with check=False, the finished process."""
    (folder / "in.deck").write_text(HEADER.format(style=style, bonds=bonds) + body)
    proc = subprocess.run(lammps_plugin.lammps_command(["-in", "in.deck", "-log", "none"], ranks), cwd=folder,
                          env=lammps_plugin.run_environment(), capture_output=True, text=True, timeout=600)
    if not check:
        return proc
    assert proc.returncode == 0, lammps_plugin.lammps_error(proc.stdout + proc.stderr)
    return results(folder, proc.stdout)


def results(folder, stdout):
    fields = [line.split() for line in stdout.splitlines() if line.startswith("RESULT")]
    return {f[1]: Run(folder, f[1], f[2:]) for f in fields}


def refused(folder, body, **kwargs) -> str:
    proc = run_deck(folder, body, check=False, **kwargs)
    assert proc.returncode != 0, "LAMMPS should have refused this deck"
    return lammps_plugin.lammps_error(proc.stdout + proc.stderr)


def assert_same(run, reference, what=""):
    scale = max(1.0, abs(reference.energy))
    assert run.energy == pytest.approx(reference.energy, rel=1e-12, abs=1e-12 * scale), what
    np.testing.assert_allclose(run.forces, reference.forces, rtol=0, atol=1e-10, err_msg=what)
    np.testing.assert_allclose(run.atom_energy, reference.atom_energy, rtol=0, atol=1e-10, err_msg=what)
    # thermo and dumps print %.17g; stress/atom and pressure pass through nktv2p and back
    np.testing.assert_allclose(run.virial, reference.virial, rtol=1e-9, atol=1e-9, err_msg=what)
    np.testing.assert_allclose(run.atom_virial, reference.atom_virial, rtol=1e-9, atol=1e-9, err_msg=what)


def assert_consistent(run, what=""):
    """Per-atom energies and virials add up to the global ones."""
    assert run.atom_energy.sum() == pytest.approx(run.energy, rel=1e-10, abs=1e-10), what
    np.testing.assert_allclose(run.atom_virial.sum(axis=0), run.virial, rtol=1e-7, atol=1e-8, err_msg=what)


def schnet(model, ghost, elements="H C O", style="schnet"):
    return f"pair_style {style} ghost {ghost}\npair_coeff * * {model} {elements}\n"


@pytest.fixture(scope="module")
def box_data(tmp_path_factory, ethanols):
    """The ethanol box as an atom_style atomic data file."""
    path = tmp_path_factory.mktemp("box") / "atomic.data"
    symbols, positions, _, _ = ethanols
    write_data(path, symbols, positions)
    return path


def test_a_new_pair_style_line_starts_from_the_defaults(box_data, model_file, tmp_path):
    """pair_style schnet ghost deep, a run, then `pair_style schnet cutoff 2.0` and `pair_style schnet`: the last
    line means ghost exchange, no cutoff keyword (which this model, with its own 3 Å cutoff, would refuse) and the
    ghost shell of exchange mode; the model of the earlier pair_coeff stays."""
    folder = deck_folder(tmp_path, "repeated", box_data)
    body = (schnet(model_file, "deep") + MEASURE.format(label="deep")
            + "pair_style schnet cutoff 2.0\npair_style schnet\n" + MEASURE.format(label="again"))
    proc = run_deck(folder, body, check=False)
    assert proc.returncode == 0, lammps_plugin.lammps_error(proc.stdout + proc.stderr)
    fresh_proc = run_deck(deck_folder(tmp_path, "fresh", box_data),
                          schnet(model_file, "exchange") + MEASURE.format(label="exchange"), check=False)
    ghosts = [re.findall(r"Nghost:\s+(\S+) ave", p.stdout) for p in (proc, fresh_proc)]
    assert len(ghosts[0]) == 2 and float(ghosts[0][0]) > float(ghosts[0][1])     # deep, then exchange
    assert ghosts[0][1] == ghosts[1][0]      # the deep shell was given back
    runs = results(folder, proc.stdout)
    assert_same(runs["again"], runs["deep"])


LJ = "pair_style lj/cut 3.0\npair_coeff * * 0.01 1.1\n"


@pytest.mark.parametrize("ghost", ["exchange", "deep"])
def test_hybrid_overlay_with_lj_is_the_sum_of_the_two_alone(box_data, model_file, ghost, tmp_path):
    """schnet + lj/cut under hybrid/overlay: energy, forces, virial, per-atom energies (compute pe/atom) and
    per-atom virials (compute stress/atom) equal schnet alone plus lj/cut alone, on 1, 2 and 4 ranks; the
    per-atom numbers add up to the global ones and every rank count gives the same. The overlay runs first, so
    LAMMPS sizes its buffers for it alone."""
    body = (f"pair_style hybrid/overlay schnet ghost {ghost} lj/cut 3.0\n"
            + f"pair_coeff * * schnet {model_file} H C O\npair_coeff * * lj/cut 0.01 1.1\n"
            + MEASURE.format(label="overlay")
            + schnet(model_file, ghost) + MEASURE.format(label="schnet") + LJ + MEASURE.format(label="lj"))
    first = None
    for ranks in (1, 2, 4):
        folder = deck_folder(tmp_path, f"np{ranks}", box_data)
        runs = run_deck(folder, body, ranks=ranks)
        assert set(runs) == {"schnet", "lj", "overlay"}
        assert abs(runs["lj"].energy) > 1e-3 and np.abs(runs["schnet"].atom_virial).max() > 1e-5
        assert_same(runs["overlay"], runs["schnet"] + runs["lj"], f"{ranks} ranks")
        for label in ("schnet", "overlay"):
            assert_consistent(runs[label], f"{label}, {ranks} ranks")
        if first is None:
            first = runs["overlay"]
        else:
            assert_same(runs["overlay"], first, f"{ranks} ranks against 1 rank")


ATOMIC_NUMBER = {"H": 1.0, "C": 6.0, "O": 8.0}


def zbl_coeffs(sub_style=""):
    """pair_coeff lines for zbl on every type pair (hybrid/overlay cannot mix them), `zbl ` as sub_style in hybrid."""
    z = [ATOMIC_NUMBER[e] for e in ELEMENTS]
    return "".join(f"pair_coeff {a} {b} {sub_style}{z[a - 1]} {z[b - 1]}\n"
                   for a in range(1, 4) for b in range(a, 4))


@pytest.mark.parametrize("ghost", ["exchange", "deep"])
def test_hybrid_overlay_with_zbl_is_the_sum_of_the_two_alone(box_data, model_file, ghost, tmp_path):
    """schnet + zbl (short-range repulsion, switched off between 2 and 3 Å) under hybrid/overlay, 1 and 2 ranks
    (the overlay first, as above)."""
    body = (f"pair_style hybrid/overlay schnet ghost {ghost} zbl 2.0 3.0\n"
            + f"pair_coeff * * schnet {model_file} H C O\n" + zbl_coeffs("zbl ") + MEASURE.format(label="overlay")
            + schnet(model_file, ghost) + MEASURE.format(label="schnet")
            + "pair_style zbl 2.0 3.0\n" + zbl_coeffs() + MEASURE.format(label="zbl"))
    for ranks in (1, 2):
        folder = deck_folder(tmp_path, f"np{ranks}", box_data)
        runs = run_deck(folder, body, ranks=ranks)
        assert abs(runs["zbl"].energy) > 1e-3
        assert_same(runs["overlay"], runs["schnet"] + runs["zbl"], f"{ranks} ranks")


@pytest.mark.parametrize("ghost", ["exchange", "deep"])
@pytest.mark.parametrize("hybrid, lj_pairs", [("hybrid", "* 3"), ("hybrid/overlay", "* *")])
def test_null_types_under_hybrid_belong_to_the_other_style(box_data, ethanols, model_file, hybrid, lj_pairs, ghost,
                                                           tmp_path):
    """schnet on H and C (O is NULL) and lj/cut on the pairs with an O (hybrid) or on all pairs (hybrid/overlay):
    the model sees only the H and C atoms (O atoms within its cutoff are no error here: they belong to lj/cut),
    so the numbers equal schnet on the data without O plus lj/cut alone on the same pairs; 1, 2 and 4 ranks."""
    symbols, positions, _, _ = ethanols
    keep = np.array([e != "O" for e in symbols])
    alone = tmp_path / "no-oxygen"
    alone.mkdir()
    write_data(alone / "system.data", [e for e in symbols if e != "O"], positions[keep])
    model_part = run_deck(alone, schnet(model_file, ghost) + MEASURE.format(label="schnet"))["schnet"]
    body = (f"pair_style lj/cut 3.0\npair_coeff * * 0.0 1.1\npair_coeff {lj_pairs} 0.01 1.1\n"
            + MEASURE.format(label="lj")
            + f"pair_style {hybrid} schnet ghost {ghost} lj/cut 3.0\n"
            + f"pair_coeff * * schnet {model_file} H C NULL\npair_coeff {lj_pairs} lj/cut 0.01 1.1\n"
            + MEASURE.format(label="hybrid"))
    for ranks in (1, 2, 4):
        folder = deck_folder(tmp_path, f"np{ranks}", box_data)
        runs = run_deck(folder, body, ranks=ranks)
        expected = runs["lj"]
        for name in ("forces", "atom_energy", "atom_virial"):     # the model's part, on the H and C atoms
            getattr(expected, name)[keep] += getattr(model_part, name)
        expected.energy += model_part.energy
        expected.virial = expected.virial + model_part.virial
        assert_same(runs["hybrid"], expected, f"{ranks} ranks")


SPECIAL_BONDS_ERROR = ("pair_style schnet: special_bonds weights of 0 (1-2 1-3 1-4) leave bonded pairs of model atoms "
                       "out of the neighbour list, so the model would not see them; set special_bonds lj/coul 1.0 1.0 "
                       "1.0")
BOND_STYLE = "bond_style zero\nbond_coeff *"


@pytest.fixture(scope="module")
def full_data(tmp_path_factory, ethanols):
    """The ethanol box as an atom_style full data file with its bonds (and so 1-2, 1-3 and 1-4 neighbours)."""
    path = tmp_path_factory.mktemp("molecular") / "full.data"
    write_data(path, *ethanols)
    return path


@pytest.mark.parametrize("ghost", ["exchange", "deep"])
def test_bonded_molecules_need_special_bonds_that_keep_their_pairs(box_data, full_data, model_file, ghost, tmp_path):
    """atom_style full with a Bonds section. Default special_bonds (0 0 0) would drop the bonded pairs from the
    neighbour list: the run stops with one line saying what to set. With special_bonds lj/coul 1.0 1.0 1.0, or
    with weights that keep the pairs listed but flagged (0.5), the numbers equal the atom_style atomic run."""
    for ranks in (1, 2):
        atomic = run_deck(deck_folder(tmp_path, f"atomic{ranks}", box_data),
                          schnet(model_file, ghost) + MEASURE.format(label="atomic"), ranks=ranks)["atomic"]
        error = refused(deck_folder(tmp_path, f"default{ranks}", full_data),
                        schnet(model_file, ghost) + MEASURE.format(label="default"), ranks=ranks, style="full",
                        bonds=BOND_STYLE)
        assert SPECIAL_BONDS_ERROR in error, error
        body = schnet(model_file, ghost)
        for label, weights in (("one", "1.0 1.0 1.0"), ("half", "0.5 0.5 0.5")):
            body += f"special_bonds lj/coul {weights}\n" + MEASURE.format(label=label)
        runs = run_deck(deck_folder(tmp_path, f"full{ranks}", full_data), body, ranks=ranks,
                        style="full", bonds=BOND_STYLE)
        for label in ("one", "half"):
            assert_same(runs[label], atomic, f"special_bonds {label}, {ranks} ranks")


def test_bonded_molecules_under_hybrid_keep_the_other_styles_exclusions(box_data, full_data, model_file, tmp_path):
    """Under hybrid/overlay with lj/cut, bonded pairs stay listed with special_bonds 1.0e-100 and lj/cut gets its
    exclusions back with pair_modify pair lj/cut special lj/coul 0.0 0.0 0.0: the numbers equal schnet on the
    atomic data plus lj/cut alone on the full data with the default exclusions. Default special_bonds stop the
    run with the hybrid recipe; 1 and 2 ranks."""
    overlay = (f"pair_style hybrid/overlay schnet lj/cut 3.0\npair_coeff * * schnet {model_file} H C O\n"
               "pair_coeff * * lj/cut 0.01 1.1\n")
    for ranks in (1, 2):
        atomic = run_deck(deck_folder(tmp_path, f"atomic{ranks}", box_data),
                          schnet(model_file, "exchange") + MEASURE.format(label="atomic"), ranks=ranks)["atomic"]
        lj = run_deck(deck_folder(tmp_path, f"lj{ranks}", full_data),
                      LJ + MEASURE.format(label="lj"), ranks=ranks, style="full", bonds=BOND_STYLE)["lj"]
        error = refused(deck_folder(tmp_path, f"default{ranks}", full_data),
                        overlay + MEASURE.format(label="default"), ranks=ranks, style="full", bonds=BOND_STYLE)
        assert ("under pair_style hybrid set special_bonds lj/coul 1.0e-100 1.0e-100 1.0e-100 (pairs stay listed) "
                "and give the sub-styles that exclude them pair_modify pair STYLE special lj/coul 0.0 0.0 0.0") in error
        body = (overlay + "special_bonds lj/coul 1.0e-100 1.0e-100 1.0e-100\n"
                "pair_modify pair lj/cut special lj/coul 0.0 0.0 0.0\n" + MEASURE.format(label="overlay"))
        runs = run_deck(deck_folder(tmp_path, f"overlay{ranks}", full_data), body, ranks=ranks,
                        style="full", bonds=BOND_STYLE)
        assert_same(runs["overlay"], atomic + lj, f"{ranks} ranks")


def test_ghost_deep_refuses_a_shell_that_cannot_fit(tmp_path):
    """A 324-atom box (14.8 Å) with a six-block, 5 Å model on 2 ranks: ghost deep would hold a 32 Å shell of
    ghosts around each half box (~44k atoms, ~85 GB). The run stops in init with the estimate and the way out
    instead of being killed by the kernel; a 3 GB data limit per rank makes the verdict the same on any machine."""
    rng = np.random.default_rng(3)
    side, points = 14.8, []
    while len(points) < 324:
        p = rng.random(3) * side
        if all(np.linalg.norm((p - q) - side * np.round((p - q) / side)) > 1.2 for q in points):
            points.append(p)
    model = random_model("schnet2018", elements=(1, 8), n_features=128, n_interactions=6, cutoff=5.0)
    model_path = export_lammps(model, tmp_path / "model.pt")
    lammps_plugin.write_data(tmp_path / "system.data", np.where(np.arange(324) % 3 == 0, 8, 1), np.array(points),
                             ["H", "O"], cell=np.diag([side] * 3))
    (tmp_path / "in.deep").write_text(f"units metal\natom_style atomic\nread_data system.data\n"
                                      f"pair_style schnet ghost deep\npair_coeff * * {model_path} H O\nrun 0\n")
    limit = 3 * 2 ** 30

    def cap():
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))

    proc = subprocess.run(lammps_plugin.lammps_command(["-in", "in.deep", "-log", "none"], 2), cwd=tmp_path,
                          env=lammps_plugin.run_environment(), capture_output=True, text=True, timeout=600,
                          preexec_fn=cap)
    error = lammps_plugin.lammps_error(proc.stdout + proc.stderr)
    assert proc.returncode != 0
    found = re.search(r"ghost deep would hold about (\d+) atoms per rank \(a ghost shell 32 Å deep\) and need about "
                      r"([0-9.e+]+) GB, more than the ([0-9.]+) GB a rank has here; use pair_style schnet ghost "
                      r"exchange", error)
    assert found, error
    assert 30000 < int(found.group(1)) < 60000 and float(found.group(2)) > 20 and float(found.group(3)) <= 3.3


def test_errors_name_the_source_file_not_a_build_folder(box_data, model_file, tmp_path):
    """The plugin is built once per machine from whichever checkout asks first: its messages cite pair_schnet.cpp
    by name. device cuda on a machine without a GPU is refused in one line."""
    folder = deck_folder(tmp_path, "errors", box_data)
    error = refused(folder, f"pair_style schnet ghosts deep\npair_coeff * * {model_file} H C O\nrun 0\n")
    assert re.search(r"ERROR: pair_style schnet: unknown keyword 'ghosts' \(use ghost, threads, device, cutoff\) "
                     r"\(pair_schnet\.cpp:\d+\)", error), error
    assert str(lammps_plugin.SOURCE.parent) not in error
    if not torch.cuda.is_available():
        error = refused(folder, f"pair_style schnet device cuda\npair_coeff * * {model_file} H C O\nrun 0\n")
        assert "device cuda requested, but libtorch sees no CUDA device (pair_schnet.cpp:" in error


def test_run_help_is_its_own():
    """`schnet-md-lammps run --help` explains run and starts no LAMMPS; `run -- -h` would hand -h to lmp."""
    for flag in ("--help", "-h"):
        proc = subprocess.run([sys.executable, "-m", "schnet_md_lammps", "run", flag], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("usage: schnet-md-lammps run [-h] [-np N] [LMP_ARGS ...]")
        assert "LAMMPS (" not in proc.stdout + proc.stderr


def test_plain_lmp_as_the_readme_says(box_data, model_file, tmp_path):
    """The README's plain-lmp block, run as written by bash with the lammps wheel's `lmp` command on PATH: the
    LAMMPS_PLUGIN_PATH export works, so does a `plugin load` line in the input, and neither means `Unrecognized
    pair style`; the `lmp` command run by this environment's Python also finds the plugin (entry point)."""
    text = (ROOT / "README.md").read_text().split("### A plain `lmp`", 1)[1]
    block = text.split("```bash", 1)[1].split("```", 1)[0]
    lmp = next(Path(f.locate()).resolve() for f in metadata.files("lammps") if f.name == "lmp" and "bin" in f.parts)
    env = {k: v for k, v in os.environ.items() if k not in ("LAMMPS_PLUGIN_PATH", "LD_LIBRARY_PATH")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), str(lmp.parent), env["PATH"]])
    (tmp_path / "system.data").write_text(box_data.read_text())
    deck = (f"units metal\natom_style atomic\nread_data system.data\npair_style schnet\n"
            f"pair_coeff * * {model_file} H C O\nrun 0\n" 'print "ENERGY $(pe:%.17g)"\n')
    (tmp_path / "in.lmp").write_text(deck)
    (tmp_path / "in.load").write_text(f"plugin load {lammps_plugin.plugin_path()}\n" + deck)

    def energy(command):
        proc = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return float(next(line for line in proc.stdout.splitlines() if line.startswith("ENERGY")).split()[1])

    reference = energy(block)
    assert energy("lmp -in in.load") == reference
    assert energy(f"{sys.executable} -c 'import sys; from lammps.executable import lmp; lmp()' -in in.lmp") == reference
    proc = subprocess.run([str(lmp), "-in", "in.lmp"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and "Unrecognized pair style 'schnet'" in proc.stdout + proc.stderr
