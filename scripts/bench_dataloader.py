"""
Throughput of the dataloader alone: read parquet, tokenize, best-fit pack, (copy to GPU).
Uses the tokenizer and shards in the base dir. An 8xH100 speedrun consumes ~125K tokens/s
per rank, so the loader must stay far above that to never stall training.

    python -m scripts.bench_dataloader [--batches 100] [--device-type cuda]

A batch is --device-batch-size rows of --max-seq-len tokens.
"""
import os
import sys
import time

import torch

from nanochat.cli import DEVICE_TYPES, ArgumentParser, check, run
from nanochat.common import autodetect_device_type
from nanochat.dataloader import DataLoader
from nanochat.tokenizer import get_tokenizer


def main(argv=None):
    parser = ArgumentParser("python -m scripts.bench_dataloader", __doc__)
    parser.add_argument("--device-batch-size", type=int, default=16, help="rows per batch")
    parser.add_argument("--max-seq-len", type=int, default=2048, help="tokens per row")
    parser.add_argument("--batches", type=int, default=100, help="timed batches (after --warmup)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed batches first: fill the buffers")
    parser.add_argument("--threads", type=int, default=1, help="tokenizer threads")
    parser.add_argument("--device-type", default=None, choices=DEVICE_TYPES, help="default: autodetect")
    args = parser.parse_args(argv)
    check(parser, [(value < low, f"{flag} {value}: must be >= {low}") for flag, value, low in [
        ("--device-batch-size", args.device_batch_size, 1), ("--max-seq-len", args.max_seq_len, 1),
        ("--batches", args.batches, 1), ("--warmup", args.warmup, 0), ("--threads", args.threads, 1)]])

    device = args.device_type or autodetect_device_type()
    tokenizer = get_tokenizer()
    B, T = args.device_batch_size, args.max_seq_len  # rows, tokens per row
    loader = DataLoader(tokenizer, B, T, "train", device=device, threads=args.threads)
    for _ in range(args.warmup):  # fills the document buffer and the read-ahead queue
        next(loader)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(args.batches):
        x, y = next(loader)
    sync()
    dt = time.perf_counter() - t0
    loader.close()

    rows = [
        ("device", f"{device} ({'pinned, non-blocking copies' if loader.pinned else 'no host-to-device copy'})"),
        ("cpu cores", os.cpu_count()),
        ("tokenizer", f"{tokenizer.vocab_size:,} tokens, {loader.threads} threads"),
        ("batch", f"{B} x {T}"),
        ("batches timed", args.batches),
        ("ms / batch", f"{dt / args.batches * 1e3:.2f}"),
        ("tokens / s", f"{args.batches * B * T / dt:,.0f}"),
        ("crop fraction", f"{loader.crop_fraction:.1%}"),
    ]
    for name, value in rows:
        print(f"{name:<14} {value}")
    return args.batches * B * T / dt


if __name__ == "__main__":
    sys.exit(run(main))
