#!/usr/bin/env bash
# The one prepared GPU run (issue #17), for the device tool on a lent H100/H200:
#   prepare here:  bash benchmarks/gpu/prepare.sh     (wheels into .whl/, an iso17x subset into .gpu_data/; both ignored)
#   run there:     carry [".whl", ".gpu_data"], command: OUT=$OUT bash benchmarks/gpu/run.sh, timeout_s ~580
# Every step has its own time limit, and the whole run stops by DEADLINE seconds (default 540), leaving the rest
# of the 15-minute slot for one re-run. At most 8 files come back: summary.txt (install, versions, step times),
# pytest.txt, profile.txt, speed_cuda.{md,json} (TorchForce, CUDA graphs off and on), speed_python.{md,json}
# (PythonForce, model on the GPU) and logs.tar (the training run folder, the PythonForce rows with the fused Triton
# CFConv and through torch.compile, and the raw logs).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu-out}
DEADLINE=${DEADLINE:-540}
mkdir -p "$OUT"
WORK=$(mktemp -d)
mkdir -p "$WORK/logs"
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*" | tee -a "$OUT/summary.txt"; }
# left LIMIT: seconds this step may take, at most LIMIT and what is left before the deadline (less 15 s to pack up)
left() { local rest=$(( DEADLINE - 15 - ($(date +%s) - t0) )); echo $(( rest < $1 ? rest : $1 )); }
ONLY=${ONLY:-pytest speed profile python fused compiled train}   # a re-run after a fix may pick steps: ONLY="speed train"
wanted() { [[ " $ONLY " == *" $1 "* ]]; }
step() {   # step KEY NAME LIMIT LOG COMMAND...: run with a time limit, output to LOG, log its exit status
    local key=$1 name=$2 limit log=$4; limit=$(left "$3"); shift 4
    if ! wanted "$key"; then stamp "$name: not asked for (ONLY=$ONLY)"; return; fi
    if (( limit < 20 )); then stamp "$name: skipped (deadline)"; return; fi
    stamp "$name (limit $limit s)"
    timeout "$limit" "$@" > "$log" 2>&1
    stamp "$name: exit $?"
}

stamp "install the carried wheels"
timeout 90 bash benchmarks/gpu/install.sh >> "$OUT/summary.txt" 2>&1 || stamp "install: exit $?"
export PYTHONPATH="$PWD:$PWD/plugins/lammps:${PYTHONPATH:-}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >> "$OUT/summary.txt" 2>&1
python3 - >> "$OUT/summary.txt" 2>&1 <<'EOF'
import platform, torch, openmm
print("Python", platform.python_version(), "torch", torch.__version__, "CUDA", torch.version.cuda,
      torch.cuda.get_device_name(0))
print("OpenMM", openmm.__version__)
try:
    import openmmtorch
    print("openmmtorch", openmmtorch.__file__)
except Exception as error:
    print("import openmmtorch failed:", repr(error))
print("platforms", [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())])
print("plugin load failures:", *openmm.Platform.getPluginLoadFailures(), sep="\n  ")
EOF

step pytest "CUDA correctness (pytest -m cuda)" 170 "$OUT/pytest.txt" python3 -m pytest -q -rs -p no:cacheprovider -o addopts= -m cuda \
    tests/test_cuda.py "tests/test_neighbor_list.py::test_graph_safe_export_captures_in_a_cuda_graph"
tail -3 "$OUT/pytest.txt" | tee -a "$OUT/summary.txt"

step profile "profile: the floor, tabulated and fused filters, torch.compile" 150 "$OUT/profile.txt" python3 -u benchmarks/gpu/profile_cuda.py --fused-tf32-only \
    --atoms ${PROFILE_ATOMS:-24000} --molecules ${PROFILE_MOLECULES:-c7o2h10_1}
grep -E "^==|where the|torch.compile" "$OUT/profile.txt" | tee -a "$OUT/summary.txt"

step fused "speed: PythonForce with the fused Triton CFConv" 60 "$WORK/logs/speed_fused.log" python3 -u \
    benchmarks/speed.py --platform CUDA --threads 1 --steps 1000 --repeats 30 --backend python --fused \
    --molecules c7o2h10_1 --water 3000 24000 --search --out "$WORK/logs/speed_fused.md"

step speed "speed: TorchForce, CUDA graphs off and on" 170 "$WORK/logs/speed_cuda.log" python3 -u benchmarks/speed.py --platform CUDA --threads 1 \
    --steps "${STEPS:-1000}" --repeats 30 --cuda-graphs both --molecules ${MOLECULES:-ethanol c7o2h10_1 aspirin alanine-dipeptide} \
    --water ${WATER:-1000 3000 12000 24000} --filters ${FILTERS:-tabulated network} --search \
    --out "$OUT/speed_cuda.md"
grep -c '"steps_per_second"' "$WORK/logs/speed_cuda.log" | sed 's/^/rows measured: /' | tee -a "$OUT/summary.txt"

step python "speed: PythonForce, model on the GPU" 70 "$WORK/logs/speed_python.log" python3 -u benchmarks/speed.py --platform CUDA --threads 1 \
    --steps 1000 --repeats 30 --backend python --molecules c7o2h10_1 --water 3000 24000 --search \
    --out "$OUT/speed_python.md"

step compiled "speed: PythonForce through torch.compile" 70 "$WORK/logs/speed_python_compiled.log" python3 -u \
    benchmarks/speed.py --platform CUDA --threads 1 --steps 1000 --repeats 30 --backend python --compile \
    --molecules c7o2h10_1 --water --presets schnet2017 --search --out "$WORK/logs/speed_python_compiled.md"

# Timed iso17x training (accuracy.py's iso17x settings) on the carried subset; the run folder comes back in
# logs.tar and resumes on a CPU: schnet-md train ... --out DIR --resume --device cpu --epochs N
limit=$(left 150)
if (( limit >= 45 )) && wanted train; then
    hours=$(python3 -c "print(round(($limit - 25) / 3600, 5))")
    step train "iso17x training on the GPU (max $hours h)" "$limit" "$WORK/logs/train_iso17x.log" python3 -u -m schnet_md.cli train \
        --data .gpu_data/iso17x --format iso17x --preset schnet2017 --batch-size 32 --lr 1e-3 --lr-patience 3 \
        --ema 0.999 --epochs 500 --max-hours "$hours" --device cuda --seed 0 --out "$WORK/train_iso17x"
    tail -4 "$WORK/logs/train_iso17x.log" | tee -a "$OUT/summary.txt"
else
    stamp "iso17x training: skipped (deadline)"
fi

stamp "done"
tar -cf "$OUT/logs.tar" -C "$WORK" logs $( [ -d "$WORK/train_iso17x" ] && echo train_iso17x )
