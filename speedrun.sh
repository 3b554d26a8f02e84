#!/usr/bin/env bash
# The nanochat speedrun: blank machine -> data, tokenizer, pretrained model, evaluation, report.
#
#   bash speedrun.sh                                     # GPU: ClimbMix; no GPU: the built-in demo data
#   NANOCHAT_DATA_SOURCE=path/to/texts bash speedrun.sh  # .jsonl/.txt/.parquet (or .gz) files or dirs
#   NANOCHAT_DATA_SOURCE=hf:org/name bash speedrun.sh    # any Hugging Face dataset with a text column
#   NANOCHAT_DATA_SOURCE=climbmix bash speedrun.sh       # download ClimbMix, on any machine
#   NANOCHAT_DATA_SOURCE=demo bash speedrun.sh           # the demo corpus in nanochat/demo_data, offline
#
# It picks a configuration from the hardware: 8 H100/H200-class GPUs run the reference recipe
# (d24, 8 tokens per parameter, fp8, device batch 16; scripts.plan estimates 2.18 h at an assumed
# 45% MFU, the target is under 2 h) on ClimbMix and the full CORE eval
# bundle, both downloaded; fewer or smaller GPUs run the same model with gradient accumulation; no
# GPU runs a small demo of every stage, fully offline, on the data shipped in nanochat/demo_data
# (a small web + Shakespeare corpus and 50 items of each CORE task). Environment overrides:
#   NANOCHAT_BASE_DIR      outputs (default ~/.cache/nanochat)
#   NANOCHAT_DATA_SOURCE   climbmix | demo | hf:NAME | a local path (default: climbmix with a GPU, else demo)
#   NANOCHAT_NUM_SHARDS    ClimbMix train shards to download (default 170)
#   NANOCHAT_DATA_URL      a ClimbMix mirror (NANOCHAT_EVAL_BUNDLE_URL: an eval bundle mirror)
#   NANOCHAT_EVAL_BUNDLE   CORE eval bundle dir (default: downloaded with a GPU, else nanochat/demo_data/eval_bundle)
#   NANOCHAT_TRAIN_ARGS    extra base_train flags, appended (last wins), e.g. "--num-iterations 5"
#   NANOCHAT_EVAL_ARGS     extra base_eval flags, e.g. "--core-max-per-task 2"
set -euo pipefail
cd "$(dirname "$0")"
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
mkdir -p "$NANOCHAT_BASE_DIR"
# each stage's start is appended (a re-run resumes the same run, so the first start is kept), and
# the report's wall time sums the stages that actually ran, over every re-run
mark() { printf '%s\t%s\n' "$1" "$(date +%s)" >> "$NANOCHAT_BASE_DIR/speedrun_stages.tsv"; }
mark start

# --- environment, from this repo's own files (reinstalled only when pyproject.toml changes) ---
[ -x .venv/bin/python ] || python3 -m venv .venv
if [ ! -f .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ]; then
    .venv/bin/pip install -q -e . && touch .venv/.installed
fi
PY=.venv/bin/python

# --- hardware -> configuration ---
NUM_GPUS=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    NUM_GPUS=$(nvidia-smi -L | wc -l)
fi
if [ "$NUM_GPUS" -gt 0 ]; then
    GPU_MEM_MB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -n 1)
    GPU_CC=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1)
    VOCAB_SIZE=32768
    if [ "$GPU_MEM_MB" -ge 70000 ]; then BATCH=16; elif [ "$GPU_MEM_MB" -ge 35000 ]; then BATCH=8; else BATCH=2; fi
    TAG=d24
    TRAIN_ARGS="--depth 24 --target-param-data-ratio 8 --device-batch-size $BATCH"
    # fp8 tensor cores from compute capability 8.9 (Ada, Hopper, Blackwell)
    if awk "BEGIN {exit !($GPU_CC >= 8.9)}"; then TRAIN_ARGS="$TRAIN_ARGS --fp8"; fi
    EVAL_ARGS=""
    LAUNCH=(.venv/bin/torchrun --standalone --nproc_per_node="$NUM_GPUS" -m)
    DEVICE_ARGS="--device-type cuda"  # a GPU node never falls back to CPU: a broken CUDA setup stops, named
    # flash-attn 4 kernels (wheels only, no compilation), reinstalled when pyproject.toml changes
    if [ ! -f .venv/.installed-gpu ] || [ pyproject.toml -nt .venv/.installed-gpu ]; then
        .venv/bin/pip install -q -e '.[gpu]' && touch .venv/.installed-gpu
    fi
    echo "speedrun: $NUM_GPUS GPU(s), ${GPU_MEM_MB} MB each, compute capability $GPU_CC"
else
    VOCAB_SIZE=8192
    TAG=d4
    # the CPU demo: a 4-layer model, full windows, 256-token context, 200 steps of 4,096 tokens
    TRAIN_ARGS="--depth 4 --head-dim 64 --max-seq-len 256 --window-pattern L --device-batch-size 16
                --total-batch-size 4096 --num-iterations 200 --eval-every 50 --bpb-tokens 65536
                --final-bpb-tokens 262144 --core-every 0 --sample-every 100"
    # the demo bundle holds exactly these 50 items per task; the flag also puts "50 items" in the CORE label
    EVAL_ARGS="--core-max-per-task 50 --bpb-tokens 262144 --device-batch-size 16"
    LAUNCH=($PY -m)
    DEVICE_ARGS=""
    echo "speedrun: no GPU, running the CPU demo"
