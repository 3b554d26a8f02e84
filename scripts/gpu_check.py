"""
A self-check before a GPU run spends money (a few minutes on one GPU, most of it compiling):

    python -m scripts.gpu_check            # on a GPU node: what the speedrun will run, small
    python -m scripts.gpu_check --cpu      # the same checks that make sense on a CPU (CI runs this)
    python -m scripts.gpu_check --only attention,collectives

One line per check: PASS, FAIL, SKIP (cannot run here) or WARN (runs, but slower than it should),
with the numbers behind it. If anything failed, the last line names the first failure and its fix,
and the exit status is non-zero, so `speedrun.sh` stops before training starts.
  environment   torch, CUDA, driver, GPUs; tf32 setting; which attention kernel training will use
  attention     every backend that loads, against SDPA in fp32: forward, backward, windows, decode
  compile       torch.compile vs eager: forward, one optimizer step; eval and sampling at other
                shapes must not recompile the training graph; one step with per-block graphs
  optimizer     the optimizer's compiled update functions (the CUDA default) against eager at d12:
                same parameters, no recompile as the schedules change, ms per step of each
  fp8           the fp8 Linear against the same layer in fp32 (forward and both gradients), and a
                model's logits with its blocks and lm_head in fp8 against the same model in bf16
  steps         a few training steps with the speedrun's settings (d12, 16 x 2048, compiled,
                bf16 then fp8): tokens/s, MFU, peak memory. On CPU: a tiny model, eagerly.
  collectives   reduce-scatter, all-gather and all-reduce (AVG) across every local GPU with NCCL
                (two processes with gloo on CPU), checked for the right values, and the sharded
                optimizer's update against one process's; on one GPU also two gloo processes
                sharing it, so the sharded path runs on CUDA tensors (SKIP if gloo cannot)
"""
import os
import socket
import sys
import time
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanochat import attention as attn
from nanochat.cli import ArgumentParser, run
from nanochat.common import (autodetect_device_type, compute_init, get_peak_flops, mfu,
                             nvidia_driver_version)
from nanochat.gpt import GPTConfig, build_model, compile_model
from nanochat.optim import build_optimizer, torch_collectives


@dataclass
class Result:
    check: str
    status: str   # PASS, FAIL, SKIP, WARN
    detail: str   # the numbers
    fix: str = ""  # for FAIL and WARN: what to do about it


def rel_err(a, b):
    """Relative Frobenius error of a against the reference b."""
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def make_optimizer(model, compile=None):
    """The recipe's optimizer groups (their LRs follow the model's depth and vocab) on this model;
    compile: MuonAdamW's (default: compiled on CUDA)."""
    from nanochat.recipe import derive
    cfg = model.config
    recipe = derive(depth=cfg.n_layer, vocab_size=cfg.vocab_size, sequence_len=cfg.sequence_len,
                    head_dim=cfg.head_dim, window_pattern=cfg.window_pattern, device_batch_size=1, num_iterations=1)
    return build_optimizer(model, recipe.param_groups, compile=compile)

# -----------------------------------------------------------------------------
# environment


def check_environment(device):
    driver = nvidia_driver_version()
    where = (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(device)}, driver {driver}"
             if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)")
    yield Result("environment", "PASS", f"torch {torch.__version__}, CUDA {torch.version.cuda}, {where}")
    try:  # inductor's max-autotune and the profilers read these; one of the tf32 APIs breaks them
        tf32 = f"matmul precision {torch.get_float32_matmul_precision()}, allow_tf32 {torch.backends.cuda.matmul.allow_tf32}"
        yield Result("tf32 getters", "PASS", tf32)
    except RuntimeError as e:
        yield Result("tf32 getters", "FAIL", str(e).split(",")[0],
                     "set tf32 with torch.set_float32_matmul_precision('high'), not the fp32_precision flags")
    name = attn.get_backend(device, None, *speedrun_attention_shapes())
    if attn.trial_failures:  # training falls back, so the run goes on; the GPU is slower than it could be
        yield Result("attention backend", "WARN", f"{attn.describe_backend()}: " + "; ".join(
            f"{n} {why}" for n, why in attn.trial_failures.items()), "report it; training uses the backend named")
        return
    fast = not attn.is_slow_fallback(device, name)
    yield Result("attention backend", "PASS" if fast else "WARN", attn.describe_backend(),
                 "" if fast else f"flash-attn 4 did not load: {attn.FAST_KERNEL_INSTALL}")


