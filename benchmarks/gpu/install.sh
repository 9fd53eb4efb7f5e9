#!/usr/bin/env bash
# On the lent GPU machine (see prepare.sh): install the carried wheels into the image's own Python, so the
# wheels' relative library paths (OpenMM.libs/lib/../../../torch/lib) find the image's torch.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps .whl/*.whl \
    || python3 -m pip install -q --no-index --no-deps --break-system-packages .whl/*.whl
SP=$(python3 -c 'import site; print(site.getsitepackages()[0])')
cp .whl/libnvrtc.so.12 "$SP/OpenMM.libs/lib/"
python3 -c "import torch, openmm; print('installed: OpenMM', openmm.__version__, 'into', '$SP')"
