"""
Training-step throughput of the model alone (random tokens, no dataloader): tokens/s, MFU
against the device's bf16 peak, step-time median and spread, peak memory.

    python -m scripts.bench_model --depth 12 --device-batch-size 32          # GPU: compiled, bf16
    python -m scripts.bench_model --depth 24 --fp8 --attn flex --json out.json
    python -m scripts.bench_model --depth 4 --head-dim 64 --max-seq-len 256 --vocab-size 8192 --window-pattern L
    python -m scripts.bench_model --breakdown ...   # + FLOPs and time per component (CPU or GPU)
    python -m scripts.bench_model --matrix          # every depth/backend/fp8/compile combination, one table
    python -m scripts.bench_model --hooks ...       # + when gradient hooks fire within backward (overlap)
    python -m scripts.bench_model --profile ...     # + the optimizer step alone, and the top kernels of one step
    python -m scripts.bench_model --as-rank-of 8 ...  # + the step as one rank of an 8-GPU run sees it

A full step is forward + backward + optimizer (--no-optimizer to leave the optimizer out).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from nanochat.attention import BACKENDS
from nanochat.cli import DEVICE_TYPES, ArgumentParser, check, run
from nanochat.common import autodetect_device_type, compute_dtype, compute_init, get_peak_flops, mfu
from nanochat.gpt import build_model, compile_model, norm
from nanochat.recipe import derive
from nanochat.optim import build_optimizer


def parse_args(argv=None):
    p = ArgumentParser("python -m scripts.bench_model", __doc__)
    p.add_argument("--depth", type=int, default=12, help="layers, as base_train --depth")
    p.add_argument("--device-batch-size", type=int, default=16, help="rows per step")
    p.add_argument("--max-seq-len", type=int, default=2048, help="tokens per row (the context length)")
    p.add_argument("--vocab-size", type=int, default=32768, help="vocabulary size (random tokens below it)")
    p.add_argument("--head-dim", type=int, default=128, help="channels per attention head, as base_train")
    p.add_argument("--window-pattern", default="SSSL", help="S = short window, L = long, as base_train")
    p.add_argument("--steps", type=int, default=10, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first: compilation, allocator warm-up")
    p.add_argument("--no-optimizer", action="store_true", help="forward + backward only")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on with CUDA, off elsewhere)")
    p.add_argument("--regional-compile", action="store_true",
                   help="with compilation: each block compiled on its own, the rest eager, instead of the whole "
                        "model (a faster cold start; gradient reductions overlap backward)")
    p.add_argument("--fp8", action="store_true",
                   help="fp8 matmuls in the blocks and lm_head, as base_train --fp8 (CUDA SM89+)")
    p.add_argument("--fp8-lm-head", action=argparse.BooleanOptionalAction, default=True,
                   help="with --fp8: lm_head in fp8 too, as base_train (--no-fp8-lm-head: the blocks only, to compare)")
    p.add_argument("--attn", default=None, choices=list(BACKENDS),
                   help="force an attention backend, as NANOCHAT_ATTN does (default: the best that loads)")
    p.add_argument("--device-type", default=None, choices=DEVICE_TYPES, help="default: autodetect")
    p.add_argument("--breakdown", action="store_true", help="also FLOPs and time per component")
    p.add_argument("--json", default=None, metavar="FILE", help="write the results to this JSON file (default: none)")
    p.add_argument("--matrix", action="store_true", help="run the standard matrix of configurations")
    p.add_argument("--hooks", action="store_true",
                   help="also when the gradient hooks (where a multi-GPU run starts its reductions) fire in backward")
    p.add_argument("--as-rank-of", type=int, default=None, metavar="N",
                   help="also time the step as one rank of N processes sees it: the optimizer updates this rank's "
                        "share only, its collectives replaced by device copies of the same sizes (a lower bound; default: not timed)")
    p.add_argument("--profile", action="store_true",
                   help="also time the optimizer step alone, and list the top kernels of one step (torch.profiler)")
    args = p.parse_args(argv)
    check(p, [(value < low, f"{flag} {value}: must be >= {low}") for flag, value, low in [
        ("--depth", args.depth, 1), ("--device-batch-size", args.device_batch_size, 1),
        ("--max-seq-len", args.max_seq_len, 1), ("--vocab-size", args.vocab_size, 1), ("--head-dim", args.head_dim, 2),
        ("--steps", args.steps, 1), ("--warmup", args.warmup, 0), ("--as-rank-of", args.as_rank_of or 2, 2)]]
        + [(args.as_rank_of and args.no_optimizer, "--as-rank-of and --no-optimizer: the rank's share is of the "
                                                   "optimizer, leave --no-optimizer out")])
    return args


def make_timer(device):
    """Seconds taken by fn(): CUDA events on a GPU (no host-side noise), a wall clock elsewhere."""
    def timed(fn):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return timed


def median(values):
    return sorted(values)[len(values) // 2]


def breakdown(model, x, y, optimizer, timed, steps):
    """FLOPs per token (GPT.estimate_flops' count, split by component) and fwd+bwd time per step of each
    component measured in isolation at the same shapes; 'rest' is the full step minus the parts
    (embeddings, norms, residual scalars, head, loss). Attention scores count only the keys each
    layer attends to, so short windows show up as fewer FLOPs."""
    cfg, (B, T) = model.config, x.shape
    C, H, D, L = cfg.n_embd, cfg.n_head, cfg.head_dim, cfg.n_layer
    h = torch.randn(B, T, C, device=x.device, dtype=model.wte.weight.dtype, requires_grad=True)
    cos, sin = model.cos[:, :T], model.sin[:, :T]

    def fwd_bwd(fn):
        return median([timed(lambda: fn().float().square().mean().backward()) for _ in range(steps)])

    windows = cfg.window_sizes()
    attn_time = 0.0
    for w in sorted(set(windows)):  # one timing per distinct window, weighted by how many layers use it
        i = windows.index(w)
        block = model.blocks[i]
        ve = model.value_embeds[str(i)](x) if str(i) in model.value_embeds else None
        attn_time += windows.count(w) * fwd_bwd(lambda: block.attn(norm(h), ve, cos, sin))
    mlp_time = L * fwd_bwd(lambda: model.blocks[0].mlp(norm(h)))
    head_time = fwd_bwd(lambda: model.lm_head(norm(h)))
    total = median([timed(lambda: model(x, y).backward()) for _ in range(steps)])
    model.zero_grad(set_to_none=True)
    opt_time = optimizer_share(model, model, optimizer, x, y, timed, steps) if optimizer else 0.0
    scores = sum(12 * H * D * min(w, T) for w in windows)
    gates = 6 * 12 * H * len(model.value_embeds)  # value-embedding gates live in the attention modules
    rows = [  # (component, FLOPs per token, seconds per step)
        ("attention (projections + T x T scores)", 6 * 4 * C * C * L + gates + scores, attn_time),
        ("MLP", 6 * 8 * C * C * L, mlp_time),
        ("lm_head", 6 * C * cfg.vocab_size, head_time),
        ("rest: embeddings, norms, smear, softcap, loss", 6 * 24, total - attn_time - mlp_time - head_time),
        ("optimizer step", 0, opt_time),
    ]
    assert sum(f for _, f, _ in rows) == model.estimate_flops(), "breakdown does not add up to estimate_flops"
    return rows, total + opt_time


def grad_hook_times(model, step_model, x, y):
    """When each parameter's post-accumulate-grad hook fires (the optimizer starts that gradient's
    reduce-scatter there, in a multi-GPU run), as a fraction of one backward's host time: 0 = when
    backward starts, 1 = when it returns. Spread over [0, 1]: the reductions overlap backward. All
    near 1: they all start after it (a compiled model is one autograd node, so its gradients all
    become final at once, when the whole compiled backward has run)."""
    fired = []
    hooks = [p.register_post_accumulate_grad_hook(lambda p: fired.append(time.perf_counter()))
             for p in model.parameters()]
    loss = step_model(x, y)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    loss.backward()
    t1 = time.perf_counter()
    for h in hooks:
        h.remove()
    model.zero_grad(set_to_none=True)
    return sorted((t - t0) / (t1 - t0) for t in fired)


class CopyComm:
    """The optimizer's collectives as rank `rank` of `world` processes would run them, without the
    other processes: each becomes a device copy of its whole buffer (the input of a reduce-scatter,
    the output of an all-gather or all-reduce), and the rank's own block lands where the real
    collective would put it. No network, no waiting on peers: a LOWER BOUND on the real cost. The
    parameters other ranks own come back as copies of this rank's: only the timing means anything."""

    class Done:
        def wait(self):
            pass

    def __init__(self, rank, world):
        self.rank, self.world = rank, world

    def all_reduce(self, t, op=None, async_op=False):
        torch.empty_like(t).copy_(t)
        return self.Done()

    def reduce_scatter_single(self, out, inp, op=None, async_op=False):
        torch.empty_like(inp).copy_(inp)
        out.copy_(inp.unflatten(0, (self.world, -1))[self.rank])
        return self.Done()

    def all_gather_single(self, full, part, async_op=False):
        part = part.clone()  # part may be a view into full
        full.unflatten(0, (self.world, -1)).copy_(part.unsqueeze(0).expand(self.world, *part.shape))
        return self.Done()


