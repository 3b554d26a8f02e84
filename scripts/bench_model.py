"""
Training-step throughput of the model alone (random tokens, no dataloader): tokens/s, MFU
against the device's bf16 peak, and peak memory.

    python -m scripts.bench_model --depth 12                              # GPU: compiled, bf16
    python -m scripts.bench_model --depth 24 --fp8
    python -m scripts.bench_model --depth 4 --head-dim 64 --seq-len 256 --vocab-size 8192 --window-pattern L
"""
import argparse
import resource
import time

import torch

from nanochat.common import autodetect_device_type, compute_dtype, compute_init, get_peak_flops, mfu
from nanochat.gpt import GPTConfig, build_model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--device-batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--window-pattern", default="SSSL")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--optimizer", action="store_true", help="time the optimizer step too")
    parser.add_argument("--compile", type=int, default=None, help="torch.compile (default: 1 on CUDA, 0 elsewhere)")
    parser.add_argument("--fp8", action="store_true", help="fp8 matmuls for the large Linears (CUDA SM89+)")
    parser.add_argument("--device-type", default=None, help="cuda|cpu|mps (default: autodetect)")
    args = parser.parse_args(argv)

    device = args.device_type or autodetect_device_type()
    compute_init(device)
    use_compile = (device == "cuda") if args.compile is None else bool(args.compile)
    config = GPTConfig.from_depth(args.depth, vocab_size=args.vocab_size, sequence_len=args.seq_len,
                                  head_dim=args.head_dim, window_pattern=args.window_pattern)
    model = build_model(config, device)
    if args.fp8:
        from nanochat.fp8 import convert_to_float8
        convert_to_float8(model)
    flops_per_token = model.estimate_flops()
    optimizer = model.setup_optimizer() if args.optimizer else None
    step_model = torch.compile(model) if use_compile else model
    B, T = args.device_batch_size, args.seq_len
    x = torch.randint(0, args.vocab_size, (B, T), device=device)
    y = torch.randint(0, args.vocab_size, (B, T), device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        step_model(x, y).backward()
        if optimizer is not None:
            optimizer.step()
        model.zero_grad(set_to_none=True)

    for _ in range(args.warmup):  # compilation, allocator warm-up
        step()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)

    median = sorted(times)[len(times) // 2]
    tok_per_sec = B * T / median
    util = mfu(tok_per_sec, flops_per_token, get_peak_flops(device))
    if device == "cuda":
        memory = f"{torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB (GPU, max allocated)"
    else:
        memory = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GiB (process peak RSS)"
    name = torch.cuda.get_device_name() if device == "cuda" else device
    rows = [
        ("device", f"{name}, {str(compute_dtype(device)).replace('torch.', '')}, "
                   f"{'compiled' if use_compile else 'eager'}{', fp8' if args.fp8 else ''}"),
        ("model", f"d{args.depth}: {config.n_embd} wide, {config.n_head} heads of {config.head_dim}, "
                  f"{model.num_params()['total'] / 1e6:.1f}M params, windows {args.window_pattern}"),
        ("step", f"{B} x {T} tokens, forward + backward{' + optimizer' if optimizer else ''}"),
        ("FLOPs/token", f"{flops_per_token:.3e}"),
        ("step time", f"median {median * 1e3:.1f} ms, min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f} "
                      f"({args.steps} steps)"),
        ("tokens/s", f"{tok_per_sec:,.0f}"),
        ("MFU", "n/a (no peak known for this device)" if util is None else f"{util:.1%}"),
        ("peak memory", memory),
    ]
    for key, value in rows:
        print(f"{key:<12} {value}")
    return {"tokens_per_sec": tok_per_sec, "mfu": util, "step_time": median}


if __name__ == "__main__":
    main()
