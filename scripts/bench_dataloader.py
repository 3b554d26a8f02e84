"""
Throughput of the dataloader alone: read parquet, tokenize, best-fit pack, (copy to GPU).
Uses the tokenizer and shards in the base dir. An 8xH100 speedrun consumes ~125K tokens/s
per rank, so the loader must stay far above that to never stall training.

    python -m scripts.bench_dataloader [--batches 100] [--device-type cuda]
"""
import argparse
import os
import time

import torch

from nanochat.common import autodetect_device_type
from nanochat.dataloader import DataLoader
from nanochat.tokenizer import get_tokenizer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device-batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batches", type=int, default=100, help="timed batches (after --warmup)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="tokenizer threads")
    parser.add_argument("--device-type", default=None, help="cuda|cpu|mps (default: autodetect)")
    args = parser.parse_args(argv)

    device = args.device_type or autodetect_device_type()
    tokenizer = get_tokenizer()
    B, T = args.device_batch_size, args.seq_len
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
    main()
