"""
Plan a pretraining run before renting GPUs: parameters, horizon, batch, memory, time and cost.

    python -m scripts.plan --depth 24 --target-param-data-ratio 8 --device-batch-size 16 --fp8 --gpus 8 --gpu h100

    python -m scripts.plan --depth 24 --target-param-data-ratio 8 --json     # the derived recipe as JSON

Nothing is allocated: the model is built on the meta device. The horizon, batch, steps, learning
rates, weight decays and schedule come from nanochat/recipe.py, as base_train derives them (same
defaults). Memory per GPU and the device batch that fits are ESTIMATES: weights, grads and
optimizer state are counted; the activations are what the compiled model saves for backward,
MEASURED on small models on the CPU (recorded for the default head dim and windows, else about
20 s) and scaled to this one; allocator overhead, fragmentation and temporaries other than the
logits' gradient are covered only by the 10% margin. The time is total FLOPs / (gpus × bf16 peak
× MFU); the MFU is --mfu, else one recorded for this GPU, depth and precision in docs/PERF.md,
else 0.45 (assumed; see DEFAULT_MFU).
"""
import functools
import json
import math
import os
import re
from collections import defaultdict

import torch
import torch.nn as nn

from nanochat.cli import ArgumentParser, check
from nanochat.common import PEAK_BF16_FLOPS
from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import SHARD_MIN_NUMEL
from nanochat.recipe import derive

# --gpu name -> (key in nanochat.common.PEAK_BF16_FLOPS, memory in GB = 1e9 bytes)
GPUS = {
    "h100": ("H100", 80), "h200": ("H200", 141), "a100": ("A100", 80), "a100-40gb": ("A100", 40),
    "b200": ("B200", 180), "l4": ("L4", 24), "4090": ("RTX 4090", 24),
}
SAFETY = 0.9  # use at most 90% of the GPU's memory
# Measured on one H200 (docs/PERF.md, 2026-11-26): d24 at 16 x 2048, compiled, FlexAttention, the whole
# optimizer on that one GPU: 49.1 % with fp8, 42.0 % in bf16. Assumed for other GPUs and runs: 45 %,
# below the fp8 figure because an H100 has less memory bandwidth for the elementwise kernels and an
# 8-GPU run adds communication (unmeasured), above the bf16 one because 8 GPUs shard the optimizer.
DEFAULT_MFU = 0.45
BATCH_CANDIDATES = [2 ** i for i in range(7)]  # 1..64
PERF_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "PERF.md")

# Activations are MEASURED, not counted by hand: what the compiled model saves for backward depends on
# what the compiler fuses and recomputes. measure_saved_bytes() compiles small models on the CPU with
# the partitioner inductor uses (the "aot_eager_decomp_partition" backend: inductor's decompositions
# and min-cut rematerialization, without generating kernels) and records every tensor the compiled
# forward saves. Every saved per-token tensor is C, 4C or n_head wide, so the bytes per token per
# layer grow exactly with the width at a fixed head_dim; outside the blocks they grow with C and V.
PROBE_WIDTH, PROBE_VOCABS, PROBE_B, PROBE_T = 256, (512, 1024), 3, 40  # T, B: no model dim equals them
# The backward's largest temporary (not saved, so not measured): the fp32 gradient of the logits.
LOGIT_GRAD_BYTES_PER_VOCAB = 4


