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
# bundle, both downloaded; fewer or smaller GPUs run the same model with gradient accumulation
# (for many hours: it says how many, first), or with NANOCHAT_HOURS the deepest model that fits; no
# GPU runs a small demo of every stage, fully offline, on the data shipped in nanochat/demo_data
# (a small web + Shakespeare corpus and 50 items of each CORE task). Environment overrides:
#   NANOCHAT_BASE_DIR      outputs (default ~/.cache/nanochat)
#   NANOCHAT_PYTHON        a Python with the project installed, used as is (default: the active python3
#                          if nanochat is installed in it, else .venv, created and installed here)
#   NANOCHAT_DEPTH         the model's depth (default: the record's d24 on GPUs, the demo's d4 without)
#   NANOCHAT_HOURS         size the model to this many hours of training on these GPUs instead
#   NANOCHAT_DATA_SOURCE   climbmix | demo | hf:NAME | a local path (default: climbmix with a GPU, else demo)
#   NANOCHAT_NUM_SHARDS    ClimbMix train shards to download (default 170)
#   NANOCHAT_DATA_URL      a ClimbMix mirror (NANOCHAT_EVAL_BUNDLE_URL: an eval bundle mirror)
#   NANOCHAT_EVAL_BUNDLE   CORE eval bundle dir (default: downloaded with a GPU, else nanochat/demo_data/eval_bundle)
#   NANOCHAT_TRAIN_ARGS    extra base_train flags, appended (last wins), e.g. "--num-iterations 5"
#   NANOCHAT_EVAL_ARGS     extra base_eval flags, e.g. "--core-max-per-task 2"
#   NANOCHAT_GPU_CHECK     0 skips the GPU self-check (when it just passed on this machine)
set -euo pipefail
cd "$(dirname "$0")"
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
mkdir -p "$NANOCHAT_BASE_DIR"
# each stage's start is appended (a re-run resumes the same run, so the first start is kept), and
# the report's wall time sums the stages that actually ran, over every re-run
mark() { printf '%s\t%s\n' "$1" "$(date +%s)" >> "$NANOCHAT_BASE_DIR/speedrun_stages.tsv"; }
mark start

# --- environment: the Python in NANOCHAT_PYTHON, or the active one if the project is installed in
# it (managed clusters, containers: nothing is installed); else .venv, from this repo's own files
# (reinstalled only when pyproject.toml changes) ---
OWN_VENV=0
if [ -n "${NANOCHAT_PYTHON:-}" ]; then
    PY=$NANOCHAT_PYTHON
    if ! "$PY" -c "import torch, tiktoken, pyarrow" 2>/dev/null; then
        echo "error: NANOCHAT_PYTHON=$PY: cannot import the project's dependencies with it; install them into" \
             "that environment (pip install -e .) or unset NANOCHAT_PYTHON to let speedrun.sh make .venv" >&2
        exit 1
    fi
elif python3 -c "import importlib.metadata as m, torch, tiktoken, pyarrow; m.distribution('nanochat')" 2>/dev/null; then
    PY=$(command -v python3)
else
    OWN_VENV=1
    [ -x .venv/bin/python ] || python3 -m venv .venv
    if [ ! -f .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ]; then
        .venv/bin/pip install -q -e . && touch .venv/.installed
    fi
    PY=.venv/bin/python
fi
echo "speedrun: python $PY"

# --- hardware -> configuration ---
if [ -n "${NANOCHAT_DEPTH:-}" ] && [ -n "${NANOCHAT_HOURS:-}" ]; then
    echo "error: NANOCHAT_DEPTH and NANOCHAT_HOURS both size the model: set one of them" >&2
    exit 1
fi
case "${NANOCHAT_DEPTH:-1}" in
    ''|*[!0-9]*|0) echo "error: NANOCHAT_DEPTH=$NANOCHAT_DEPTH: expected a whole number of layers, e.g. 12" >&2; exit 1 ;;