def training_step(step_model, model, optimizer, x, y):
    """One training step on the fixed batch, as a function: forward, backward, the optimizer (if any)."""
    def step():
        step_model(x, y).backward()
        if optimizer is not None:
            optimizer.step()
        model.zero_grad(set_to_none=True)
    return step


def warm_up(step, steps, device):
    """Untimed steps (compilation, allocator warm-up); returns the first one's wall seconds, the cold
    start a user waits through (None for no steps)."""
    if steps == 0:
        return None
    t0 = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    first = time.perf_counter() - t0
    for _ in range(steps - 1):
        step()
    return first


def rank_share(optimizer):
    """{parameter name: element count of the optimizer state this rank keeps for it}: what it updates."""
    names = {p: f"{g['kind']}[{gi}].{i}" for gi, g in enumerate(optimizer.param_groups) for i, p in enumerate(g["params"])}
    return {names[p]: sum(t.numel() for t in s.values() if torch.is_tensor(t)) for p, s in optimizer.state.items()}


def time_as_rank(args, model, step_model, recipe, x, y, timed):
    """Step time as rank 0 of --as-rank-of processes: forward and backward on this device batch, then
    the optimizer on this rank's share with CopyComm for the collectives (after the one-process timing:
    its hooks stay on the parameters)."""
    optimizer = build_optimizer(model, recipe.param_groups, comm=CopyComm(0, args.as_rank_of))
    step = training_step(step_model, model, optimizer, x, y)
    warm_up(step, args.warmup, x.device)
    step_time = median([timed(step) for _ in range(args.steps)])
    tok_per_sec = x.numel() / step_time
    return {"world": args.as_rank_of, "step_ms_median": step_time * 1e3, "tokens_per_sec": tok_per_sec,
            "mfu": mfu(tok_per_sec, model.estimate_flops(), get_peak_flops(x.device)), "share": rank_share(optimizer)}


