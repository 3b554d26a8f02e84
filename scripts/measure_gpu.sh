#!/usr/bin/env bash
# The GPU figures of docs/PERF.md in one command that fits a 10-minute call on one GPU:
#
#   bash scripts/measure_gpu.sh                        # on a GPU
#   MEASURE_TINY=1 bash scripts/measure_gpu.sh         # dry run of every stage at toy sizes (CPU)
#
# Stages run in order of what matters most, each under its own time limit and all under one
# deadline (MEASURE_SECONDS, default 540), so a call that runs out of time still returns every
# finished stage. Each stage's full output goes to MEASURE_DIR/<stage>.log (default
# $NANOCHAT_BASE_DIR/measure); its results are printed here as they appear.
#   1 gpu_check        the checks that compile little: environment, attention, fp8, collectives
#                      (with two gloo processes sharing one GPU against one process)
#   2 rank_of_8        d24 fp8 as one rank of 8 (optimizer share, collectives as copies), lm_head in
#                      fp8, per-block compilation from a cold cache: its first step is the cold compile
#   3 rank_of_8_bf16_head  the same with lm_head in bf16; lm_head runs outside the compiled blocks,
#                      so its first step is the same compile from a warm cache
#   4 speedrun         speedrun.sh's GPU branch on the demo data at d12, 40 steps, through evaluation
#                      (CORE's seconds per task) and report; its first step is d12's whole-model
#                      compile from a cold cache
#   5 whole_d12, regional_d12  d12 fp8 as one rank of 8, whole-model against per-block compilation,
#                      each from a cold cache: step time and compile time both ways
#   6 gpu_check_compile  the rest of gpu_check: compile, optimizer, steps (minutes of compiling)
#   7 whole_d24        stage 2 with whole-model compilation from a cold cache (over 170 s before)
# Data and tokenizer for stage 4 come from NANOCHAT_BASE_DIR (default .measure/base, git-ignored,
# so a device call can carry it): build them beforehand with `NANOCHAT_BASE_DIR=.measure/base
# python -m nanochat.dataset --demo`, then `... python -m scripts.tok_train --vocab-size 32768`.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${NANOCHAT_PYTHON:-python3}
if [ -n "${MEASURE_TINY:-}" ]; then DEFAULT_BASE=$PWD/.measure/tiny; else DEFAULT_BASE=$PWD/.measure/base; fi
export NANOCHAT_BASE_DIR=${NANOCHAT_BASE_DIR:-$DEFAULT_BASE} PYTHONUNBUFFERED=1
OUT_DIR=${MEASURE_DIR:-$NANOCHAT_BASE_DIR/measure}
mkdir -p "$OUT_DIR"
START=$(date +%s)
DEADLINE=$((START + ${MEASURE_SECONDS:-540}))

# stage NAME LIMIT PATTERN CMD...: run CMD for at most LIMIT seconds (less if the deadline is nearer),
# its output to NAME.log, the lines matching PATTERN echoed as they come
stage() {
    local name=$1 limit=$2 pattern=$3 left t0
    shift 3
    left=$((DEADLINE - $(date +%s)))
    if [ "$left" -lt 30 ]; then
        echo "=== $name: skipped, ${left} s left before the deadline"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== $name (at $(($(date +%s) - START)) s, limit $limit s): $*"
    t0=$(date +%s)
    timeout -k 10 "$limit" "$@" > >(tee "$OUT_DIR/$name.log" | grep --line-buffered -E "$pattern") 2>&1
    local rc=$?
    sleep 1  # let the echo of the last lines finish
    echo "=== $name: exit $rc$([ $rc = 124 ] && echo ' (time limit)') after $(($(date +%s) - t0)) s"
}

if [ -n "${MEASURE_TINY:-}" ]; then  # the same stages at toy sizes, to time the script itself on a CPU
    SMALL="--depth 2 --head-dim 64 --max-seq-len 256 --vocab-size 8192 --device-batch-size 4 --steps 2 --warmup 1 --compile"
    MODEL=$SMALL
    CHECK=(--cpu)
    TRAIN="--num-iterations 6 --eval-every 3 --bpb-tokens 8192 --final-bpb-tokens 8192"
    EVAL="--core-max-per-task 4 --bpb-tokens 8192"
    DEPTH=2
else
    MODEL="--depth 24 --device-batch-size 16 --fp8 --steps 5 --warmup 2"
    SMALL="--depth 12 --device-batch-size 16 --fp8 --steps 5 --warmup 2"
    CHECK=()
    TRAIN="--num-iterations 40 --eval-every 20 --bpb-tokens 1048576 --final-bpb-tokens 1048576 --core-every 0"
    EVAL="--core-max-per-task 50 --bpb-tokens 1048576"
    DEPTH=12
fi
BENCH='^(device|step|first step|tokens/s|MFU|peak memory|as 1 of)|rror'
CHECKED='^(PASS|FAIL|WARN|SKIP|gpu_check)'
CACHES=$(mktemp -d)  # a fresh inductor cache per subdirectory: compile times from cold
BUNDLE=$PWD/nanochat/demo_data/eval_bundle
# (unquoted $MODEL, $SMALL: the flag strings are meant to split)
stage gpu_check 90 "$CHECKED" "$PY" -m scripts.gpu_check "${CHECK[@]}" --only environment,attention,fp8,collectives
stage rank_of_8 150 "$BENCH" env TORCHINDUCTOR_CACHE_DIR="$CACHES/regional" \
    "$PY" -m scripts.bench_model $MODEL --as-rank-of 8 --regional-compile
stage rank_of_8_bf16_head 90 "$BENCH" env TORCHINDUCTOR_CACHE_DIR="$CACHES/regional" \
    "$PY" -m scripts.bench_model $MODEL --as-rank-of 8 --regional-compile --no-fp8-lm-head
stage speedrun 200 '^(speedrun|data:|tokenizer:|eval:|error|wrote)|training time|^step 000(0[01]|[0-9]0)|bpb|items,|^CORE|took|report|rror' \
    env TORCHINDUCTOR_CACHE_DIR="$CACHES/speedrun" NANOCHAT_DEPTH=$DEPTH NANOCHAT_PYTHON="$PY" \
    NANOCHAT_DATA_SOURCE=demo NANOCHAT_EVAL_BUNDLE="$BUNDLE" NANOCHAT_GPU_CHECK=0 \
    NANOCHAT_TRAIN_ARGS="$TRAIN" NANOCHAT_EVAL_ARGS="$EVAL" bash speedrun.sh
stage whole_d12 90 "$BENCH" env TORCHINDUCTOR_CACHE_DIR="$CACHES/whole_small" \
    "$PY" -m scripts.bench_model $SMALL --as-rank-of 8
stage regional_d12 60 "$BENCH" env TORCHINDUCTOR_CACHE_DIR="$CACHES/regional_small" \
    "$PY" -m scripts.bench_model $SMALL --as-rank-of 8 --regional-compile
stage gpu_check_compile 170 "$CHECKED" "$PY" -m scripts.gpu_check "${CHECK[@]}" --only compile,optimizer,steps
stage whole_d24 200 "$BENCH" env TORCHINDUCTOR_CACHE_DIR="$CACHES/whole" \
    "$PY" -m scripts.bench_model $MODEL --as-rank-of 8
rm -rf "$CACHES"
echo "measure_gpu: done in $(($(date +%s) - START)) s; logs in $OUT_DIR"
