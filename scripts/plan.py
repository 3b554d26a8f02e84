"""
Plan a pretraining run before renting GPUs: parameters, horizon, batch, memory, time and cost.

    python -m scripts.plan --depth 24 --target-param-data-ratio 8 --device-batch-size 16 --fp8 --gpus 8 --gpu h100

    python -m scripts.plan --depth 24 --target-param-data-ratio 8 --json     # the derived recipe as JSON

    python -m scripts.plan --hours 4 --gpus 1 --gpu h100    # the deepest model that trains in 4 hours there

Nothing is allocated: the model is built on the meta device. The horizon, batch, steps, learning
rates, weight decays and schedule come from nanochat/recipe.py, as base_train derives them (same
defaults). Memory per GPU and the device batch that fits are ESTIMATES: weights, grads and
optimizer state are counted; the activations are what the compiled model saves for backward,
MEASURED on small models on the CPU (recorded for the default head dim and windows, else about
20 s) and scaled to this one; allocator overhead, fragmentation and temporaries other than the
logits' gradient are covered only by the 10% margin. The time is total FLOPs / (gpus × bf16 peak
× MFU); the MFU is --mfu, else one measured on this GPU at this depth and precision (MEASURED_MFU,
from docs/PERF.md), else 0.45 (assumed; see DEFAULT_MFU).
"""
import argparse
import json
import math
import sys

import torch

from nanochat.cli import ArgumentParser, check, flag_error, run
from nanochat.common import PEAK_BF16_FLOPS, peak_override
from nanochat.gpt import GPT
from nanochat.estimate import GPUS, SAFETY, memory_estimate, saved_bytes, time_and_cost
from nanochat.recipe import VOCAB_SIZE, add_flags, flag_problems, from_flags

BATCH_CANDIDATES = [2 ** i for i in range(7)]  # 1..64
MAX_DEPTH = 64  # the deepest model --hours considers


def parse_args(argv=None):
    p = ArgumentParser("python -m scripts.plan", __doc__)
    add_flags(p)  # base_train's own flags for the run: the same flags plan the same run
    p.add_argument("--gpus", type=int, default=8, help="number of GPUs (data-parallel processes)")
    p.add_argument("--gpu", type=str.lower, default="h100", choices=list(GPUS), help="GPU kind")
    p.add_argument("--vocab-size", type=int, default=VOCAB_SIZE,
                   help="tokenizer vocabulary size (base_train reads it from the trained tokenizer)")
    p.add_argument("--mfu", type=float, default=None,
                   help="model FLOPs utilization (default: recorded in docs/PERF.md for this GPU, depth and "
                        "precision, else 0.45)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the GPU's dense bf16 peak (default: NANOCHAT_PEAK_TFLOPS, else the table's for --gpu)")
    p.add_argument("--gpu-hour-cost", type=float, default=3.0, help="dollars per GPU-hour")
    p.add_argument("--hours", type=float, default=None,
                   help="size the run to a time budget: the deepest model whose training, at the tokens per "
                        "parameter of --target-param-data-ratio, takes at most this many hours on --gpus × --gpu "
                        "(default: none, the model is --depth)")
    p.add_argument("--json", action="store_true", help="print the derived recipe as JSON instead of the table")
    p.add_argument("--schedule-steps", type=steps_list, default=None,
                   help="with --json: the steps to print the schedule at, e.g. 0,299,400 (default: a few telling ones)")
    args = p.parse_args(argv)
    check(p, flag_problems(args) + [
        (args.gpus < 1, f"--gpus {args.gpus}: must be >= 1"),
        (args.vocab_size < 1, f"--vocab-size {args.vocab_size}: must be >= 1"),
        (args.mfu is not None and not 0 < args.mfu <= 1, f"--mfu {args.mfu}: must be in (0, 1]"),
        (args.gpu_hour_cost < 0, f"--gpu-hour-cost {args.gpu_hour_cost}: must be >= 0"),
        (args.peak_tflops is not None and args.peak_tflops <= 0, f"--peak-tflops {args.peak_tflops}: must be > 0"),
        (args.hours is not None and args.hours <= 0, f"--hours {args.hours}: must be > 0"),
        (args.hours is not None and args.depth is not None, "--hours picks the depth: leave --depth out"),
        (args.hours is not None and (args.num_iterations or args.target_flops) is not None,
         "--hours sizes the run by tokens per parameter: leave out --num-iterations and --target-flops"),
    ])
    return args


def steps_list(text):
    """--schedule-steps: comma-separated step numbers >= 0."""
    try:
        steps = [int(s) for s in text.split(",")]
    except ValueError:
        steps = [-1]
    if min(steps) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected step numbers >= 0 separated by commas, e.g. 0,299,400")
    return steps