def optimizer_share(step_model, model, optimizer, x, y, timed, steps):
    """Seconds of the optimizer step alone (median), after a real backward each time, so every
    parameter has its gradient: the part of a step that a multi-GPU run cannot hide behind backward."""
    times = []
    for _ in range(steps):
        step_model(x, y).backward()
        times.append(timed(optimizer.step))
        model.zero_grad(set_to_none=True)
    return median(times)


def profile_step(step, device, rows=20):
    """Top kernels (device time; CPU time on a CPU) of one training step under torch.profiler:
    where the time goes, as (name, ms, share of the step, calls)."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    # kernels (ops on CPU) only: a user annotation such as Optimizer.step spans kernels counted already
    events = [e for e in prof.key_averages() if not getattr(e, "is_user_annotation", False)
              and e.device_type.name == ("CUDA" if device.type == "cuda" else "CPU")]
    self_time = (lambda e: e.self_device_time_total) if device.type == "cuda" else (lambda e: e.self_cpu_time_total)
    total = sum(self_time(e) for e in events) or 1
    top = sorted(events, key=self_time, reverse=True)[:rows]
    return [{"kernel": e.key, "ms": self_time(e) / 1e3, "share": self_time(e) / total, "calls": e.count} for e in top]


def peak_memory(device):
    """(GiB, what it counts): the allocator's peak on a GPU, the process's peak RSS on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 30, "GPU max allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, "process peak RSS"