esac
NUM_GPUS=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    NUM_GPUS=$(nvidia-smi -L | wc -l)
fi
if [ "$NUM_GPUS" -gt 0 ]; then
    GPU_MEM_MB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -n 1)
    GPU_CC=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1)
    GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
    # scripts.plan's name for this card (its --gpu), empty for one it does not know
    GPU_KIND=$(echo "$GPU_NAME" | tr 'A-Z' 'a-z' | tr -d ' ' |
               grep -oE 'h200|h100|h20|b200|a100|a40|l40s|l40|l4|rtx6000ada|a6000|5090|4090|4080|3090' | head -n 1 || true)
    if [ "$GPU_KIND" = a100 ] && [ "$GPU_MEM_MB" -lt 60000 ]; then GPU_KIND=a100-40gb; fi
    VOCAB_SIZE=32768
    if [ "$GPU_MEM_MB" -ge 70000 ]; then BATCH=16; elif [ "$GPU_MEM_MB" -ge 35000 ]; then BATCH=8; else BATCH=2; fi
    # fp8 tensor cores from compute capability 8.9 (Ada, Hopper, Blackwell)
    FP8=""
    if awk "BEGIN {exit !($GPU_CC >= 8.9)}"; then FP8="--fp8"; fi
    # the record's d24 (or NANOCHAT_DEPTH), or with NANOCHAT_HOURS the deepest model whose training fits
    # that many hours here (the same 8 tokens per parameter; device batch: the largest that fits, found at start)
    DEPTH=${NANOCHAT_DEPTH:-24}
    if [ -n "${NANOCHAT_HOURS:-}" ]; then
        if [ -z "$GPU_KIND" ]; then
            echo "error: NANOCHAT_HOURS: scripts.plan has no speed for the $GPU_NAME; choose a depth instead," \
                 "e.g. NANOCHAT_DEPTH=12" >&2
            exit 1
        fi
        # shellcheck disable=SC2086
        DEPTH=$("$PY" -m scripts.plan --hours "$NANOCHAT_HOURS" --gpus "$NUM_GPUS" --gpu "$GPU_KIND" \
                --target-param-data-ratio 8 $FP8 --json | "$PY" -c 'import json, sys; print(json.load(sys.stdin)["depth"])')
        BATCH=auto
    fi
    TAG=d$DEPTH
    TRAIN_ARGS="--depth $DEPTH --target-param-data-ratio 8 --device-batch-size $BATCH $FP8"
    EVAL_ARGS=""
    LAUNCH=("$PY" -m torch.distributed.run --standalone --nproc_per_node="$NUM_GPUS" -m)  # torchrun
    DEVICE_ARGS="--device-type cuda"  # a GPU node never falls back to CPU: a broken CUDA setup stops, named
    # flash-attn 4 kernels (wheels only, no compilation) into our own .venv, again when pyproject.toml
    # changes; a given environment is used as it is (training names the attention kernel it gets)
    if [ "$OWN_VENV" = 1 ] && { [ ! -f .venv/.installed-gpu ] || [ pyproject.toml -nt .venv/.installed-gpu ]; }; then
        .venv/bin/pip install -q -e '.[gpu]' && touch .venv/.installed-gpu
    fi
    echo "speedrun: $NUM_GPUS GPU(s), ${GPU_MEM_MB} MB each, compute capability $GPU_CC"
    # pre-flight plan: sizes, memory, time and cost before any money is spent
    PLAN=""
    if [ -n "$GPU_KIND" ]; then
        # shellcheck disable=SC2086
        PLAN=$("$PY" -m scripts.plan $TRAIN_ARGS --gpus "$NUM_GPUS" --gpu "$GPU_KIND") && echo "$PLAN" || echo "plan: skipped"
    else
        echo "plan: skipped: no speed or memory recorded for the $GPU_NAME (scripts.plan --help lists the known GPUs)"
    fi
    # the record recipe on less than 8 large GPUs runs for many hours: say so first, and how to size it
    if [ "$DEPTH" = 24 ] && [ -z "${NANOCHAT_HOURS:-}" ] && { [ "$NUM_GPUS" -lt 8 ] || [ "$GPU_MEM_MB" -lt 70000 ]; }; then
        HOURS=$(echo "$PLAN" | awk '/^  training time/ {print $3 " h"}')
        echo "================================================================================"
        echo " The record recipe (d24) is sized for 8 GPUs of 80 GB. On $NUM_GPUS × $GPU_NAME its training"
        echo " alone takes ${HOURS:-an unknown time} (plan above)."
        if echo "$PLAN" | grep -q "^  largest that fits *none"; then
            echo " It is estimated not to fit this GPU's memory even one row at a time."
        fi
        echo " To train the deepest model that fits a time budget instead, e.g. 4 hours:"
        echo "     NANOCHAT_HOURS=4 bash speedrun.sh"
        echo "================================================================================"
    fi
