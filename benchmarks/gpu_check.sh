#!/usr/bin/env bash
# The checks of a GPU session, from the repository root, in under DEADLINE_S
# seconds (default 470):
#
#     bash benchmarks/gpu_check.sh
#
# 1. tests/test_cuda.py: no host-device sync in a training step, fused Adam's
#    on-device skip, fp32/bf16/fp16, channels-last, torch.compile, sampling and
#    statistics on CUDA vs CPU, torchrun (NCCL) + generate.py on the GPU;
# 2. bench_train.py --preset=gpu-paper (DDPM++ 64x64, batch 256, the paper's
#    CelebA settings) for real_p 1.0 / 0.5 in bf16 and fp32; --preset=gpu-latent
#    (ADM on 32x32x4) in bf16; gpu-paper bf16 with torch.compile at real_p 1.0
#    alone (one patch shape, so one compilation: ~2 minutes on an H100). Each
#    reports kimg/s, the ratio, model TFLOP/step and the fraction of the
#    card's peak.
# 3. bench_train.py --preset=gpu-dit-b and gpu-dit-xl (DiT-B/2, DiT-XL/2 on
#    32x32x4) in bf16 at real_p 1 / 0.5 / 0.25 (not yet run on a GPU: a
#    minute each at most).
# On an H100 the steps of 1. and 2. took 119 (tests), 52, 82, 61 and ~135 s:
# ~460 s in all with the set-up; with 3. the default deadline cuts the
# compile step, the last: raise DEADLINE_S to ~590 for all of them.
#
# 3a. bench_train.py --preset=gpu-edm2-s and gpu-edm2-m (EDM2-S/M at 64x64) and
#    gpu-edm2-s-latent (EDM2-S on 32x32x4) in bf16 at real_p 1 / 0.5 (not yet
#    run on a GPU: a minute each at most); with EDM2_DIR naming a checkout of
#    NVlabs/edm2, check_vs_edm2.py (CPU, ~20 s).
# 3b. bench_preemption.py --preset=gpu-paper: seconds from a SIGTERM to the
#    training state on disk (2 stops; not yet run on a GPU, about a minute).
# 4. Only when OFFICIAL_DIR names a checkout of the official Patch Diffusion
#    code (skipped when unset): bench_vs_official.py for gpu-paper and
#    gpu-latent, our training and sampling against the official code's (QUICK:
#    cpu-small only). Not yet run on a GPU; the steps above leave it no time
#    under the default deadline, so a session that wants it raises DEADLINE_S
#    or runs its two commands alone (docs/PERFORMANCE.md, "Side by side with
#    the official code").
#
# Logs go to $OUT/all_logs.txt and the JSON summaries, by step, to
# $OUT/summary.json ($OUT: a new temp folder when unset). QUICK=1 runs the
# same steps on CPU with the cpu-small preset and a tiny batch, gpu-latent and
# DiT-B/2 at real_p 1 only (to check this script where there is no GPU).
# Python packages missing on the machine travel as wheels in .whl/ (see the
# device notes); they are installed to /tmp/site when that folder has any.
# Each step gets its own limit, cut to what is left before the deadline; the
# exit status is 1 if any step failed or was skipped.

set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
DEADLINE_S=${DEADLINE_S:-470}
QUICK=${QUICK:-0}
export PYTHONUNBUFFERED=1
status=0

if compgen -G '.whl/*.whl' > /dev/null && [ "$QUICK" = 0 ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo 'installing the wheels in .whl/ failed'; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# step NAME LIMIT_S COMMAND...: run with a time limit (cut to the time left), log to $OUT/NAME.log, print the tail.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((DEADLINE_S - SECONDS))
    if [ "$left" -lt 20 ]; then
        echo "== $name: skipped, ${left}s left before the deadline"
        status=1
        return
    fi
    [ "$limit" -le "$left" ] || limit=$left
    echo "== $name (limit ${limit}s, at ${SECONDS}s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start))s"
    tail -n 6 "$OUT/$name.log" | cut -c 1-600
    [ "$rc" -eq 0 ] || status=1
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
    "$PY" -c 'import torch, click; print("torch", torch.__version__, "cuda", torch.version.cuda, "click", click.__version__ if hasattr(click, "__version__") else "?"); print(torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA")'
    echo "nproc $(nproc)"
} 2>&1 | tee "$OUT/machine.txt"

if [ "$QUICK" = 0 ]; then
    DATA=/tmp/gpu-check-shapes-64.zip
    PAPER=(--preset=gpu-paper --data="$DATA" --workers=6)
    LATENT=(--preset=gpu-latent --workers=2)
    SHORT=(--rounds=2 --block=3 --warmup=1)
    RES=64
else
    DATA=/tmp/gpu-check-shapes-32.zip
    PAPER=(--preset=cpu-small --data="$DATA" --batch=4 --device=cpu --threads=1)
    LATENT=(--preset=gpu-latent --batch=2 --batch-gpu=2 --max-size=8 --device=cpu --threads=1 --real-p=1 --no-flops)
    SHORT=(--rounds=1 --block=1 --warmup=0)
    RES=32
fi

step tests 200 "$PY" -m pytest -q -rA -p no:cacheprovider tests/test_cuda.py

if [ ! -e "$DATA" ]; then
    timeout 90 "$PY" dataset_tool.py --source=demo:shapes:2000 --dest="$DATA" --resolution=${RES}x${RES} > /dev/null 2>&1 \
        || { echo "building the ${RES}x${RES} demo dataset failed"; status=1; }