fi
echo "speedrun: outputs in $NANOCHAT_BASE_DIR"

# --- data (each source leaves a manifest in base_data/: a re-run reuses its shards, other data is refused) ---
if [ "$NUM_GPUS" -gt 0 ]; then DEFAULT_SOURCE=climbmix; else DEFAULT_SOURCE=demo; fi
SOURCE="${NANOCHAT_DATA_SOURCE:-$DEFAULT_SOURCE}"
echo "data: source $SOURCE"
mark data
DOWNLOAD_PID=""
case "$SOURCE" in
    climbmix)
        # the tokenizer trains on the first ~2B characters (8 shards); the rest downloads meanwhile.
        # A data host that cannot be reached stops this first step within seconds, saying what to do.
        $PY -m nanochat.dataset -n 8
        $PY -m nanochat.dataset -n "${NANOCHAT_NUM_SHARDS:-170}" > "$NANOCHAT_BASE_DIR/download.log" 2>&1 &
        DOWNLOAD_PID=$! ;;
    demo) $PY -m nanochat.dataset --demo ;;
    hf:*) $PY -m nanochat.dataset --hf "${SOURCE#hf:}" ;;
    *)    $PY -m nanochat.dataset --local "$SOURCE" ;;
esac

# --- tokenizer ---
mark tokenizer
if $PY -c "import sys; from nanochat.tokenizer import get_tokenizer
sys.exit(get_tokenizer().vocab_size != $VOCAB_SIZE)" 2>/dev/null; then  # loads, and has the right size
    echo "tokenizer: already trained ($NANOCHAT_BASE_DIR/tokenizer/tokenizer.json)"
else
    $PY -m scripts.tok_train --vocab-size "$VOCAB_SIZE"
fi
$PY -m scripts.tok_eval

if [ -n "$DOWNLOAD_PID" ]; then
    echo "data: waiting for the remaining shards (log: $NANOCHAT_BASE_DIR/download.log)"
    wait "$DOWNLOAD_PID" || { tail -n 5 "$NANOCHAT_BASE_DIR/download.log"; exit 1; }
fi

# --- CORE eval bundle (used during training and by base_eval): downloaded on a GPU node; the CPU
# demo evaluates 50 items per task, which is what the bundle shipped in nanochat/demo_data holds ---
if [ "$NUM_GPUS" -gt 0 ]; then DEFAULT_BUNDLE="$NANOCHAT_BASE_DIR/eval_bundle"; else DEFAULT_BUNDLE="$PWD/nanochat/demo_data/eval_bundle"; fi
BUNDLE="${NANOCHAT_EVAL_BUNDLE:-$DEFAULT_BUNDLE}"
[ -f "$BUNDLE/core.yaml" ] || $PY -m scripts.base_eval --download-only --eval-bundle "$BUNDLE"

# --- pre-flight plan (GPU): sizes, memory, time and cost before any money is spent ---
if [ "$NUM_GPUS" -gt 0 ]; then
    GPU_KIND=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1 | tr 'A-Z' 'a-z' |
               grep -oE 'h100|h200|b200|a100|l4|4090' | head -n 1 || true)
    [ "$GPU_KIND" = a100 ] && [ "$GPU_MEM_MB" -lt 60000 ] && GPU_KIND=a100-40gb
    # shellcheck disable=SC2086
    $PY -m scripts.plan $TRAIN_ARGS --gpus "$NUM_GPUS" --gpu "${GPU_KIND:-h100}" || echo "plan: skipped"
    # self-check (~2 min): kernels, compile, fp8, a few real steps, NCCL; stops here, named, if broken
    mark gpu_check
    $PY -m scripts.gpu_check
fi

# --- pretraining (resumes from the newest complete checkpoint; a finished run returns at once) ---
# SIGTERM / Ctrl-C: training saves and exits non-zero (143 / 130; torchrun: 1), so set -e stops the
# script here rather than evaluate a half-trained model: re-run it to resume.
mark train
# shellcheck disable=SC2086  # the argument strings are meant to split into flags
"${LAUNCH[@]}" scripts.base_train $TRAIN_ARGS $DEVICE_ARGS --model-tag "$TAG" --eval-bundle "$BUNDLE" --resume ${NANOCHAT_TRAIN_ARGS:-}

# --- evaluation (skipped if base_eval.json already scores the final checkpoint), report ---
mark eval
if $PY -c "import json, sys; from nanochat.checkpoint import get_run_dir, list_steps
run = get_run_dir('$TAG'); done = json.load(open(run + '/base_eval.json'))['step']
sys.exit(done != list_steps(run)[-1])" 2>/dev/null; then
    echo "eval: already done for the final checkpoint"
else
    # shellcheck disable=SC2086
    "${LAUNCH[@]}" scripts.base_eval $EVAL_ARGS $DEVICE_ARGS --model-tag "$TAG" --eval-bundle "$BUNDLE" ${NANOCHAT_EVAL_ARGS:-}
fi
mark end
$PY -m scripts.report --model-tag "$TAG"
