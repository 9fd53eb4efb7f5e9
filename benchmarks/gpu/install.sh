#!/usr/bin/env bash
# On the lent GPU machine (see prepare.sh): install the carried wheels into the image's own Python.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps .whl/*.whl
SP=$(python3 -c 'import site; print(site.getsitepackages()[0])')
cp .whl/libnvrtc.so.12 "$SP/OpenMM.libs/lib/"
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>/dev/null || export PYTHONPATH="$PWD"
python3 -c "import torch, openmm, openmmtorch; print(torch.__version__, torch.cuda.get_device_name(0)); print([openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]); print(openmm.Platform.getPluginLoadFailures())"
