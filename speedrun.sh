#!/usr/bin/env bash
# The nanochat speedrun: from a blank machine to a trained tokenizer and pretraining data
# (pretraining, evaluation and the report are the next stages to land here).
#
#   bash speedrun.sh                                   # real data: ClimbMix shards from Hugging Face
#   NANOCHAT_DATA_SOURCE=path/to/texts bash speedrun.sh  # offline: .jsonl/.txt/.parquet files or dirs
#   NANOCHAT_DATA_SOURCE=hf:org/name bash speedrun.sh    # any Hugging Face dataset with a text column
#
# Environment overrides: NANOCHAT_BASE_DIR (outputs, default ~/.cache/nanochat),
# NANOCHAT_DATA_SOURCE, NANOCHAT_NUM_SHARDS (train shards to download, default 170),
# NANOCHAT_VOCAB_SIZE (default 32768 on GPU, 8192 for the CPU demo).
set -euo pipefail
cd "$(dirname "$0")"

# --- environment, from this repo's own files ---
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/pip install -q -e .
PY=.venv/bin/python
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
mkdir -p "$NANOCHAT_BASE_DIR"

# --- hardware: a GPU node runs the real recipe, a CPU machine a small demo of every stage ---
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    NUM_GPUS=$(nvidia-smi -L | wc -l)
    VOCAB_SIZE="${NANOCHAT_VOCAB_SIZE:-32768}"
else
    NUM_GPUS=0
    VOCAB_SIZE="${NANOCHAT_VOCAB_SIZE:-8192}"
fi
echo "speedrun: $NUM_GPUS GPU(s), outputs in $NANOCHAT_BASE_DIR"

# --- data ---
SOURCE="${NANOCHAT_DATA_SOURCE:-}"
DOWNLOAD_PID=""
if [ -n "$(ls "$NANOCHAT_BASE_DIR"/base_data/shard_*.parquet 2>/dev/null)" ] && [ -n "$SOURCE" ]; then
    echo "data: shards already in $NANOCHAT_BASE_DIR/base_data"
elif [[ "$SOURCE" == hf:* ]]; then
    $PY -m nanochat.dataset --hf "${SOURCE#hf:}"
elif [ -n "$SOURCE" ]; then
    $PY -m nanochat.dataset --local "$SOURCE"
else
    # the tokenizer trains on the first ~2B characters (8 shards); the rest downloads meanwhile
    $PY -m nanochat.dataset -n 8
    $PY -m nanochat.dataset -n "${NANOCHAT_NUM_SHARDS:-170}" > "$NANOCHAT_BASE_DIR/download.log" 2>&1 &
    DOWNLOAD_PID=$!
fi

# --- tokenizer ---
if [ -f "$NANOCHAT_BASE_DIR/tokenizer/tokenizer.json" ]; then
    echo "tokenizer: already trained ($NANOCHAT_BASE_DIR/tokenizer/tokenizer.json)"
else
    $PY -m scripts.tok_train --vocab-size "$VOCAB_SIZE"
fi
$PY -m scripts.tok_eval

if [ -n "$DOWNLOAD_PID" ]; then
    echo "data: waiting for the remaining shards (log: $NANOCHAT_BASE_DIR/download.log)"
    wait "$DOWNLOAD_PID" || { tail -n 5 "$NANOCHAT_BASE_DIR/download.log"; exit 1; }
fi
echo "speedrun: done. Shards in $NANOCHAT_BASE_DIR/base_data, tokenizer in $NANOCHAT_BASE_DIR/tokenizer"
