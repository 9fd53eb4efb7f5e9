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