def bench(args):
    """Time full training steps (forward, backward, optimizer) of one micro-batch; the result as a dict."""
    if args.attn:
        os.environ["NANOCHAT_ATTN"] = args.attn
    device_type = args.device_type or autodetect_device_type()
    _, _, _, _, device = compute_init(device_type)
    use_compile = (device.type == "cuda") if args.compile is None else bool(args.compile)
    # the training recipe for one micro-step per step (what is timed here): model and optimizer groups
    recipe = derive(depth=args.depth, vocab_size=args.vocab_size, sequence_len=args.max_seq_len, head_dim=args.head_dim,
                    window_pattern=args.window_pattern, device_batch_size=args.device_batch_size,
                    total_batch_size=args.device_batch_size * args.max_seq_len, num_iterations=1)
    config = recipe.config
    model = build_model(config, device)
    if args.fp8:
        from nanochat.fp8 import convert_to_float8
        convert_to_float8(model if args.fp8_lm_head else model.blocks)
    from nanochat.attention import get_backend
    flops_per_token = model.estimate_flops()
    optimizer = None if args.no_optimizer else build_optimizer(model, recipe.param_groups)
    step_model = compile_model(model, args.regional_compile) if use_compile else model
    B, T = args.device_batch_size, args.max_seq_len  # rows, tokens per row
    x = torch.randint(0, args.vocab_size, (B, T), device=device)
    y = torch.randint(0, args.vocab_size, (B, T), device=device)
    timed = make_timer(device)
    step = training_step(step_model, model, optimizer, x, y)
    first_step = warm_up(step, args.warmup, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [timed(step) for _ in range(args.steps)]
    step_time = median(times)
    tok_per_sec = B * T / step_time
    util = mfu(tok_per_sec, flops_per_token, get_peak_flops(device))
    memory, memory_kind = peak_memory(device)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "dtype": str(compute_dtype(device.type)).replace("torch.", ""),
        "compile": use_compile and ("regional" if args.regional_compile else "whole"),
        "fp8": args.fp8 and ("blocks + lm_head" if args.fp8_lm_head else "blocks"),
        "attention": get_backend(), "depth": args.depth, "width": config.n_embd, "heads": config.n_head,
        "head_dim": config.head_dim, "windows": args.window_pattern, "params": model.num_params()["total"],
        "batch": [B, T], "optimizer": optimizer is not None, "flops_per_token": flops_per_token,
        "step_ms_median": step_time * 1e3, "step_ms_min": min(times) * 1e3, "step_ms_max": max(times) * 1e3,
        "spread_pct": 100 * (max(times) - step_time) / step_time, "tokens_per_sec": tok_per_sec, "mfu": util,
        "peak_memory_gib": memory, "memory_kind": memory_kind, "steps": args.steps, "first_step_s": first_step,
        "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python -m scripts.bench_model", *sys.argv[1:]]),
    }
    extras(args, result, model, step_model, optimizer, step, x, y, timed, device)
    if args.as_rank_of:  # last: its optimizer's hooks stay on the parameters
        result["as_rank_of"] = time_as_rank(args, model, step_model, recipe, x, y, timed)
    return result


