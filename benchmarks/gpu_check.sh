#!/usr/bin/env bash
# The checks of a GPU session, in under 8 minutes, from the repository root:
#
#     bash benchmarks/gpu_check.sh
#
# 1. the test suite without the slow tests (they run on CPU there too, but the
#    CUDA-only branches of the code are reached),
# 2. bench_train.py --preset=gpu-paper (DDPM++ 64x64, batch 256) in fp32 and
#    bf16 for real_p 1.0 / 0.5, and --preset=gpu-latent (ADM on 32x32x4) in bf16.
#
# Logs and the JSON summaries go to $OUT (a new temp folder when unset): 7 files.
# Python packages missing on the machine travel as wheels in .whl/ (see the
# device notes); they are installed to /tmp/site when that folder has any.
# Each step has its own time limit; the exit status is 1 if any step failed.

set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
status=0

if compgen -G '.whl/*.whl' > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo 'installing the wheels in .whl/ failed'; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# step NAME LIMIT_S COMMAND...: run with a time limit, log to $OUT/NAME.log, print the tail.
step() {
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start))s"
    tail -n 4 "$OUT/$name.log" | cut -c 1-400
    [ "$rc" -eq 0 ] || status=1
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'
echo "nproc $(nproc)"

step tests 150 "$PY" -m pytest -q tests -k 'not slow' -p no:cacheprovider

DATA=/tmp/gpu-check-shapes-64.zip
if [ ! -e "$DATA" ]; then
    timeout 90 "$PY" dataset_tool.py --source=demo:shapes:2000 --dest="$DATA" --resolution=64x64 2> /dev/null \
        || { echo 'building the 64x64 demo dataset failed'; status=1; }
fi

BENCH=("$PY" benchmarks/bench_train.py --real-p=1,0.5 --rounds=3 --block=4 --warmup=2 --workers=2)
step train_gpu_paper_fp32 110 "${BENCH[@]}" --preset=gpu-paper --data="$DATA" --precision=fp32 \
    --json="$OUT/train_gpu_paper_fp32.json"
step train_gpu_paper_bf16 80 "${BENCH[@]}" --preset=gpu-paper --data="$DATA" --precision=bf16 \
    --json="$OUT/train_gpu_paper_bf16.json"
step train_gpu_latent_bf16 80 "${BENCH[@]}" --preset=gpu-latent --precision=bf16 \
    --json="$OUT/train_gpu_latent_bf16.json"

echo "results in $OUT"
exit "$status"