fi

BENCH=("$PY" benchmarks/bench_train.py --real-p=1,0.5)
step paper_bf16 90 "${BENCH[@]}" "${PAPER[@]}" "${SHORT[@]}" --precision=bf16 --json="$OUT/paper_bf16.json"
step paper_fp32 110 "${BENCH[@]}" "${PAPER[@]}" "${SHORT[@]}" --precision=fp32 --json="$OUT/paper_fp32.json"
step latent_bf16 80 "${BENCH[@]}" "${LATENT[@]}" "${SHORT[@]}" --precision=bf16 --json="$OUT/latent_bf16.json"
# DiT-B/2 and DiT-XL/2 on 32x32x4 latents (issue 20), real_p 1 / 0.5 / 0.25 in bf16.
SIZES="b xl"
[ "$QUICK" = 0 ] || SIZES=b   # DiT-XL/2 would need ~14 GB of CPU memory for Adam
for size in $SIZES; do
    if [ "$QUICK" = 0 ]; then
        DIT=(--preset=gpu-dit-$size --real-p=1,0.5,0.25)
    else
        DIT=(--preset=gpu-dit-$size --batch=2 --batch-gpu=2 --max-size=8 --device=cpu --threads=1 --real-p=1 --no-flops)
    fi
    step dit_${size}_bf16 60 "$PY" benchmarks/bench_train.py "${DIT[@]}" "${SHORT[@]}" --precision=bf16 \
        --json="$OUT/dit_${size}_bf16.json"
done
# EDM2's UNet (issue 30): edm2-s and edm2-m at 64x64, edm2-s on 32x32x4 latents, real_p 1 / 0.5 in bf16.
if [ "$QUICK" = 0 ]; then
    EDM2_RUNS=("edm2_s:--preset=gpu-edm2-s --data=$DATA --workers=6" "edm2_m:--preset=gpu-edm2-m --data=$DATA --workers=6"
               "edm2_s_latent:--preset=gpu-edm2-s-latent --workers=2")
else
    EDM2_RUNS=("edm2_s:--preset=edm2-tiny --data=$DATA --batch=4 --batch-gpu=4 --device=cpu --threads=1 --real-p=1 --no-flops")
fi
for run in "${EDM2_RUNS[@]}"; do
    name=${run%%:*}
    # shellcheck disable=SC2086  # the options are words
    step ${name}_bf16 60 "${BENCH[@]}" ${run#*:} "${SHORT[@]}" --precision=bf16 --json="$OUT/${name}_bf16.json"
done
# Preemption (issue 25): from a SIGTERM to the training state on disk, the paper's network on one GPU.
if [ "$QUICK" = 0 ]; then
    step preemption 90 "$PY" benchmarks/bench_preemption.py --preset=gpu-paper --nproc=1 --device=cuda --repeat=2 \
        --json="$OUT/preemption.json"
else
    step preemption 90 "$PY" benchmarks/bench_preemption.py --preset=cpu-demo --nproc=1 --repeat=1 --after-ticks=1 \
        --json="$OUT/preemption.json"
fi
if [ "$QUICK" = 0 ]; then
    step paper_bf16_compile 150 "$PY" benchmarks/bench_train.py --real-p=1 "${PAPER[@]}" --rounds=1 --block=3 --warmup=1 \
        --precision=bf16 --compile --no-flops --json="$OUT/paper_bf16_compile.json"
fi

if [ -n "${EDM2_DIR:-}" ]; then   # a checkout of NVlabs/edm2: network, steps and sampling against its code (CPU)
    step vs_edm2 120 "$PY" benchmarks/check_vs_edm2.py --edm2="$EDM2_DIR" --json="$OUT/vs_edm2.json"
fi

if [ -n "${OFFICIAL_DIR:-}" ]; then
    VS_BENCH=("$PY" benchmarks/bench_vs_official.py --official="$OFFICIAL_DIR")
    if [ "$QUICK" = 0 ]; then
        step official_paper 150 "${VS_BENCH[@]}" --preset=gpu-paper --data="$DATA" --workers=6 --sample-batch=64 \
            --json="$OUT/official_paper.json"
        step official_latent 150 "${VS_BENCH[@]}" --preset=gpu-latent --workers=2 --sample-batch=64 \
            --json="$OUT/official_latent.json"
    else   # cpu-small only: a CPU step of the latent ADM takes about a minute per side
        step official_paper 60 "${VS_BENCH[@]}" --preset=cpu-small --data="$DATA" --batch=4 --device=cpu --threads=1 \
            --rounds=1 --block=1 --warmup=0 --sample-steps=2 --sample-batch=2 --sample-rounds=1 \
            --json="$OUT/official_paper.json"
    fi
fi

# Everything in one log, and the JSON summaries in one file (a device session brings back 8 files at most).
for f in "$OUT"/*.log; do echo "##### $f"; cat "$f"; done > "$OUT/all_logs.txt" 2>&1
rm -f "$OUT"/*.log
"$PY" - "$OUT" <<'PY' || status=1
import json, os, sys
out = sys.argv[1]
names = sorted(name for name in os.listdir(out) if name.endswith('.json') and name != 'summary.json')
summary = {name[:-len('.json')]: json.load(open(os.path.join(out, name))) for name in names}
with open(os.path.join(out, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=1)
for name in names:
    os.remove(os.path.join(out, name))
PY
echo "results in $OUT after ${SECONDS}s"
exit "$status"
