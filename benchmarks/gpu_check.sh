#!/usr/bin/env bash
# Issue 18: every GPU path on a real GPU, in one prepared run on the lent H200 (the device tool).
#
# Prepare here first: `bash benchmarks/gpu_wheels.sh` (the packages that machine lacks, into .whl), then call
# the device tool from the repository root with carry [".whl"] and the command
#     bash benchmarks/gpu_check.sh
# and a timeout_s of about 540 (each step below has its own limit, so a hang costs one step, not the run).
# Results come back under $OUT (at most 8 files): env.txt, pytest_gpu.log, pytest_gpu.xml, throughput.md,
# throughput.json, bench.log, summary.txt.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
summary() { echo "$*" | tee -a "$OUT/summary.txt"; }
step() {  # step NAME SECONDS LOG COMMAND...: run with a time limit, output appended to LOG; record status, duration
    local name=$1 limit=$2 log=$3; shift 3
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
    local rc=$?
    summary "$name: exit $rc in $((SECONDS - start)) s (limit $limit s)"
}

if compgen -G ".whl/*.whl" > /dev/null; then
    $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        > "$OUT/summary.txt" 2>&1 || summary "wheel install failed"
fi
# optimlab from the working tree (its pyproject asks for torch >= 2.13; the image's torch may be older, and
# pip must not try to replace it there), the wheels beside it, and the repository root for `tests.` imports.
export PYTHONPATH="$PWD/src:/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=:4096:8 MPLBACKEND=Agg

{
    date -u +"date: %Y-%m-%dT%H:%M:%SZ"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    $PYTHON - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton: not installed")
import optimlab
print("optimlab imported from", optimlab.__file__)
PY
} > "$OUT/env.txt" 2>&1
summary "env: $(head -4 "$OUT/env.txt" | tail -1)"

# 1 + 2. Every gpu-marked test: optimizer parity with torch on CUDA, the fused (Triton) path, low-precision
#        states, clipping, compiled schedules, and the trainer (bf16, fp16 + GradScaler, compile, exact resume,
#        DDP over NCCL).
step "pytest -m gpu" 300 "$OUT/pytest_gpu.log" $PYTHON -m pytest -q -m gpu -rs --timeout 240 -p no:cacheprovider \
    --junitxml "$OUT/pytest_gpu.xml" tests
summary "pytest: $(tail -1 "$OUT/pytest_gpu.log")"

# 3. Step throughput on the GPU, side by side with torch's fused and foreach steps, and the fraction of the
#    measured memory bandwidth each reaches.
step "step throughput" 180 "$OUT/bench.log" $PYTHON benchmarks/step_throughput.py --device cuda --rounds 3 \
    --out "$OUT/throughput"
for f in "$OUT"/throughput/*; do [ -f "$f" ] && mv "$f" "$OUT/throughput.${f##*.}"; done
rmdir "$OUT/throughput" 2>/dev/null

# 4. The lab where users train: one model task on CUDA.
step "bench on cuda" 60 "$OUT/bench.log" $PYTHON -m optimlab bench --task digits-mlp --device cuda --optimizers adamw,sgd \
    --trials 4 --seeds 2 --jobs 1 --db /tmp/gpu_bench.db
summary "done"
