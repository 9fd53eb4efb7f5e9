"""Training data is checked before training (issue #28): each probe writes a real small file (rMD17 npz, extended
XYZ, an iso17x-style folder) with one thing wrong and expects a refusal that names the file, the array and the
frames, instead of a model trained silently on it. The project's own data, refinement-like frames and energy-only
training by explicit request still pass."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED_DATA, shared_file
from schnet_md.cli import main
from schnet_md.data import ISO17X_SPLITS, DataError, read_data, read_iso17x, read_qm9, read_rmd17

N_FRAMES = 12


@pytest.fixture(scope="module")
def ethanol():
    """The first frames of rMD17 ethanol, every array (Å, kcal/mol)."""
    with np.load(shared_file("rmd17/rmd17_ethanol_train_01.npz")) as npz:
        return {k: npz[k][:N_FRAMES] if npz[k].ndim and len(npz[k]) == 1000 else npz[k] for k in npz.files}


def write_rmd17(folder: Path, arrays: dict, **changes) -> Path:
    path = folder / "frames.npz"
    np.savez(path, **{**arrays, **changes})
    return path


def refusal(path, **kwargs) -> str:
    with pytest.raises(DataError) as error:
        read_data(path, **kwargs)
    message = str(error.value)
    assert all(line.startswith(str(path)) for line in message.splitlines()), message   # every line names the file
    return message


def test_every_data_set_of_the_project_passes():
    from schnet_md.data import _read_splits
    shared_file("rmd17/rmd17_ethanol_train_01.npz")                    # (skips where the data is absent)
    for path in sorted((SHARED_DATA / "rmd17").glob("*.npz")):
        for labels in ("new", "old"):
            assert len(read_rmd17(path, labels)) == 1000
    folder = shared_file("iso17x/iso17x.npz").parent
    assert len(read_iso17x(folder, "all")) == 129129           # every frame's values
    n = {"train": 78280, "validation": 4120, "train_known": 82400, "test_within": 20600, "test_other": 26000,
         "eq_known": 103, "eq_other": 26}
    assert {s: len(_read_splits(folder / "splits.npz", s, 129129)) for s in ISO17X_SPLITS[:-1]} == n
    assert len(read_qm9(shared_file("qm9/qm9_u0.npz"))) == 130831


def test_coordinates_scaled_a_millionfold_are_refused(tmp_path, ethanol):
    path = write_rmd17(tmp_path, ethanol, coords=ethanol["coords"] * 1e6)
    assert "coords hold coordinates beyond 10000 Å" in refusal(path)


def test_atoms_on_top_of_each_other_are_refused(tmp_path, ethanol):
    coords = ethanol["coords"].copy()
    coords[3, 1] = coords[3, 0]
    message = refusal(write_rmd17(tmp_path, ethanol, coords=coords))
    assert "coords put atoms closer than 0.3 Å (atoms 0 and 1, from 0, of frame 3: 0.000 Å) in frame(s) 3 (1 of 12)" \
        in message
    # lengths in nm read as Å: every bond to hydrogen is ~0.1
    assert "(12 of 12)" in refusal(write_rmd17(tmp_path, ethanol, coords=ethanol["coords"] / 10))


def test_frames_far_from_equilibrium_pass_the_overlap_check(tmp_path, ethanol):
    """What refinement labels passes: two methyl hydrogens pinched to 0.64 Å, a molecule stretched to twice its
    size; the same pinch taken on to 0.2 Å is refused."""
    coords = ethanol["coords"].copy()
    z = ethanol["nuclear_charges"]
    hydrogens = np.flatnonzero(z == 1)
    h1, h2 = min(((a, b) for a in hydrogens for b in hydrogens if a < b),
                 key=lambda p: np.linalg.norm(coords[0, p[0]] - coords[0, p[1]]))
    mid, axis = (coords[0, h1] + coords[0, h2]) / 2, coords[0, h2] - coords[0, h1]
    axis /= np.linalg.norm(axis)

    def pinched(distance):
        frames = coords.copy()
        frames[0, h1], frames[0, h2] = mid - distance / 2 * axis, mid + distance / 2 * axis
        frames[1] = 2.0 * frames[1]
        return write_rmd17(tmp_path, ethanol, coords=frames)

    data = read_data(pinched(0.64))
    assert len(data) == N_FRAMES and np.linalg.norm(data.frame(0)[1][h1] - data.frame(0)[1][h2]) == \
        pytest.approx(0.64)
    assert f"(atoms {h1} and {h2}, from 0, of frame 0: 0.200 Å) in frame(s) 0 (1 of 12)" in refusal(pinched(0.2))


def test_all_zero_forces_are_refused_unless_energy_only_is_asked(tmp_path, ethanol):
    forces = ethanol["forces"].copy()
    forces[[2, 5]] = 0.0
    path = write_rmd17(tmp_path, ethanol, forces=forces)
    message = refusal(path)
    assert "forces are all exactly zero in frame(s) 2, 5 (2 of 12)" in message and "--energy-only" in message
    data = read_data(path, energy_only=True)
    assert data.forces is None and len(data) == N_FRAMES


def test_atomic_numbers_that_are_not_whole_are_refused(tmp_path, ethanol):
    z = ethanol["nuclear_charges"].astype(np.float64)
    assert read_data(write_rmd17(tmp_path, ethanol, nuclear_charges=z)).elements == [1, 6, 8]   # 6.0 is carbon
    z[0] = 6.7                                   # was silently carbon
    assert "nuclear_charges are not whole numbers (e.g. 6.7)" in refusal(write_rmd17(tmp_path, ethanol,
                                                                                     nuclear_charges=z))


def test_every_problem_of_a_file_is_listed_once(tmp_path, ethanol):
    coords, energies = ethanol["coords"].copy(), ethanol["energies"].copy()
    coords[4, 2, 0] = np.nan
    energies[7] = np.inf
    message = refusal(write_rmd17(tmp_path, ethanol, coords=coords, energies=energies,
                                  forces=np.zeros_like(ethanol["forces"])))
    lines = message.splitlines()
    assert len(lines) == 3, message
    assert "coords contain NaN or infinite values in frame(s) 4 (1 of 12)" in lines[0]
    assert "energies contain NaN or infinite values in frame(s) 7 (1 of 12)" in lines[1]
    assert "forces are all exactly zero in frame(s) 0, 1, 2, 3, 4, ... (12 of 12)" in lines[2]


def test_unknown_arrays_are_noted_and_a_missing_one_lists_what_the_file_holds(tmp_path, ethanol, capsys):
    path = write_rmd17(tmp_path, ethanol, Forces=ethanol["forces"])            # a misspelt extra array
    with pytest.warns(UserWarning, match="array.s. Forces ignored: not part of the format"):
        read_data(path)
    with pytest.raises(DataError, match=r"missing key\(s\) forces \(has: nuclear_charges, coords, .*Forces"):
        read_data(write_rmd17(tmp_path, {k: v for k, v in ethanol.items() if k != "forces"}, Forces=ethanol["forces"]))
    path = write_rmd17(tmp_path, ethanol, Forces=ethanol["forces"])
    assert main(["evaluate", "ethanol", "--data", str(path)]) == 0
    note = [line for line in capsys.readouterr().err.splitlines() if "Forces" in line]
    assert note == [f"schnet-md evaluate: warning: {path}: array(s) Forces ignored: not part of the format (read: "
                    "nuclear_charges, coords, energies, forces)"]


def write_extxyz(path: Path, ethanol, without_forces=()) -> Path:
    ase_io = pytest.importorskip("ase.io")
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    frames = []
    for k in range(N_FRAMES):
        atoms = Atoms(numbers=ethanol["nuclear_charges"], positions=ethanol["coords"][k])
        labels = {"energy": ethanol["energies"][k] / 23.060548}
        if k not in without_forces:
            labels["forces"] = ethanol["forces"][k] / 23.060548
        atoms.calc = SinglePointCalculator(atoms, **labels)
        frames.append(atoms)
    hydrogen = Atoms("H", positions=[[0.0, 0.0, 0.0]])            # a lone atom: zero force is its true force
    hydrogen.calc = SinglePointCalculator(hydrogen, energy=-13.6, forces=np.zeros((1, 3)))
    ase_io.write(path, frames + [hydrogen])
    return path


def test_extxyz_with_forces_missing_from_one_frame_is_refused(tmp_path, ethanol):
    path = write_extxyz(tmp_path / "frames.extxyz", ethanol, without_forces=[9])
    message = refusal(path)
    assert "forces missing in frame(s) 9 (1 of 13) but present in the others" in message and "--energy-only" in message
    assert read_data(path, energy_only=True).forces is None
    complete = read_data(write_extxyz(tmp_path / "complete.extxyz", ethanol))
    assert complete.forces is not None and len(complete) == N_FRAMES + 1


@pytest.fixture(scope="module")
def iso17x_folder(tmp_path_factory):
    """200 real iso17x frames in an iso17x-style folder (its splits.npz is written by each test)."""
    folder = tmp_path_factory.mktemp("iso17x")
    with np.load(shared_file("iso17x/iso17x.npz")) as npz:
        np.savez(folder / "iso17x.npz", **{k: npz[k][:200] for k in ("Z", "R", "E", "F")})
    return folder


GOOD_SPLITS = {"train": np.arange(150), "validation": np.arange(150, 170), "test_within": np.arange(170, 200)}


@pytest.mark.parametrize("change, message", [
    ({"train": np.r_[np.arange(148), -1, -30]}, "train: 2 indices are negative (numpy would count them from the end), "
                                                "e.g. -1, -30"),
    ({"train": np.r_[np.arange(149), 200]}, "train: 1 indices lie beyond the last frame of the data (199), e.g. 200"),
    ({"train": np.r_[np.arange(149), 3]}, "train: 1 indices are repeated, e.g. 3"),
    ({"validation": np.arange(140, 170)}, "train and validation share 10 frames, e.g. 140, 141, 142, 143, 144, ...: "
                                          "training, validation and test frames must differ"),
    ({"test_within": np.arange(160, 200)}, "validation and test_within share 10 frames, e.g. 160, 161, 162"),
])
def test_bad_iso17x_split_files_are_refused(iso17x_folder, change, message):
    np.savez(iso17x_folder / "splits.npz", **{**GOOD_SPLITS, **change})
    with pytest.raises(DataError) as error:
        read_data(iso17x_folder, split="train")
    assert f"{iso17x_folder / 'splits.npz'}: {message}" in str(error.value)


def test_iso17x_split_indices_stored_as_floats(iso17x_folder):
    np.savez(iso17x_folder / "splits.npz", **{**GOOD_SPLITS, "train": np.arange(150.0)})    # whole: fine
    assert len(read_data(iso17x_folder, split="train")) == 150
    np.savez(iso17x_folder / "splits.npz", **{**GOOD_SPLITS, "train": np.arange(150) + 0.5})  # were cut to whole
    with pytest.raises(DataError, match=r"train: 150 indices are not whole numbers, e.g. 0.5, 1.5, 2.5, 3.5, 4.5, "):
        read_data(iso17x_folder, split="train")


def test_energy_only_training_end_to_end(tmp_path, ethanol, capsys):
    """Forces all zero: refused by `schnet-md train`, trained on energies alone with --energy-only or the config."""
    path = write_rmd17(tmp_path, ethanol, forces=np.zeros_like(ethanol["forces"]))
    tiny = ["--features", "8", "--interactions", "1", "--epochs", "1", "--batch-size", "5"]
    assert main(["train", "--data", str(path), *tiny, "--out", str(tmp_path / "refused")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"schnet-md train: error: {path}: forces are all exactly zero") and "Traceback" not in err
    assert not (tmp_path / "refused").exists()

    assert main(["train", "--data", str(path), "--energy-only", *tiny, "--out", str(tmp_path / "flag")]) == 0
    assert "energies only" in capsys.readouterr().out
    assert json.loads((tmp_path / "flag" / "config.json").read_text())["data"]["energy_only"] is True
    assert "validation_forces_mae" not in json.loads((tmp_path / "flag" / "metrics.json").read_text())["history"][0]

    config = tmp_path / "train.toml"
    config.write_text(f'[data]\npath = "{path}"\nenergy_only = true\n')
    assert main(["train", "--config", str(config), *tiny, "--out", str(tmp_path / "config")]) == 0
    config.write_text(f'[data]\npath = "{path}"\nenergy_only = "yes"\n')
    assert main(["train", "--config", str(config), *tiny, "--out", str(tmp_path / "typo")]) == 1
    assert "[data] energy_only must be true or false, got 'yes'" in capsys.readouterr().err


def test_evaluate_scores_energies_alone_when_asked(tmp_path, ethanol, capsys):
    path = write_rmd17(tmp_path, ethanol, forces=np.zeros_like(ethanol["forces"]))
    assert main(["evaluate", "ethanol", "--data", str(path)]) == 1
    assert "forces are all exactly zero" in capsys.readouterr().err
    assert main(["evaluate", "ethanol", "--data", str(path), "--energy-only"]) == 0
    out = capsys.readouterr().out
    assert "energy MAE" in out and "forces" not in out