def extras(args, result, model, step_model, optimizer, step, x, y, timed, device):
    """What --hooks, --profile and --breakdown add to the result."""
    if args.hooks:
        fractions = grad_hook_times(model, step_model, x, y)
        result["grad_hooks"] = {"first": fractions[0], "median": median(fractions), "last": fractions[-1]}
    if args.profile:
        if optimizer is not None:
            result["optimizer_ms_median"] = optimizer_share(step_model, model, optimizer, x, y, timed, args.steps) * 1e3
        try:  # a profiler that fails on some driver must not cost the measurement above
            result["profile"] = profile_step(step, device)
        except Exception as e:
            print(f"bench_model: profiler failed: {e!r}", file=sys.stderr)
    if args.breakdown:
        rows, total = breakdown(model, x, y, optimizer, timed, max(3, args.steps // 2))
        result["breakdown"] = [{"component": c, "flops_per_token": f, "seconds": s} for c, f, s in rows]
        result["breakdown_total_seconds"] = total


def print_result(r):
    rows = [
        ("device", f"{r['device']}, {r['dtype']}, {'compiled (' + r['compile'] + ')' if r['compile'] else 'eager'}"
                   f"{', fp8 ' + r['fp8'] if r['fp8'] else ''}, attention {r['attention']}"),
        ("model", f"d{r['depth']}: {r['width']} wide, {r['heads']} heads of {r['head_dim']}, "
                  f"{r['params'] / 1e6:.1f}M params, windows {r['windows']}"),
        ("step", f"{r['batch'][0]} x {r['batch'][1]} tokens, forward + backward{' + optimizer' if r['optimizer'] else ''}"),
        ("FLOPs/token", f"{r['flops_per_token']:.3e}"),
        ("step time", f"median {r['step_ms_median']:.1f} ms, min {r['step_ms_min']:.1f}, max {r['step_ms_max']:.1f} "
                      f"(+{r['spread_pct']:.1f}% worst vs median, {r['steps']} steps)"),
        ("first step", "not run (--warmup 0)" if r["first_step_s"] is None else
                       f"{r['first_step_s']:.1f} s (compilation included, if any)"),
        ("tokens/s", f"{r['tokens_per_sec']:,.0f}"),
        ("MFU", "n/a (no peak known for this device)" if r["mfu"] is None else f"{r['mfu']:.1%}"),
        ("peak memory", f"{r['peak_memory_gib']:.2f} GiB ({r['memory_kind']})"),
    ]
    if "grad_hooks" in r:
        h = r["grad_hooks"]
        rows.append(("grad hooks", f"fire at {h['first']:.2f} .. {h['last']:.2f} of backward (median {h['median']:.2f}; "
                                   f"0 = its start, 1 = its end: reductions overlap backward only if spread out)"))
    if "optimizer_ms_median" in r:
        ms = r["optimizer_ms_median"]
        rows.append(("optimizer", f"{ms:.1f} ms alone (median), {ms / r['step_ms_median']:.1%} of the step"))
    if "as_rank_of" in r:
        a = r["as_rank_of"]
        rows.append((f"as 1 of {a['world']}", f"{a['tokens_per_sec']:,.0f} tok/s per GPU, MFU "
                     f"{'n/a' if a['mfu'] is None else format(a['mfu'], '.1%')}, step {a['step_ms_median']:.1f} ms: "
                     f"the optimizer on this rank's share, collectives as device copies (a lower bound on their cost)"))
    for key, value in rows:
        print(f"{key:<12} {value}")
    if "profile" in r:
        print(f"\n{'top kernels of one step (self time)':<90} {'ms':>8} {'share':>6} {'calls':>6}")
        for k in r["profile"]:
            print(f"{k['kernel'][:90]:<90} {k['ms']:>8.2f} {k['share']:>6.1%} {k['calls']:>6}")
    if "breakdown" in r:
        total_flops, total_s = r["flops_per_token"], r["breakdown_total_seconds"]
        tokens = r["batch"][0] * r["batch"][1]
        print(f"\n{'component':<46} {'FLOPs/token':>12} {'share':>6} {'ms/step':>9} {'share':>6} {'TFLOP/s':>8}")
        for row in r["breakdown"]:
            f, s = row["flops_per_token"], row["seconds"]
            rate = f"{f * tokens / s / 1e12:8.3f}" if f and s > 0 else f"{'-':>8}"
            print(f"{row['component']:<46} {f:>12.3e} {f / total_flops:>6.1%} {s * 1e3:>9.1f} {s / total_s:>6.1%} {rate}")


# The standard matrix: what issue-level performance work compares. Each runs in its own process
# (a fresh compile cache, a fresh backend choice, a clean allocator).
GPU_MATRIX = [f"--depth {d} --device-batch-size {b} --attn {a}{fp8}"
              for d, b in ((12, 32), (24, 16)) for a in ("fa3", "flex") for fp8 in ("", " --fp8")] + \
             ["--depth 12 --device-batch-size 32 --attn sdpa", "--depth 12 --device-batch-size 32 --no-compile"]
CPU_MATRIX = ["--depth 4 --head-dim 64 --max-seq-len 256 --vocab-size 8192 --window-pattern L",
              "--depth 4 --head-dim 64 --max-seq-len 256 --vocab-size 8192 --window-pattern L --no-optimizer"]


def run_matrix(device_type, timeout=600):
    configs = GPU_MATRIX if device_type == "cuda" else CPU_MATRIX
    results = []
    for config in configs:
        cmd = [sys.executable, "-m", "scripts.bench_model", *config.split(), "--json", "/dev/stdout"]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("{")), None)
            results.append(json.loads(line) if line else {"config": config, "error": (out.stderr.strip() or "?").splitlines()[-1]})
        except subprocess.TimeoutExpired:
            results.append({"config": config, "error": f"timed out after {timeout}s"})
        results[-1]["config"] = config
    print(f"{'config':<62} {'tok/s':>11} {'MFU':>6} {'median ms':>10} {'spread':>7} {'mem GiB':>8}")
    for r in results:
        if "error" in r:
            print(f"{r['config']:<62} failed: {r['error'][:80]}")
        else:
            util = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
            print(f"{r['config']:<62} {r['tokens_per_sec']:>11,.0f} {util:>6} {r['step_ms_median']:>10.1f} "
                  f"{r['spread_pct']:>6.1f}% {r['peak_memory_gib']:>8.2f}")
    return results


def main(argv=None):
    args = parse_args(argv)
    if args.matrix:
        results = run_matrix(args.device_type or autodetect_device_type())
    else:
        results = bench(args)
        if args.json != "/dev/stdout":
            print_result(results)
    if args.json:
        with open(args.json, "w") as f:
            f.write(json.dumps(results) + "\n")
    return results


if __name__ == "__main__":
    sys.exit(run(main))
