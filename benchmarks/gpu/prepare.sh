#!/usr/bin/env bash
# Prepare .whl/ (git-ignored) for a lent GPU machine, following shared/device/README.md: that machine has
# Python 3.12 with torch 2.11 (CUDA 13) and no package registry, so OpenMM, openmm-torch and mdtraj travel
# as wheels, with a stub libnvrtc.so.12 (libOpenMMTorch.so lists it as NEEDED but calls none of it).
# OpenMM stays at 8.5.x: the openmmtorch 1.5 wheels were built against its C++ ABI (README, "The stack").
# Run here, then in the device tool: carry [".whl"], command: bash benchmarks/gpu/install.sh && ...
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
    openmm==8.5.2 openmm-cuda-13==8.5.2 openmmtorch==1.5 openmm-torch-cuda-13==1.5 mdtraj==1.11.1.post2 tqdm
echo 'void schnet_md_nvrtc12_stub(void) {}' | gcc -x c -shared -fPIC -Wl,-soname,libnvrtc.so.12 -o .whl/libnvrtc.so.12 -
du -sh .whl

# A training subset of iso17x for the timed GPU training (../shared does not travel; the whole carry is at most
# 64 MiB): the first 30,000 frames of the `train` split and 2,000 of `validation`, in the iso17x folder format.
grep -qx '/.gpu_data/' .git/info/exclude || echo /.gpu_data/ >> .git/info/exclude
PY=.venv/bin/python; [ -x "$PY" ] || PY=python3
"$PY" - <<'PYEOF'
from pathlib import Path

import numpy as np

source, out = Path("../shared/data/iso17x"), Path(".gpu_data/iso17x")
out.mkdir(parents=True, exist_ok=True)
splits = np.load(source / "splits.npz")
train, validation = splits["train"][:30000], splits["validation"][:2000]
frames = np.concatenate([train, validation])
with np.load(source / "iso17x.npz") as data:
    np.savez(out / "iso17x.npz", **{k: data[k][frames] for k in ("Z", "R", "E", "F", "mol", "step", "eq")})
np.savez(out / "splits.npz", train=np.arange(len(train)), validation=np.arange(len(train), len(frames)))
(out / "README.md").write_text("First 30,000 `train` and 2,000 `validation` frames of ../shared/data/iso17x "
                               "(same order), for the timed GPU training of benchmarks/gpu/run.sh.\n")
print(f"{out}: {len(train)} train + {len(validation)} validation frames")
PYEOF
du -sh .whl .gpu_data
