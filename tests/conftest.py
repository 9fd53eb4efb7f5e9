"""Shared fixtures: reference data (skipped with a reason when ../shared/data is absent) and small models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from schnet_md.model import SchNet, config_from_preset

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
SYSTEMS = ROOT / "systems"
FIXTURES = ROOT / "tests" / "fixtures"


def shared_file(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.is_file():
        pytest.skip(f"reference data {path} is not present (it lives in ../shared/data beside the checkout)")
    return path


def random_model(preset: str = "schnet2017", elements=(1, 6, 7, 8), dtype=torch.float64, seed: int = 0,
                 energy_unit: str = "kcal/mol", **overrides) -> SchNet:
    """A SchNet with random weights and non-trivial readout statistics (so energies are O(1-100))."""
    torch.manual_seed(seed)
    model = SchNet(config_from_preset(preset, list(elements), energy_unit=energy_unit, **overrides))
    with torch.no_grad():
        model.readout.scale.fill_(3.0)
        model.readout.shift.fill_(-0.5)
        model.readout.reference_energies.copy_(torch.linspace(-10.0, -40.0, len(elements)))
    return model.to(dtype).eval()


@pytest.fixture
def ethanol():
    """Atomic numbers and positions (Å) of ethanol, frame 0 of rMD17 (also systems/ethanol)."""
    from schnet_md.structures import read_structure

    s = read_structure(SYSTEMS / "ethanol" / "ethanol.pdb")
    return torch.as_tensor(s.atomic_numbers), torch.as_tensor(s.positions_nm * 10.0, dtype=torch.float64)


def random_rotation(rng: np.random.Generator) -> torch.Tensor:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return torch.as_tensor(q, dtype=torch.float64)


def reduced_box(kind: str, rng: np.random.Generator, size: float = 12.0) -> torch.Tensor:
    """An orthorhombic or triclinic box (rows a, b, c) in OpenMM's reduced form, Å."""
    a, b, c = size * (1.0 + 0.2 * rng.random(3))
    if kind == "orthorhombic":
        return torch.diag(torch.tensor([a, b, c], dtype=torch.float64))
    bx = (rng.random() - 0.5) * a
    cx, cy = (rng.random() - 0.5) * a, (rng.random() - 0.5) * b
    return torch.tensor([[a, 0, 0], [bx, b, 0], [cx, cy, c]], dtype=torch.float64)


ISOLATED_ENV = "SCHNET_MD_ISOLATED_TEST"


def isolated(test):
    """Run the test in a child pytest process, so that a crash (a segfault in a compiled plugin) is a
    failing test that names the signal, not a dead test runner. The child runs the same test node."""
    import functools
    import os
    import signal
    import subprocess
    import sys

    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        if os.environ.get(ISOLATED_ENV) == "1":
            return test(*args, **kwargs)
        nodeid = os.environ["PYTEST_CURRENT_TEST"].rsplit(" ", 1)[0]
        env = dict(os.environ, **{ISOLATED_ENV: "1"})
        env.pop("PYTEST_CURRENT_TEST", None)
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-o", "addopts=",
                               nodeid], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        output = (proc.stdout + proc.stderr).strip()
        if proc.returncode < 0:
            try:
                name = signal.Signals(-proc.returncode).name
            except ValueError:
                name = f"signal {-proc.returncode}"
            pytest.fail(f"{nodeid} crashed the Python process ({name}); a compiled plugin built against another "
                        f"ABI? (run `schnet-md doctor`)\n{output[-3000:]}", pytrace=False)
        if proc.returncode != 0:
            pytest.fail(f"{nodeid} failed in its child process:\n{output[-6000:]}", pytrace=False)

    return wrapper
