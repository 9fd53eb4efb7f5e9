#!/usr/bin/env bash
# The one prepared GPU run (issue #17), for the device tool on a lent H100/H200:
#   prepare here:  bash benchmarks/gpu/prepare.sh          (wheels into .whl/, git-ignored)
#   run there:     carry [".whl"], command: OUT=$OUT bash benchmarks/gpu/run.sh
# Every step has its own time limit so the whole run ends within ~8 minutes and leaves the rest of the
# 15-minute slot for one re-run. Results (at most 8 files) go to $OUT: install.txt, pytest.txt, speed_cuda.md,
# speed_cuda.json, profile.txt, summary.txt.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*" | tee -a "$OUT/summary.txt"; }

stamp "install the carried wheels"
timeout 120 bash benchmarks/gpu/install.sh > "$OUT/install.txt" 2>&1 || stamp "install: exit $? (see install.txt)"
export PYTHONPATH="$PWD:$PWD/plugins/lammps:${PYTHONPATH:-}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >> "$OUT/install.txt" 2>&1
python3 -c "import torch, openmm; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0)); print('OpenMM', openmm.__version__, [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]); print('plugin load failures:', openmm.Platform.getPluginLoadFailures())" >> "$OUT/install.txt" 2>&1

stamp "CUDA correctness (pytest -m cuda)"
timeout 180 python3 -m pytest -q -p no:cacheprovider -o addopts= -m cuda tests/test_cuda.py \
    "tests/test_neighbor_list.py::test_graph_safe_export_captures_in_a_cuda_graph" > "$OUT/pytest.txt" 2>&1
stamp "pytest: exit $? ($(tail -1 "$OUT/pytest.txt"))"

stamp "profile one step (torch profiler): water box, schnet2018, CUDA"
timeout 90 python3 benchmarks/gpu/profile_cuda.py > "$OUT/profile.txt" 2>&1
stamp "profile: exit $?"

stamp "speed: CUDA rows, graphs off and on"
timeout 150 python3 benchmarks/speed.py --platform CUDA --threads 1 --steps 500 --repeats 30 \
    --water 1000 3000 12000 24000 --search --memory-gb 100 --out "$OUT/speed_cuda.md" > "$OUT/speed.log" 2>&1
stamp "speed (graphs off): exit $?"
timeout 120 python3 benchmarks/speed.py --platform CUDA --threads 1 --steps 500 --repeats 30 --cuda-graphs \
    --water 1000 24000 --search --memory-gb 100 --out "$OUT/speed_cuda_graphs.md" >> "$OUT/speed.log" 2>&1
stamp "speed (graphs on): exit $?"
tail -40 "$OUT/speed.log" >> "$OUT/summary.txt"
stamp "done"