def speedrun_attention_shapes():
    """(head dim, windows) of the speedrun's d24, for the fast kernels' trial run."""
    config = GPTConfig.from_depth(24)
    return config.head_dim, config.window_sizes()

# -----------------------------------------------------------------------------
# attention backends against SDPA


def attention_cases(device):
    """(label, Tq, Tk, window, with backward): training shapes with short and full windows, and
    KV-cache decode steps (a few queries against a longer cache)."""
    T = 1024 if device.type == "cuda" else 64
    return [("train short window", T, T, T // 4, True), ("train full", T, T, T, True),
            ("decode 1 token", 1, T, T // 4, False), ("decode 7 tokens", 7, T, T, False)]


def compare_backend(kernel, device, dtype, Tq, Tk, window, backward):
    """Largest relative error of the kernel's output (and q, k, v gradients) against SDPA in fp32."""
    g = torch.Generator(device=device).manual_seed(0)
    H, D = (6, 128) if device.type == "cuda" else (2, 16)
    shapes = [(2, Tq, H, D), (2, Tk, H, D), (2, Tk, H, D)]
    q, k, v = (torch.randn(s, device=device, generator=g).to(dtype).requires_grad_(backward) for s in shapes)
    ref_in = [x.detach().float().requires_grad_(backward) for x in (q, k, v)]
    out, ref = kernel(q, k, v, window), attn.sdpa_attention(*ref_in, window)
    errs = [rel_err(out, ref)]
    if backward:
        w = torch.randn(ref.shape, device=device, generator=g)
        (out.float() * w).sum().backward()
        (ref * w).sum().backward()
        errs += [rel_err(x.grad, r.grad) for x, r in zip((q, k, v), ref_in)]
    return max(errs)


def check_attention(device):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4  # bf16 keeps 8 mantissa bits
    for name, (what, _) in attn.BACKENDS.items():
        try:  # the raw kernel (flex's own, not its router to SDPA); training's choice stays as it is
            kernel = attn.load_kernel(name, device, dtype)
        except Exception as e:
            yield Result(f"attention {name}", "SKIP", f"{what} cannot run here: {str(e).splitlines()[0][:120]}")
            continue
        no_backward = name == "flex" and device.type == "cpu"  # no flex backward on CPU (torch 2.13)
        try:
            with warnings.catch_warnings():  # uncompiled flex on CPU warns that it is slow: known
                warnings.filterwarnings("ignore", "flex_attention called without torch.compile")
                errs = {label: compare_backend(kernel, device, dtype, Tq, Tk, w, bwd and not no_backward)
                        for label, Tq, Tk, w, bwd in attention_cases(device)}
        except Exception as e:  # loads but cannot run: training's trial run skips it too, so not a FAIL
            yield Result(f"attention {name}", "WARN", f"{what} loads but fails: {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120]}", "training falls back to the next backend; report it")
            continue
        worst = max(errs, key=errs.get)
        detail = (f"max rel err vs SDPA fp32 {errs[worst]:.1e} ({worst}; tolerance {tol:.0e})"
                  + (", forward only on CPU" if no_backward else ", forward + backward"))
        ok = errs[worst] < tol
        yield Result(f"attention {name}", "PASS" if ok else "FAIL", detail,
                     "" if ok else "avoid it: NANOCHAT_ATTN=sdpa (or another backend that passes)")

# -----------------------------------------------------------------------------
# torch.compile against eager


def small_config(device):
    """Big enough for short windows (T >= 256: a 128-token window on the short layers)."""
    if device.type == "cuda":
        return GPTConfig.from_depth(4, sequence_len=512)
    return GPTConfig(sequence_len=256, vocab_size=256, n_layer=2, n_head=2, n_embd=64)


def one_step_update(model, forward, x, y):
    """The change one optimizer step makes to every parameter, flattened into one vector."""
    optimizer = make_optimizer(model)
    before = [p.detach().clone() for p in model.parameters()]
    forward(x, y).backward()
    optimizer.step()
    model.zero_grad(set_to_none=True)
    return torch.cat([(p.detach() - b).float().flatten() for p, b in zip(model.parameters(), before)])


def counting_inductor(graphs):
    """inductor, appending to `graphs` for every graph it compiles: counts the recompiles of one
    compiled model only (compiled flex_attention on CUDA compiles graphs of its own when eager
    decoding meets new shapes; those are not the training graph's)."""
    from torch._inductor.compile_fx import compile_fx

    def backend(gm, example_inputs):
        graphs.append(gm)
        return compile_fx(gm, example_inputs)
    return backend


def recompiles_after_eval_rounds(model, step_model, graphs, x, y, rounds=3):
    """Uncompiled evaluation at new lengths and KV-cache sampling, as training runs them between
    steps, then the compiled training step again: how many graphs of step_model compiled anew."""
    from nanochat.engine import Engine
    step_model(x, y).backward()  # the training graph exists before counting
    before = len(graphs)
    for r in range(rounds):
        with torch.no_grad():
            model(x[:, :x.size(1) // 2 + r])
        Engine(model).generate_batch([1, 2, 3], max_tokens=4 + r, temperature=0)
        step_model(x, y).backward()
    model.zero_grad(set_to_none=True)
    return len(graphs) - before


def check_compile(device):
    config = small_config(device)
    tol = 3e-2 if device.type == "cuda" else 1e-4  # bf16 rounds differently once kernels fuse
    x = torch.randint(0, config.vocab_size, (2, config.sequence_len), device=device)
    y = torch.roll(x, -1, dims=1)
    torch.manual_seed(0)
    eager = build_model(config, device)
    torch.manual_seed(0)
    model = build_model(config, device)
    graphs = []
    step_model = torch.compile(model, backend=counting_inductor(graphs))
    with torch.no_grad():
        err = rel_err(step_model(x), eager(x))
    yield Result("compile forward", "PASS" if err < tol else "FAIL", f"logits rel err vs eager {err:.1e} (tolerance {tol:.0e})",
                 "train with --no-compile (slower) and report the mismatch")
    err = rel_err(one_step_update(model, step_model, x, y), one_step_update(eager, eager, x, y))
    # Muon's Newton-Schulz iteration runs in bf16 even on CPU, and it and Adam's division amplify
    # small gradient differences: measured 4e-3 on CPU in fp32
    tol_step = 1e-1 if device.type == "cuda" else 2e-2
    yield Result("compile optimizer step", "PASS" if err < tol_step else "FAIL",
                 f"parameter update rel err vs eager {err:.1e} (tolerance {tol_step:.0e})",
                 "train with --no-compile (slower) and report the mismatch")
    n = recompiles_after_eval_rounds(model, step_model, graphs, x, y)
    torch._dynamo.reset()  # free the compiled graphs before the next check
    yield Result("compile recompiles", "PASS" if n == 0 else "FAIL", f"{n} new graphs after 3 eval/sample rounds",
                 "a global read inside the compiled model changes between calls: find it with "
                 "TORCH_LOGS=recompiles python -m scripts.gpu_check --only compile, or train with --no-compile")
    # regional compilation (--regional-compile): each block its own graph, the rest eager
    torch.manual_seed(0)
    regional = build_model(config, device)
    torch.manual_seed(0)
    eager = build_model(config, device)
    err = rel_err(one_step_update(regional, compile_model(regional, regional=True), x, y),
                  one_step_update(eager, eager, x, y))
    torch._dynamo.reset()
    yield Result("compile regional", "PASS" if err < tol_step else "FAIL",
                 f"per-block graphs: parameter update rel err vs eager {err:.1e} (tolerance {tol_step:.0e})",
                 "train without --regional-compile and report the mismatch")


def scheduled_optimizer_steps(model, optimizer, steps, start=0):
    """`steps` optimizer steps on fixed random gradients, the schedules changing every step;
    returns the seconds per step."""
    gen = torch.Generator(device=model.wte.weight.device).manual_seed(0)
    grads = [torch.randn(p.shape, generator=gen, device=p.device).to(p.dtype) * 1e-2 for p in model.parameters()]
    sync = torch.cuda.synchronize if grads[0].is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for step in range(start, start + steps):
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
        optimizer.set_schedule(1 - step / 100, 0.85 + 0.001 * step, 0.01 * (1 - step / 100))
        optimizer.step()
    sync()
    return (time.perf_counter() - t0) / steps


def check_compiled_optimizer(device):
    """The optimizer's update functions compiled (the CUDA default) against eager: the same parameters
    after 3 scheduled steps, no recompile in 20 more, and the time per step of each."""
    from torch._dynamo.utils import counters
    if device.type != "cuda":  # CPU runs the optimizer eagerly; tests/test_optim_compile.py compiles it there
        yield Result("compile optimizer", "SKIP", "eager on CPU by default (tests/test_optim_compile.py checks it)")
        return
    torch._dynamo.reset()
    counters.clear()
    moved, times = [], []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = build_model(GPTConfig.from_depth(12), device)
        init = [p.detach().clone() for p in model.parameters()]
        optimizer = make_optimizer(model, compile=compiled)
        scheduled_optimizer_steps(model, optimizer, 3)
        graphs = counters["stats"]["unique_graphs"]
        times.append(scheduled_optimizer_steps(model, optimizer, 20, start=3))
        moved.append([p.detach() - p0 for p, p0 in zip(model.parameters(), init)])
    new_graphs = counters["stats"]["unique_graphs"] - graphs
    err = max(rel_err(a, b) for a, b in zip(moved[1], moved[0]))  # of the change the 23 steps made
    ok = err < 2e-2 and new_graphs == 0  # bf16 Polar Express: fused kernels round differently
    yield Result("compile optimizer", "PASS" if ok else "FAIL",
                 f"d12: update rel err vs eager {err:.1e} after 23 steps, {new_graphs} recompiles in 20 scheduled steps; "
                 f"step {times[0] * 1e3:.1f} ms eager, {times[1] * 1e3:.1f} ms compiled",
                 "a scheduled value reached the compiled update as a Python number: pass it as a 0-D tensor")
    torch._dynamo.reset()

# -----------------------------------------------------------------------------
# fp8


def check_fp8(device):
    from nanochat import fp8
    if device.type == "cuda" and not fp8.fp8_supported():
        yield Result("fp8 linear", "SKIP", "needs compute capability >= 8.9 (training runs without --fp8)")
        return
    shape, N = ((2, 2048, 768), 3072) if device.type == "cuda" else ((4, 16, 256), 128)  # d12's MLP on GPU
    try:
        err_y, err_dx, err_dw = fp8.fp8_vs_reference(device, shape, N)
    except (RuntimeError, NotImplementedError) as e:  # _scaled_mm missing on this CPU build
        yield Result("fp8 linear", "SKIP", f"torch._scaled_mm cannot run here: {str(e).splitlines()[0][:100]}")
        return
    ok = fp8.MIN_ERR_Y < err_y < fp8.TOL_Y and max(err_dx, err_dw) < fp8.TOL_GRAD  # and really quantized
    yield Result("fp8 linear", "PASS" if ok else "FAIL",
                 f"rel err vs fp32: y {err_y:.3f}, dx {err_dx:.3f}, dW {err_dw:.3f} "
                 f"(tolerance {fp8.TOL_Y} / {fp8.TOL_GRAD})", "train without --fp8 and report the mismatch")
    err = fp8_logits_error(device)
    yield Result("fp8 logits", "PASS" if fp8.MIN_ERR_Y < err < fp8.TOL_Y else "FAIL",
                 f"rel err of a d4 model's logits, blocks and lm_head in fp8, vs without: {err:.3f} "
                 f"(tolerance {fp8.TOL_Y})", "train without --fp8 and report the mismatch")


def fp8_logits_error(device):
    """The whole model's logits, fp8 (blocks and lm_head, as --fp8 trains) against bf16. lm_head is
    re-initialized at full scale: at its near-zero init the logits would be nearly all softcap-free noise."""
    from nanochat import fp8
    torch.manual_seed(0)
    on_gpu = device.type == "cuda"
    config = GPTConfig.from_depth(4, vocab_size=32768 if on_gpu else 512, sequence_len=256 if on_gpu else 32)
    model = build_model(config, device)
    torch.nn.init.normal_(model.lm_head.weight, std=config.n_embd ** -0.5)
    fp8.swap_to_float8(model)  # the device was checked above: an fp8 GPU, or the CPU's emulation
    idx = torch.randint(0, config.vocab_size, (4, config.sequence_len), device=device)
    return fp8.logits_vs_bf16(model, idx)

# -----------------------------------------------------------------------------
# training steps with the speedrun's settings


def timed_steps(device, config, B, use_fp8, use_compile, steps, warmup):
    """Build, (convert,) compile, warm up, then time `steps` full steps. Returns (tok/s, MFU, GiB, losses)."""
    torch.manual_seed(0)
    model = build_model(config, device)
    if use_fp8:
        from nanochat.fp8 import convert_to_float8
        convert_to_float8(model)
    optimizer = make_optimizer(model)
    step_model = torch.compile(model) if use_compile else model
    x = torch.randint(0, config.vocab_size, (B, config.sequence_len), device=device)
    y = torch.roll(x, -1, dims=1)
    losses = []

    def step():
        loss = step_model(x, y)
        loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    for _ in range(warmup):  # compilation and allocator warm-up
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    tok_per_sec = B * config.sequence_len * steps / (time.perf_counter() - t0)
    util = mfu(tok_per_sec, model.estimate_flops(), get_peak_flops(device))
    gib = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    return tok_per_sec, util, gib, [loss.item() for loss in losses]


def check_steps(device):
    from nanochat.fp8 import fp8_supported
    if device.type == "cuda":
        config, B, runs = GPTConfig.from_depth(12), 16, [("d12 bf16", False), ("d12 fp8", True)]
    else:
        config, B, runs = GPTConfig(sequence_len=128, vocab_size=512, n_layer=2, n_head=2, n_embd=128), 2, [("tiny", False)]
    for label, use_fp8 in runs:
        if use_fp8 and not fp8_supported():
            yield Result(f"steps {label}", "SKIP", "fp8 needs compute capability >= 8.9")
            continue
        on_gpu = device.type == "cuda"
        tok, util, gib, losses = timed_steps(device, config, B, use_fp8, on_gpu, steps=5 if on_gpu else 2,
                                             warmup=2 if on_gpu else 1)
        ok = all(l == l and abs(l) != float("inf") for l in losses)  # noqa: E741 (finite)
        util_text = "n/a" if util is None else f"{util:.1%}"
        memory = "n/a" if gib is None else f"{gib:.1f} GiB"
        yield Result(f"steps {label}", "PASS" if ok else "FAIL",
                     f"{B} x {config.sequence_len}: {tok:,.0f} tok/s, MFU {util_text}, peak memory {memory}, "
                     f"loss {losses[0]:.3f} -> {losses[-1]:.3f}",
                     "non-finite loss on random tokens: report it (and try without --fp8 / --no-compile)")
        torch._dynamo.reset()  # free the compiled graphs (and the model they hold) before the next run
        if device.type == "cuda":
            torch.cuda.empty_cache()

# -----------------------------------------------------------------------------
# collectives across all local GPUs (or two processes with gloo), and the sharded optimizer on them


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def collective_errors(device, rank, world, n):
    """Run the three collectives the optimizer uses, with AVG; return the largest error of each."""
    base = torch.arange(world * n, dtype=torch.float32, device=device)
    mean = (world + 1) / 2  # of the rank factors 1..world
    comm = torch_collectives()
    out = torch.empty(n, device=device)
    comm.reduce_scatter_single(out, (rank + 1) * base, op=dist.ReduceOp.AVG)
    errs = {"reduce-scatter": (out - mean * base[rank * n:(rank + 1) * n]).abs().max().item()}
    full = torch.empty(world * n, device=device)
    comm.all_gather_single(full, torch.full((n,), float(rank), device=device))
    errs["all-gather"] = (full - torch.arange(world, device=device).repeat_interleave(n)).abs().max().item()
    t = (rank + 1) * base
    dist.all_reduce(t, op=dist.ReduceOp.AVG)
    errs["all-reduce"] = (t - mean * base).abs().max().item()
    if os.environ.get("NANOCHAT_GPU_CHECK_BREAK") == "collectives":
        errs["all-reduce"] += 1.0
    return errs


def optimizer_update(device, steps=3):
    """The change `steps` scheduled optimizer steps on fixed gradients make to a small model, flattened:
    under torch.distributed each rank updates its share (ZeRO-2) and gathers the rest. Eager updates:
    this checks the sharding, the compile check checks compilation."""
    torch.manual_seed(0)
    model = build_model(small_config(device), device)
    before = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    scheduled_optimizer_steps(model, make_optimizer(model, compile=False), steps)
    return (torch.cat([p.detach().float().flatten() for p in model.parameters()]) - before).cpu()


def all_reduce_busbw(device, world, mib=256, iters=5):
    """Bus bandwidth (GB/s) of an all-reduce, as nccl-tests defines it: bytes x 2(W-1)/W per second."""
    t = torch.ones(mib * 2 ** 18, device=device)  # fp32
    dist.all_reduce(t)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(t)
    torch.cuda.synchronize()
    return t.numel() * 4 * 2 * (world - 1) / world / ((time.perf_counter() - t0) / iters) / 1e9


def collectives_worker(rank, world, port, backend, devices, out_dir):
    """One rank on devices[rank]: NCCL on its own GPU, gloo on the CPU or on a GPU that every rank shares."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device(devices[rank])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world, device_id=device if backend == "nccl" else None)
    errs = collective_errors(device, rank, world, n=1024)
    bad = {name: e for name, e in errs.items() if e > 1e-4}
    if bad:
        raise RuntimeError(f"rank {rank} of {world}: wrong values from {', '.join(f'{k} (max error {v:.2g})' for k, v in bad.items())}")
    busbw = all_reduce_busbw(device, world) if backend == "nccl" and world > 1 else None
    torch.save({"busbw": busbw, "update": optimizer_update(device)}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()  # every rank wrote its file before teardown, which gloo may abort
    dist.destroy_process_group()


def spawn_ranks(backend, devices):
    """Every rank's file (bus bandwidth, the optimizer steps' update), in rank order."""
    world = len(devices)
    import tempfile
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as out_dir:
        try:
            mp.spawn(collectives_worker, args=(world, free_port(), backend, devices, out_dir), nprocs=world)
        except mp.ProcessExitedException:  # a crash in teardown, after every rank wrote its file
            if len(os.listdir(out_dir)) < world:
                raise
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]


def check_collectives(device):
    """Each setting's collectives, and its sharded optimizer against the same steps in this process.
    One GPU: NCCL has a single rank, so two gloo ranks share the GPU to run the sharded path there."""
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    settings = {"collectives nccl": ("nccl", [f"cuda:{i}" for i in range(gpus)])} if gpus else \
        {"collectives gloo": ("gloo", ["cpu", "cpu"])}
    if gpus == 1:
        settings["collectives gloo shared GPU"] = ("gloo", ["cuda:0", "cuda:0"])
    alone = optimizer_update(device)
    for name, (backend, devices) in settings.items():
        try:
            ranks = spawn_ranks(backend, devices)
        except Exception as e:
            if backend == "nccl" or devices[0] == "cpu":
                raise
            why = str(e).strip()[-200:]
            yield Result(name, "SKIP", f"gloo cannot run these collectives on CUDA tensors here: {why}")
            continue
        err = max(rel_err(r["update"], alone) for r in ranks)  # bf16 Polar Express on a GPU: batches may round apart
        speed = f", all-reduce 256 MiB: {ranks[0]['busbw']:.0f} GB/s bus bandwidth" if ranks[0]["busbw"] else ""
        yield Result(name, "PASS" if err < 1e-2 else "FAIL",
                     f"reduce-scatter, all-gather, all-reduce AVG correct on {len(devices)} ranks; the sharded "
                     f"optimizer's update vs one process: rel err {err:.1e} after 3 steps (tolerance 1e-2){speed}",
                     "the ranks' shares of the optimizer update disagree with one process: report it")

# -----------------------------------------------------------------------------

CHECKS = {  # name -> (check, what to do if it raises)
    "environment": (check_environment, "fix the environment named above before training"),
    "attention": (check_attention, "avoid the failing kernel: NANOCHAT_ATTN=sdpa"),
    "compile": (check_compile, "train with --no-compile (slower) and report the error"),
    "optimizer": (check_compiled_optimizer, "report the error; meanwhile MuonAdamW(..., compile=False)"),
    "fp8": (check_fp8, "train without --fp8"),
    "steps": (check_steps, "out of memory: lower --device-batch-size; otherwise report the error"),
    "collectives": (check_collectives, "run NCCL_DEBUG=INFO python -m scripts.gpu_check --only collectives, "
                                       "check nvidia-smi topo -m; meanwhile train on one GPU"),
}


def run_checks(device, names):
    results = []
    for name in names:
        check, fix = CHECKS[name]
        try:
            for r in check(device):
                advice = f" -> {r.fix}" if r.status == "WARN" and r.fix else ""
                print(f"{r.status:4s}  {r.check:24s} {r.detail}{advice}", flush=True)
                results.append(r)
        except Exception as e:  # one line, not a traceback: the speedrun log must stay readable
            r = Result(name, "FAIL", f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[-1][:300]}", fix)
            print(f"{r.status:4s}  {r.check:24s} {r.detail}", flush=True)
            results.append(r)
    return results


def parse_args(argv=None):
    p = ArgumentParser("python -m scripts.gpu_check", __doc__)
    p.add_argument("--cpu", action="store_true", help="run the CPU checks even on a GPU machine")
    p.add_argument("--only", default=",".join(CHECKS), help="comma-separated subset of the checks")
    args = p.parse_args(argv)
    args.only = args.only.split(",")
    unknown = [n for n in args.only if n not in CHECKS]
    if unknown:
        p.error(f"--only {','.join(unknown)}: expected some of {', '.join(CHECKS)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    t0 = time.perf_counter()
    _, _, _, _, device = compute_init("cpu" if args.cpu else autodetect_device_type())
    results = run_checks(device, args.only)
    failed = [r for r in results if r.status == "FAIL"]
    if failed:
        first = failed[0]
        raise SystemExit(f"gpu_check FAILED ({len(failed)} of {len(results)} checks): {first.check}: "
                         f"{first.detail}; fix: {first.fix}")
    print(f"gpu_check: {len(results)} checks, none failed, in {time.perf_counter() - t0:.0f} s on {device}", flush=True)
    return results


if __name__ == "__main__":
    sys.exit(run(main))