else
    VOCAB_SIZE=8192
    DEPTH=${NANOCHAT_DEPTH:-4}
    TAG=d$DEPTH
    # the CPU demo: a 4-layer model, full windows, 256-token context, 200 steps of 4,096 tokens
    TRAIN_ARGS="--depth $DEPTH --head-dim 64 --max-seq-len 256 --window-pattern L --device-batch-size 16
                --total-batch-size 4096 --num-iterations 200 --eval-every 50 --bpb-tokens 65536
                --final-bpb-tokens 262144 --core-every 0 --sample-every 100"
    # compiled: ~35 s of compiling pays for itself by about step 100 (docs/PERF.md: the whole demo ~10%
    # faster than eager); inductor builds C++ kernels on a CPU, so only where a C++ compiler is found
    if command -v "${CXX:-g++}" >/dev/null 2>&1 || command -v clang++ >/dev/null 2>&1; then
        TRAIN_ARGS="$TRAIN_ARGS --compile"
    else
        echo "speedrun: no C++ compiler (g++, clang++ or \$CXX): training runs eagerly, ~10% slower"
    fi
    # the demo bundle holds exactly these 50 items per task; the flag also puts "50 items" in the CORE label
    EVAL_ARGS="--core-max-per-task 50 --bpb-tokens 262144 --device-batch-size 16"
    LAUNCH=("$PY" -m)
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
        "$PY" -m nanochat.dataset -n 8
        "$PY" -m nanochat.dataset -n "${NANOCHAT_NUM_SHARDS:-170}" > "$NANOCHAT_BASE_DIR/download.log" 2>&1 &
        DOWNLOAD_PID=$! ;;
    demo) "$PY" -m nanochat.dataset --demo ;;
    hf:*) "$PY" -m nanochat.dataset --hf "${SOURCE#hf:}" ;;
    *)    "$PY" -m nanochat.dataset --local "$SOURCE" ;;
esac

# --- tokenizer ---
mark tokenizer
if "$PY" -c "import sys; from nanochat.tokenizer import get_tokenizer
sys.exit(get_tokenizer().vocab_size != $VOCAB_SIZE)" 2>/dev/null; then  # loads, and has the right size
    echo "tokenizer: already trained ($NANOCHAT_BASE_DIR/tokenizer/tokenizer.json)"
else
    "$PY" -m scripts.tok_train --vocab-size "$VOCAB_SIZE"
fi
"$PY" -m scripts.tok_eval

if [ -n "$DOWNLOAD_PID" ]; then
    echo "data: waiting for the remaining shards (log: $NANOCHAT_BASE_DIR/download.log)"
    wait "$DOWNLOAD_PID" || { tail -n 5 "$NANOCHAT_BASE_DIR/download.log"; exit 1; }
fi

# --- CORE eval bundle (used during training and by base_eval): downloaded on a GPU node; the CPU
# demo evaluates 50 items per task, which is what the bundle shipped in nanochat/demo_data holds ---
if [ "$NUM_GPUS" -gt 0 ]; then DEFAULT_BUNDLE="$NANOCHAT_BASE_DIR/eval_bundle"; else DEFAULT_BUNDLE="$PWD/nanochat/demo_data/eval_bundle"; fi
BUNDLE="${NANOCHAT_EVAL_BUNDLE:-$DEFAULT_BUNDLE}"
[ -f "$BUNDLE/core.yaml" ] || "$PY" -m scripts.base_eval --download-only --eval-bundle "$BUNDLE"

# --- GPU self-check (~2 min): kernels, compile, fp8, a few real steps, NCCL; stops here, named, if broken ---
if [ "$NUM_GPUS" -gt 0 ] && [ "${NANOCHAT_GPU_CHECK:-1}" != 0 ]; then
    mark gpu_check
    "$PY" -m scripts.gpu_check
fi

# --- pretraining (resumes from the newest complete checkpoint; a finished run returns at once) ---
# SIGTERM / Ctrl-C: training saves and exits non-zero (143 / 130; torchrun: 1), so set -e stops the
# script here rather than evaluate a half-trained model: re-run it to resume.
mark train
# shellcheck disable=SC2086  # the argument strings are meant to split into flags
"${LAUNCH[@]}" scripts.base_train $TRAIN_ARGS $DEVICE_ARGS --model-tag "$TAG" --eval-bundle "$BUNDLE" --resume ${NANOCHAT_TRAIN_ARGS:-}

# --- evaluation (skipped if base_eval.json already scores the final checkpoint), report ---
mark eval
if "$PY" -c "import json, sys; from nanochat.checkpoint import get_run_dir, list_steps
run = get_run_dir('$TAG'); done = json.load(open(run + '/base_eval.json'))['step']
sys.exit(done != list_steps(run)[-1])" 2>/dev/null; then
    echo "eval: already done for the final checkpoint"
else
    # shellcheck disable=SC2086
    "${LAUNCH[@]}" scripts.base_eval $EVAL_ARGS $DEVICE_ARGS --model-tag "$TAG" --eval-bundle "$BUNDLE" ${NANOCHAT_EVAL_ARGS:-}
fi
mark end
"$PY" -m scripts.report --model-tag "$TAG"