def plan_recipe(args, device_batch_size=None):
    """base_train's recipe for these flags and --gpus processes; a batch the GPUs cannot split is a
    flag error, as in base_train."""
    try:
        return from_flags(args, args.vocab_size, args.gpus, device_batch_size)
    except ValueError as e:
        flag_error("python -m scripts.plan", str(e))


def print_json(args, recipe):
    """--json: the derived recipe, with the schedule at --schedule-steps."""
    if args.schedule_steps and max(args.schedule_steps) >= recipe.num_iterations:
        flag_error("python -m scripts.plan", f"--schedule-steps {max(args.schedule_steps)}: the run has steps "
                                             f"0..{recipe.num_iterations - 1}")
    estimate = estimate_time(args, recipe)
    print(json.dumps({**recipe.to_json(args.schedule_steps), "estimate": estimate}, indent=2))
    return {"recipe": recipe, **estimate}


def estimate_time(args, recipe):
    """Training time and cost of this recipe on --gpus × --gpu."""
    total_flops = recipe.tokens * recipe.flops_per_token
    peak = peak_override(args.peak_tflops) or PEAK_BF16_FLOPS[GPUS[args.gpu][0]]
    mfu, source, seconds, cost = time_and_cost(total_flops, args.gpus, args.gpu, recipe.config.n_layer, args.fp8,
                                               args.mfu, args.gpu_hour_cost, peak)
    return {"gpus": args.gpus, "gpu": args.gpu, "peak_flops": peak, "mfu": mfu, "mfu_source": source,
            "total_flops": total_flops, "hours": seconds / 3600, "cost": cost}


# -----------------------------------------------------------------------------
# --hours: the deepest model whose training fits a time budget

def with_depth(args, depth):
    return argparse.Namespace(**{**vars(args), "depth": depth})


def size_to_hours(args, budget):
    """The depth --hours picks, and the estimates it chose from ({depth: estimate_time's dict}). Time
    grows with depth (FLOPs per token and tokens both grow with the parameters), so depths are tried
    upward until one takes twice the budget; the deepest within it wins, if its batch-1 memory fits."""
    options = {}
    for depth in range(1, MAX_DEPTH + 1):
        options[depth] = estimate_time(args, plan_recipe(with_depth(args, depth), 1))
        if options[depth]["hours"] > 2 * args.hours:
            break
    fits = [d for d, o in options.items() if o["hours"] <= args.hours and fits_at_batch_1(args, d, budget)]
    if not fits:
        flag_error("python -m scripts.plan", f"--hours {args.hours:g}: even d1 needs {options[1]['hours']:.2g} h on "
                                             f"{args.gpus} × {args.gpu}: give more hours or more GPUs")
    return max(fits), options


def fits_at_batch_1(args, depth, budget):
    with torch.device("meta"):
        model = GPT(plan_recipe(with_depth(args, depth), 1).config)
    return memory_estimate(model, 1, args.gpus)["total"] <= budget


def print_hours_choice(args, depth, options, file):
    """The choice, with one depth down and up, as a small table."""
    print(f"-- --hours {args.hours:g} on {args.gpus} × {args.gpu}: d{depth}, the deepest whose training fits "
          f"(data, tokenizer and evaluation come on top)", file=file)
    for d in (depth - 1, depth, depth + 1):
        if d in options:
            o = options[d]
            note = {depth - 1: "", depth: "  <- chosen", depth + 1: "  over budget" if o["hours"] > args.hours else
                    "  does not fit memory at batch 1"}[d]
            print(f"   d{d:<3} {o['total_flops']:.2e} FLOPs  {o['hours']:6.2f} h  ${o['cost']:,.2f}  "
                  f"(MFU {o['mfu']:.2f}, {o['mfu_source']}){note}", file=file)