def saved_for_backward(config, B=PROBE_B, T=PROBE_T):
    """(bytes per token, other bytes) of the tensors that the compiled model (bf16, on the CPU) saves
    for backward: each storage once, the parameters themselves not (they exist anyway). Per token:
    the tensors with a B×T or T dimension; the rest are copies such as the bf16 casts of weights."""
    import torch._dynamo
    from unittest import mock
    from nanochat.gpt import build_model
    with mock.patch.dict(os.environ, NANOCHAT_DTYPE="bf16"):
        torch.manual_seed(0)
        model = build_model(config, "cpu")
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    per_token, other = {}, {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            (per_token if T in t.shape or B * T in t.shape else other)[ptr] = t.untyped_storage().nbytes()
        return t

    idx = torch.randint(0, config.vocab_size, (B, T))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            torch.compile(model, backend="aot_eager_decomp_partition")(idx, idx)
    finally:
        torch._dynamo.reset()
    return sum(per_token.values()) / (B * T), sum(other.values())


@functools.lru_cache
def measure_saved_bytes(head_dim, window_pattern):
    """Saved-for-backward bytes of the compiled model per token: (per layer per n_embd element,
    outside the blocks per n_embd element, per vocab entry), and (bytes per matmul weight element),
    from three small models: depth 2 and 4 (their difference is two layers: one with a value
    embedding, one without, as alternating layers have) and a second vocab size."""
    C, (V1, V2) = PROBE_WIDTH, PROBE_VOCABS
    cfg = lambda L, V: GPTConfig(sequence_len=PROBE_T * 2, vocab_size=V, n_layer=L, n_head=C // head_dim,  # noqa: E731
                                 n_embd=C, window_pattern=window_pattern)
    (s2, w2), (s4, _), (s2v, _) = [saved_for_backward(cfg(L, V)) for L, V in ((2, V1), (4, V1), (2, V2))]
    per_layer = (s4 - s2) / 2
    per_vocab = (s2v - s2) / (V2 - V1)
    with torch.device("meta"):
        matmul = sum(m.weight.numel() for m in GPT(cfg(2, V1)).modules() if isinstance(m, nn.Linear))
    return per_layer / C, (s2 - 2 * per_layer - per_vocab * V1) / C, per_vocab, w2 / matmul


# measure_saved_bytes() at the default head_dim and windows, recorded (torch 2.13.0) so that plan
# answers at once instead of compiling for ~20 s, also on the GPU node where speedrun.sh runs it;
# tests/test_plan.py re-measures it, so a torch whose compiler saves otherwise fails there.
RECORDED_SAVED_BYTES = {(128, "SSSL"): (39.1328125, 8.1015625, 2.0, 2.000002347439882)}


def saved_bytes(head_dim, window_pattern):
    """measure_saved_bytes(), from the record where there is one."""
    return RECORDED_SAVED_BYTES.get((head_dim, window_pattern)) or measure_saved_bytes(head_dim, window_pattern)


def parse_args(argv=None):
    p = ArgumentParser("python -m scripts.plan", __doc__)
    p.add_argument("--depth", type=int, default=20, help="layers, as base_train --depth")
    p.add_argument("--gpus", type=int, default=8, help="number of GPUs (data-parallel processes)")
    p.add_argument("--gpu", type=str.lower, default="h100", choices=list(GPUS), help="GPU kind")
    p.add_argument("--target-param-data-ratio", type=float, default=12,
                   help="training tokens per (matrix + lm_head) parameter, as base_train")
    p.add_argument("--fp8", action="store_true", help="as base_train --fp8; FLOPs and memory are counted in bf16")
    p.add_argument("--device-batch-size", default="auto",
                   help="rows per GPU per micro-step, or 'auto': the largest power of two estimated to fit")
    p.add_argument("--max-seq-len", type=int, default=2048, help="context length, as base_train")
    p.add_alias("--seq-len", "max_seq_len")  # old name of the bench scripts
    p.add_argument("--vocab-size", type=int, default=32768, help="tokenizer vocabulary size")
    p.add_argument("--mfu", type=float, default=None,
                   help="model FLOPs utilization (default: recorded in docs/PERF.md for this GPU, depth and "
                        "precision, else 0.45)")
    p.add_argument("--gpu-hour-cost", type=float, default=3.0, help="dollars per GPU-hour")
    p.add_argument("--json", action="store_true", help="print the derived recipe as JSON instead of the table")
    args = p.parse_args(argv)
    check(p, [
        (args.depth < 1, f"--depth {args.depth}: must be >= 1 (the number of layers)"),
        (args.gpus < 1, f"--gpus {args.gpus}: must be >= 1"),
        (not args.target_param_data_ratio > 0, f"--target-param-data-ratio {args.target_param_data_ratio}: must be > 0"),
        (args.device_batch_size != "auto" and not (args.device_batch_size.isdigit() and int(args.device_batch_size) > 0),
         f"--device-batch-size {args.device_batch_size}: expected a positive integer or 'auto'"),
        (args.max_seq_len < 1, f"--max-seq-len {args.max_seq_len}: must be >= 1"),
        (args.vocab_size < 1, f"--vocab-size {args.vocab_size}: must be >= 1"),
        (args.mfu is not None and not 0 < args.mfu <= 1, f"--mfu {args.mfu}: must be in (0, 1]"),
        (args.gpu_hour_cost < 0, f"--gpu-hour-cost {args.gpu_hour_cost}: must be >= 0"),
    ])
    return args


def plan_recipe(args, device_batch_size):
    return derive(depth=args.depth, vocab_size=args.vocab_size, sequence_len=args.max_seq_len,
                  processes=args.gpus, device_batch_size=device_batch_size, ratio=args.target_param_data_ratio)


def memory_estimate(model, device_batch_size, gpus):
    """Estimated peak bytes per GPU for one micro-step of device_batch_size × seq_len tokens."""
    cfg, W = model.config, gpus
    block_params = {id(p) for p in model.blocks.parameters()}
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    weights = grads = adamw = 0
    for p in model.parameters():
        nbytes = p.numel() * (2 if id(p) in embeddings else 4)  # embeddings bf16; Linear weights, scalars fp32
        weights += nbytes
        grads += nbytes  # a gradient has its parameter's dtype
        if id(p) not in block_params:  # AdamW: exp_avg + exp_avg_sq in fp32, sharded if large enough
            sharded = W > 1 and p.numel() >= SHARD_MIN_NUMEL
            adamw += 2 * 4 * (math.ceil(p.size(0) / W) * p[0].numel() if sharded and p.dim() > 0 else p.numel())
    # Muon: matrices of one shape are handled W at a time, each rank owning whole matrices:
    # ceil(n / W) fp32 momentum buffers per shape, plus the NorMuon factor (one per row or column)
    by_shape = defaultdict(int)
    for p in model.blocks.parameters():
        by_shape[tuple(p.shape)] += 1
    muon = sum(math.ceil(n / W) * 4 * (m * k + (m if m >= k else k)) for (m, k), n in by_shape.items())
    tokens = device_batch_size * cfg.sequence_len
    per_layer, outside, per_vocab, per_weight = saved_bytes(cfg.head_dim, cfg.window_pattern)
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    activations = tokens * (cfg.n_embd * (per_layer * cfg.n_layer + outside) + per_vocab * cfg.vocab_size)
    parts = dict(weights=weights, grads=grads, adamw_state=adamw, muon_state=muon, activations=activations,
                 weight_copies=per_weight * matmul,  # the bf16 casts of the fp32 weights, saved for backward
                 logits_grad=tokens * LOGIT_GRAD_BYTES_PER_VOCAB * cfg.vocab_size)
    parts["total"] = sum(parts.values())
    return parts


def recorded_mfu(gpu_key, depth, fp8, path=None):
    """An MFU measured on this GPU kind at this depth and precision, from a table row of docs/PERF.md
    naming the GPU and 'd<depth>', saying 'fp8' exactly when fp8 is on, with an 'MFU xx%' / 'xx% MFU'
    figure; None if there is none."""
    try:
        with open(path or PERF_PATH) as f:
            lines = f.readlines()
    except OSError:
        return None
    name = re.compile(r"(?<![\w-])" + re.escape(gpu_key) + r"(?![\w-])", re.IGNORECASE)
    model = re.compile(rf"(?<![\w-])d{depth}(?![\w-])")
    figure = re.compile(r"MFU\D{0,3}?(\d+(?:\.\d+)?)\s*%|(\d+(?:\.\d+)?)\s*%\s*MFU", re.IGNORECASE)
    for line in lines:
        if not (line.startswith("|") and name.search(line) and model.search(line)):
            continue
        if ("fp8" in line.lower()) == fp8 and (m := figure.search(line)):
            return float(m.group(1) or m.group(2)) / 100
    return None


def time_and_cost(args, peak_key, peak, total_flops):
    """(MFU, where it comes from, training seconds, dollars): total FLOPs at that fraction of the
    GPUs' bf16 peak. The MFU is --mfu, else one measured on this GPU (docs/PERF.md), else assumed."""
    if args.mfu is not None:
        mfu, mfu_source = args.mfu, "given (--mfu)"
    elif (recorded := recorded_mfu(peak_key, args.depth, args.fp8)) is not None:
        mfu, mfu_source = recorded, "measured, docs/PERF.md"
    else:
        mfu, mfu_source = DEFAULT_MFU, "assumed, not measured"
    seconds = total_flops / (args.gpus * peak * mfu)
    return mfu, mfu_source, seconds, seconds / 3600 * args.gpus * args.gpu_hour_cost


def main(argv=None):
    args = parse_args(argv)
    peak_key, mem_gb = GPUS[args.gpu]
    peak = PEAK_BF16_FLOPS[peak_key]
    budget = mem_gb * 1e9 * SAFETY

    # the model comes from the recipe (at any device batch: the model does not depend on it)
    config = plan_recipe(args, 1).config
    with torch.device("meta"):
        model = GPT(config)
    T = config.sequence_len

    memory = {b: memory_estimate(model, b, args.gpus) for b in BATCH_CANDIDATES}
    fits = [b for b in BATCH_CANDIDATES if memory[b]["total"] <= budget]
    best_fit = max(fits) if fits else None
    if args.device_batch_size == "auto":
        device_batch = best_fit or 1
    else:
        device_batch = int(args.device_batch_size)
    mem = memory[device_batch] if device_batch in memory else memory_estimate(model, device_batch, args.gpus)

    recipe = plan_recipe(args, device_batch)
    counts, flops_per_token, horizon_params = recipe.num_params, recipe.flops_per_token, recipe.horizon_params
    batch, steps, accum, tokens = recipe.total_batch_size, recipe.num_iterations, recipe.grad_accum_steps, recipe.tokens
    total_flops = tokens * flops_per_token
    if args.json:
        print(json.dumps(recipe.to_json(), indent=2))

    mfu, mfu_source, seconds, cost = time_and_cost(args, peak_key, peak, total_flops)
    hours = seconds / 3600

    GB = 1e9
    rows = [("model", f"d{config.n_layer}: {config.n_embd} wide, {config.n_head} heads × {config.head_dim}, "
                      f"seq {T}, vocab {config.vocab_size:,}" + (", fp8" if args.fp8 else ""))]
    rows += [(f"params {k}", f"{v:,}") for k, v in counts.items()]
    rows += [
        ("horizon params", f"{horizon_params:,} (matrices + lm_head)"),
        ("tokens", f"{tokens:,} ({tokens:.3e}, {tokens / horizon_params:.2f} per horizon param)"),
        ("total batch", f"{batch:,} tokens (2^{math.log2(batch):g})" if batch & (batch - 1) == 0 else f"{batch:,} tokens"),
        ("steps", f"{steps:,}"),
        ("device batch", f"{device_batch} × {T}" + (" (auto)" if args.device_batch_size == "auto" else "")),
        ("grad accumulation", f"{accum} micro-steps × {args.gpus} GPUs"),
        ("Muon weight decay", f"{recipe.muon_weight_decay:.5f} (cosine-decayed to 0)"),
        ("FLOPs per token", f"{flops_per_token:.3e}"),
        ("total FLOPs", f"{total_flops:.3e}"),
        ("-- memory per GPU", f"ESTIMATE at device batch {device_batch}, {args.gpu} {mem_gb} GB, "
                              f"budget {budget / GB:.1f} GB (90%)"),
    ]
    rows += [(f"  {k}", f"{v / GB:.2f} GB") for k, v in mem.items()]
    per_layer = saved_bytes(config.head_dim, config.window_pattern)[0]
    rows += [("  saved per token", f"{per_layer:.1f} bytes × n_embd per layer (measured: compiled graph, bf16)")]
    rows += [("  by device batch", "  ".join(f"{b}: {memory[b]['total'] / GB:.1f}" for b in BATCH_CANDIDATES) + " GB"),
             ("  largest that fits", f"{best_fit} (estimate)" if best_fit else "none: even 1 × seq len does not fit")]
    if mem["total"] > budget:
        rows.append(("  WARNING", f"device batch {device_batch} is estimated not to fit"))
    rows += [
        ("-- time and cost", f"{args.gpus} × {args.gpu} at {peak / 1e12:.0f} TFLOP/s bf16 peak"),
        ("  MFU", f"{mfu:.2f} ({mfu_source})"),
        ("  training time", f"{hours:.2f} h ({seconds / 60:.0f} min)"),
        ("  cost", f"${cost:,.2f} at ${args.gpu_hour_cost:.2f}/GPU-hour"),
    ]
    rows += [("-- optimizer groups", "LR at multiplier 1 (Muon: before × √max(1, rows/cols))")]
    rows += [(f"  {g.name}", f"{g.kind} lr {g.lr:.4g}" + (f" betas {g.betas}" if g.betas else "") +
              f" wd {g.weight_decay:.4g}") for g in recipe.param_groups]
    width = max(len(k) for k, _ in rows)
    for k, v in rows if not args.json else []:
        print(f"{k:<{width}}  {v}")

    return {
        "config": config, "num_params": counts, "horizon_params": horizon_params, "tokens": tokens,
        "total_batch_size": batch, "num_iterations": steps, "grad_accum_steps": accum, "recipe": recipe,
        "muon_weight_decay": recipe.muon_weight_decay,
        "device_batch_size": device_batch, "max_fitting_device_batch_size": best_fit,
        "flops_per_token": flops_per_token, "total_flops": total_flops,
        "memory": mem, "memory_by_batch": {b: m["total"] for b, m in memory.items()},
        "memory_budget": budget, "gpu_memory": mem_gb * GB, "peak_flops": peak,
        "mfu": mfu, "mfu_source": mfu_source, "hours": hours, "cost": cost,
    }


if __name__ == "__main__":
    main()