def fit_device_batch(args, first, budget):
    """(recipe, memory estimate by device batch, largest batch that fits): --device-batch-size as
    given, or 'auto': the largest that fits, and no larger than one micro-step of the total batch."""
    with torch.device("meta"):
        model = GPT(first.config)
    T = first.config.sequence_len
    memory = {b: memory_estimate(model, b, args.gpus) for b in BATCH_CANDIDATES}
    fits = [b for b in BATCH_CANDIDATES if memory[b]["total"] <= budget]
    best_fit = max(fits) if fits else None
    recipe = first
    if args.device_batch_size == "auto":
        recipe = plan_recipe(args, min(best_fit or 1, max(1, first.total_batch_size // (T * args.gpus))))
    if recipe.device_batch_size not in memory:
        memory[recipe.device_batch_size] = memory_estimate(model, recipe.device_batch_size, args.gpus)
    return recipe, memory, best_fit


def print_table(args, out):
    r, config, GB = out["recipe"], out["config"], 1e9
    batch, tokens, mem = out["total_batch_size"], out["tokens"], out["memory"]
    rows = [("model", f"d{config.n_layer}: {config.n_embd} wide, {config.n_head} heads × {config.head_dim}, "
                      f"seq {config.sequence_len}, vocab {config.vocab_size:,}" + (", fp8" if args.fp8 else ""))]
    rows += [(f"params {k}", f"{v:,}") for k, v in out["num_params"].items()]
    rows += [
        ("horizon params", f"{r.horizon_params:,} (matrices + lm_head)"),
        ("tokens", f"{tokens:,} ({tokens:.3e}, {tokens / r.horizon_params:.2f} per horizon param)"),
        ("total batch", f"{batch:,} tokens (2^{math.log2(batch):g})" if batch & (batch - 1) == 0 else f"{batch:,} tokens"),
        ("steps", f"{out['num_iterations']:,}"),
        ("device batch", f"{r.device_batch_size} × {config.sequence_len}"
                         + (" (auto)" if args.device_batch_size == "auto" else "")),
        ("grad accumulation", f"{r.grad_accum_steps} micro-steps × {args.gpus} GPUs"),
        ("Muon weight decay", f"{r.muon_weight_decay:.5f} (cosine-decayed to 0)"),
        ("FLOPs per token", f"{r.flops_per_token:.3e}"),
        ("total FLOPs", f"{out['total_flops']:.3e}"),
        ("-- memory per GPU", f"ESTIMATE at device batch {r.device_batch_size}, {args.gpu} {out['gpu_memory'] / GB:g} GB, "
                              f"budget {out['memory_budget'] / GB:.1f} GB (90%)"),
    ]
    rows += [(f"  {k}", f"{v / GB:.2f} GB") for k, v in mem.items()]
    per_layer = saved_bytes(config.head_dim, config.window_pattern)[0]
    rows += [("  saved per token", f"{per_layer:.1f} bytes × n_embd per layer (measured: compiled graph, bf16)"),
             ("  by device batch", "  ".join(f"{b}: {out['memory_by_batch'][b] / GB:.1f}" for b in BATCH_CANDIDATES)
              + " GB"),
             ("  largest that fits", f"{out['max_fitting_device_batch_size']} (estimate)"
              if out["max_fitting_device_batch_size"] else "none: even 1 × seq len does not fit")]
    if mem["total"] > out["memory_budget"]:
        rows.append(("  WARNING", f"device batch {r.device_batch_size} is estimated not to fit"))
    rows += [
        ("-- time and cost", f"{args.gpus} × {args.gpu} at {out['peak_flops'] / 1e12:.0f} TFLOP/s bf16 peak"),
        ("  MFU", f"{out['mfu']:.2f} ({out['mfu_source']})"),
        ("  training time", f"{out['hours']:.2f} h ({out['hours'] * 60:.0f} min)"),
        ("  cost", f"${out['cost']:,.2f} at ${args.gpu_hour_cost:.2f}/GPU-hour"),
        ("-- optimizer groups", "LR at multiplier 1 (Muon: before × √max(1, rows/cols))"),
    ]
    rows += [(f"  {g.name}", f"{g.kind} lr {g.lr:.4g}" + (f" betas {g.betas}" if g.betas else "") +
              f" wd {g.weight_decay:.4g}") for g in r.param_groups]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def main(argv=None):
    args = parse_args(argv)
    budget = GPUS[args.gpu][1] * 1e9 * SAFETY
    sized = None
    if args.hours is not None:
        args.depth, options = size_to_hours(args, budget)
        print_hours_choice(args, args.depth, options, sys.stderr if args.json else sys.stdout)
        sized = {"hours_budget": args.hours, "depth": args.depth, "options": options}
    # the model comes from the recipe (at any device batch: the model does not depend on it)
    first = plan_recipe(args, 1 if args.device_batch_size == "auto" else None)
    if args.json and args.device_batch_size != "auto":  # the recipe alone: no memory estimate needed
        return {**print_json(args, first), "sized": sized}
    recipe, memory, best_fit = fit_device_batch(args, first, budget)
    if args.json:
        return {**print_json(args, recipe), "sized": sized}
    out = {
        "config": recipe.config, "num_params": recipe.num_params, "horizon_params": recipe.horizon_params,
        "tokens": recipe.tokens, "total_batch_size": recipe.total_batch_size, "num_iterations": recipe.num_iterations,
        "grad_accum_steps": recipe.grad_accum_steps, "recipe": recipe, "muon_weight_decay": recipe.muon_weight_decay,
        "device_batch_size": recipe.device_batch_size, "max_fitting_device_batch_size": best_fit,
        "flops_per_token": recipe.flops_per_token, "memory": memory[recipe.device_batch_size],
        "memory_by_batch": {b: m["total"] for b, m in memory.items()}, "memory_budget": budget,
        "gpu_memory": GPUS[args.gpu][1] * 1e9, **estimate_time(args, recipe), "sized": sized,
    }
    print_table(args, out)
    return out


if __name__ == "__main__":
    sys.exit(run(main))
