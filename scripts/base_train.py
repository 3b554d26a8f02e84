"""
Pretrain the base model.

    python -m scripts.base_train --depth 12                                  # one GPU or CPU
    torchrun --standalone --nproc_per_node=8 -m scripts.base_train --depth 24 --target-param-data-ratio 8 --fp8

--depth sets the model and, through it, every default: the training horizon (tokens =
ratio × (matrix + lm_head params)), the total batch size, the learning rates and the weight
decay. Each rank processes --device-batch-size × seq-len tokens per micro-step and
accumulates gradients up to the total batch. Metrics go to <run dir>/metrics.jsonl (and
wandb with --run); checkpoints to <run dir>/step_NNNNNN; --resume continues exactly.
"""
import argparse
import dataclasses
import json
import math
import os
import signal
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

from nanochat.checkpoint import (get_run_dir, list_steps, load_meta, load_training_state, load_weights,
                                 save_checkpoint, step_dir)
from nanochat.common import atomic_write, compute_cleanup, compute_init, get_peak_flops, mfu, print0
from nanochat.dataloader import DataLoader
from nanochat.gpt import GPT, GPTConfig, build_model
from nanochat.core_eval import evaluate_core, get_eval_bundle_dir
from nanochat.engine import sample_texts
from nanochat.loss_eval import evaluate_split_bpb
from nanochat.tokenizer import get_tokenizer

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # model
    p.add_argument("--depth", type=int, default=20, help="the one dial: width, heads and defaults follow from it")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--window-pattern", default="SSSL", help="S = short window, L = long; tiled over layers")
    p.add_argument("--fp8", action="store_true", help="fp8 matmuls for the large Linears (CUDA SM89+)")
    # horizon: the first of these that is set wins
    p.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps")
    p.add_argument("--target-flops", type=float, default=-1, help="total training FLOPs")
    p.add_argument("--target-param-data-ratio", type=float, default=12, help="tokens per (matrix + lm_head) param")
    # batch
    p.add_argument("--device-batch-size", default="16",
                   help="sequences per rank per micro-step, or 'auto': the largest power of two that fits (CUDA)")
    p.add_argument("--total-batch-size", type=int, default=-1, help="tokens per optimizer step (-1: auto)")
    # optimization
    p.add_argument("--matrix-lr", type=float, default=0.02, help="Muon LR (other LRs follow SPEC scalings)")
    p.add_argument("--weight-decay", type=float, default=-1, help="Muon weight decay (-1: auto from batch and horizon)")
    p.add_argument("--warmup-steps", type=int, default=40)
    p.add_argument("--warmdown-ratio", type=float, default=0.65)
    p.add_argument("--final-lr-frac", type=float, default=0.05)
    # evaluation, logging, checkpoints
    p.add_argument("--eval-every", type=int, default=250, help="val bpb every N steps (and at the end)")
    p.add_argument("--eval-tokens", type=int, default=10 * 524288, help="val tokens per bpb evaluation")
    p.add_argument("--core-every", type=int, default=2000, help="CORE (subset) every N steps and at the end; -1: never")
    p.add_argument("--core-max-per-task", type=int, default=500, help="items per CORE task during training")
    p.add_argument("--eval-bundle", default=None, help="CORE eval bundle dir (default: <base dir>/eval_bundle)")
    p.add_argument("--sample-every", type=int, default=2000, help="print samples every N steps and at the end")
    p.add_argument("--save-every", type=int, default=-1, help="checkpoint every N steps (always at the end)")
    p.add_argument("--save-every-minutes", type=float, default=-1,
                   help="checkpoint every N minutes of wall time (-1: 30 on CUDA, off elsewhere; 0: off)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of the run dir")
    p.add_argument("--model-tag", default=None, help="run dir name under base_checkpoints (default: d<depth>)")
    p.add_argument("--run", default=None, help="wandb run name (default: no wandb; WANDB_MODE=offline works)")
    p.add_argument("--device-type", default=None, help="cuda|cpu|mps (default: autodetect)")
    p.add_argument("--compile", type=int, default=None, help="torch.compile (default: 1 on CUDA)")
    return p.parse_args(argv)


def check_flags(args):
    """Impossible or conflicting flag values: one clear line each, before anything is built."""
    problems = [
        (args.device_batch_size != "auto" and not (args.device_batch_size.isdigit() and int(args.device_batch_size) > 0),
         f"--device-batch-size {args.device_batch_size}: expected a positive integer or 'auto'"),
        (not args.window_pattern or set(args.window_pattern) - set("SL"),
         f"--window-pattern {args.window_pattern!r}: use the letters S (short window) and L (long), e.g. SSSL"),
        (args.head_dim < 2 or args.head_dim % 2, f"--head-dim {args.head_dim}: must be even (rotary rotates pairs)"),
        (args.max_seq_len < 1, f"--max-seq-len {args.max_seq_len}: must be positive"),
        (not 0 <= args.warmdown_ratio <= 1, f"--warmdown-ratio {args.warmdown_ratio}: must be in [0, 1]"),
        (not 0 <= args.final_lr_frac <= 1, f"--final-lr-frac {args.final_lr_frac}: must be in [0, 1]"),
        (args.num_iterations > 0 and args.target_flops > 0,
         "--num-iterations and --target-flops are both set: give one training horizon"),
        (args.model_tag is not None and ("/" in args.model_tag or args.model_tag.startswith(".")),
         f"--model-tag {args.model_tag!r}: a plain directory name, not a path"),
    ]
    for bad, message in problems:
        if bad:
            raise ValueError(message)


def matrix_and_head_params(config):
    with torch.device("meta"):
        counts = GPT(config).num_params()
    return counts["transformer_matrices"] + counts["lm_head"]


def plan(args, config, flops_per_token, tokens_per_micro_step):
    """Training horizon and batch size, derived from the depth unless given explicitly."""
    params = matrix_and_head_params(config)
    # the reference horizon: d12 at ratio 12; batch and weight decay were tuned there
    ref_tokens = 12 * matrix_and_head_params(GPTConfig.from_depth(12, vocab_size=config.vocab_size))
    if args.num_iterations > 0 and args.total_batch_size > 0:
        tokens = args.num_iterations * args.total_batch_size
    elif args.target_flops > 0:
        tokens = args.target_flops / flops_per_token
    else:
        tokens = args.target_param_data_ratio * params
    # bigger horizons want bigger batches: B ∝ D^0.383, rounded to a power of two
    B = args.total_batch_size if args.total_batch_size > 0 else \
        2 ** round(math.log2(2 ** 19 * (tokens / ref_tokens) ** 0.383))
    B = max(B, tokens_per_micro_step)
    if B % tokens_per_micro_step:
        raise ValueError(f"--total-batch-size {B} is not a multiple of device batch × seq len × processes = "
                         f"{tokens_per_micro_step}: change --total-batch-size or --device-batch-size")
    steps = args.num_iterations if args.num_iterations > 0 else max(1, round(tokens / B))
    # weight decay ∝ sqrt(batch) and inversely ∝ horizon (the total decay applied stays similar)
    wd = args.weight_decay if args.weight_decay >= 0 else 0.28 * (B / 2 ** 19) ** 0.5 * ref_tokens / (steps * B)
    return B, steps, wd, params


def probe_device_batch(model, seq_len, device, world):
    """The largest power-of-two device batch whose forward + backward, plus the optimizer state
    still to be allocated (~8 bytes per parameter, sharded), fits in 90% of the GPU's memory.
    Probed on the uncompiled model, which needs more memory than the compiled one: conservative."""
    if device.type != "cuda":
        return 16  # no out-of-memory to probe for: the CPU default
    total = torch.cuda.get_device_properties(device).total_memory
    optimizer_bytes = 8 * sum(p.numel() for p in model.parameters()) / world
    best = 0
    for b in (1, 2, 4, 8, 16, 32, 64):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            x = torch.randint(0, model.config.vocab_size, (b, seq_len), device=device)
            model(x, x).backward()
            fits = torch.cuda.max_memory_allocated(device) + optimizer_bytes <= 0.9 * total
        except torch.cuda.OutOfMemoryError:
            fits = False
        model.zero_grad(set_to_none=True)
        if not fits:
            break
        best = b
    torch.cuda.empty_cache()
    if dist.is_initialized():  # every rank must run the same batch
        agreed = torch.tensor(best, device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        best = int(agreed)
    if best == 0:
        raise RuntimeError("--device-batch-size auto: not even 1 sequence fits in GPU memory; "
                           "use a smaller --depth or --max-seq-len")
    print0(f"--device-batch-size auto: {best} (largest power of two that fits)")
    return best


def lr_multiplier(step, steps, args):
    """Linear warmup, constant, then linear warmdown over the last warmdown_ratio to final_lr_frac."""
    warmdown_start = steps * (1 - args.warmdown_ratio)
    if step < args.warmup_steps:
        return (step + 1) / args.warmup_steps
    if step < warmdown_start:
        return 1.0
    progress = (step - warmdown_start) / max(1, steps - warmdown_start)
    return 1.0 - progress * (1.0 - args.final_lr_frac)


def muon_momentum(step, steps, args):
    """0.85 -> 0.97 over the first 400 steps (early gradients are noisy, later ones need memory),
    then back down to 0.90 over the warmdown (a shorter memory anneals faster)."""
    m = 0.85 + 0.12 * min(1.0, step / 400)
    warmdown_start = steps * (1 - args.warmdown_ratio)
    if step > warmdown_start:
        m -= 0.07 * (step - warmdown_start) / max(1, steps - warmdown_start)
    return m


def train(args, stop_signal):
    check_flags(args)
    is_ddp, rank, local_rank, world, device = compute_init(args.device_type)
    use_compile = device.type == "cuda" if args.compile is None else bool(args.compile)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    tokenizer = get_tokenizer()
    config = GPTConfig.from_depth(args.depth, vocab_size=tokenizer.vocab_size, sequence_len=args.max_seq_len,
                                  head_dim=args.head_dim, window_pattern=args.window_pattern)
    model = build_model(config, device)
    if args.fp8:
        from nanochat.fp8 import convert_to_float8
        convert_to_float8(model.blocks)  # the head stays bf16: its softcapped logits are precision-sensitive
    flops_per_token = model.estimate_flops()
    T = args.max_seq_len
    B_dev = probe_device_batch(model, T, device, world) if args.device_batch_size == "auto" \
        else int(args.device_batch_size)
    save_minutes = args.save_every_minutes if args.save_every_minutes >= 0 else (30 if device.type == "cuda" else 0)
    B, num_iterations, weight_decay, horizon_params = plan(args, config, flops_per_token, B_dev * T * world)
    accum = B // (B_dev * T * world)
    optimizer = model.setup_optimizer(total_batch_size=B, weight_decay=weight_decay, matrix_lr=args.matrix_lr)
    step_model = torch.compile(model) if use_compile else model
    peak = get_peak_flops(device)
    eval_mode = nullcontext
    if args.fp8:
        from nanochat.fp8 import disable_fp8
        eval_mode = lambda: disable_fp8(model)  # noqa: E731 (evaluation runs in bf16)

    # Data: each rank runs `accum` micro-streams, stream (rank, a) being loader rank*accum + a of
    # world*accum. The global batch is then the same for any split of world × accum: 8 GPUs with
    # accum 1 see exactly the batches of 1 GPU with accum 8.
    loaders = [DataLoader(tokenizer, B_dev, T, "train", device, rank=rank * accum + a, world_size=world * accum)
               for a in range(accum)]

    run_dir = get_run_dir(args.model_tag or f"d{args.depth}")
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    step, elapsed, smooth_loss = 0, 0.0, 0.0
    if args.resume and list_steps(run_dir):
        meta = load_meta(run_dir)
        if meta["model_config"] != dataclasses.asdict(config):
            raise ValueError(f"--resume: the checkpoint in {run_dir} is a different model "
                             f"({meta['model_config']}); use the same --depth and model flags or another --model-tag")
        step = meta["step"]
        model.load_state_dict(load_weights(run_dir, step, device))
        optimizer_state, streams = load_training_state(run_dir, step)
        if len(streams) != world * accum:
            raise ValueError(f"--resume: {step_dir(run_dir, step)} has {len(streams)} data streams (processes × "
                             f"micro-steps) but this run has {world} × {accum}: keep --total-batch-size and "
                             f"--device-batch-size, so that processes × gradient accumulation stays {len(streams)}")
        flags_hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        optimizer.load_full_state_dict(optimizer_state)  # moments; hyperparameters come from this run's flags
        for group, hyper in zip(optimizer.param_groups, flags_hyper):
            group.update(hyper)
        for a, loader in enumerate(loaders):
            loader.load_state_dict(streams[rank * accum + a])
        elapsed, smooth_loss = meta["loop"]["elapsed"], meta["loop"]["smooth_loss"]
        if rank == 0 and os.path.exists(metrics_path):  # drop what the stopped run logged after this checkpoint
            with open(metrics_path) as f:  # (a kill mid-write can leave a torn last line: dropped too)
                keep = [line for line in f if line.endswith("\n") and json.loads(line)["step"] <= step]
            with atomic_write(metrics_path) as tmp, open(tmp, "w") as f:
                f.writelines(keep)
        print0(f"resumed from {step_dir(run_dir, step)}")
        if step == num_iterations:
            print0(f"training already complete ({step} steps in {run_dir})")
            compute_cleanup()
            return {"val_bpb": None, "steps": num_iterations}
    elif args.resume:
        print0(f"--resume: no checkpoint in {run_dir} yet, starting from scratch")
    resume_step = step

    train_config = {
        "args": vars(args), "model_config": dataclasses.asdict(config), "num_params": model.num_params(),
        "flops_per_token": flops_per_token, "total_batch_size": B, "num_iterations": num_iterations,
        "grad_accum_steps": accum, "weight_decay": weight_decay, "horizon_params": horizon_params,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "world_size": world, "dtype": str(model.wte.weight.dtype).replace("torch.", ""),
    }
    wandb_run = None
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        with atomic_write(os.path.join(run_dir, "config.json")) as tmp, open(tmp, "w") as f:
            json.dump(train_config, f, indent=2)
        if args.run:
            import wandb
            wandb_run = wandb.init(project="nanochat", name=args.run, config=train_config, dir=run_dir)
    print0(f"model d{args.depth}: {config.n_embd} wide, {config.n_head} heads, {model.num_params()['total']:,} params, "
           f"{flops_per_token:.3e} FLOPs/token")
    print0(f"horizon: {num_iterations:,} steps × {B:,} tokens = {num_iterations * B:,} tokens "
           f"({num_iterations * B / horizon_params:.1f} per matrix+head param), {num_iterations * B * flops_per_token:.3e} FLOPs; "
           f"{world} process(es) × {accum} micro-steps of {B_dev}×{T}")

    last_save = time.time()

    def save():
        nonlocal last_save
        meta = {"model_config": dataclasses.asdict(config), "args": vars(args), "total_batch_size": B,
                "num_iterations": num_iterations, "world_size": world,
                "loop": {"elapsed": elapsed, "smooth_loss": smooth_loss}}
        save_checkpoint(run_dir, step, model, optimizer, meta, [loader.state_dict() for loader in loaders], rank=rank)
        last_save = time.time()

    def log(record):
        record = {"step": step, "elapsed": elapsed, "tokens": step * B, "flops": step * B * flops_per_token, **record}
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if wandb_run:
                wandb_run.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)

    bundle = get_eval_bundle_dir(args.eval_bundle)
    val_bpb, train_loss = None, 0.0
    while True:
        # all ranks agree on stopping (a signal may reach them a step apart), divergence, and when
        # a timed checkpoint is due (their clocks differ)
        timed_save = save_minutes > 0 and time.time() - last_save > 60 * save_minutes
        flags = torch.tensor([float(bool(stop_signal)), float(not math.isfinite(train_loss)), float(timed_save)],
                             device=device)
        if is_ddp:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[1]:  # the weights of step - 1 gave a non-finite loss: any checkpoint before them is good
            good = [s for s in list_steps(run_dir) if s < step - 1]
            raise RuntimeError(f"loss is not finite at step {step} (last loss {train_loss}): stopped. Last good "
                               f"checkpoint: {step_dir(run_dir, good[-1]) if good else 'none'}; resume from it "
                               f"with --resume, perhaps with a lower --matrix-lr")
        if flags[0]:
            if step != resume_step:
                save()
            print0(f"stopped by signal at step {step}; checkpoint in {step_dir(run_dir, step)}; "
                   f"continue with --resume")
            for loader in loaders:
                loader.close()
            compute_cleanup()
            return {"val_bpb": val_bpb, "steps": step}
        last = step == num_iterations
        fresh = step != resume_step or step == 0  # evals at the resume step already ran before the stop
        due = lambda every: every > 0 and (last or step % every == 0) and fresh  # noqa: E731
        if due(args.eval_every):
            model.eval()
            with eval_mode():
                val_bpb = evaluate_split_bpb(step_model, tokenizer, "val", args.eval_tokens, B_dev, T, device,
                                             rank, world)
            model.train()
            print0(f"step {step:05d} | val bpb {val_bpb:.4f}")
            log({"type": "val", "val_bpb": val_bpb})
        if due(args.core_every):
            if os.path.isdir(bundle):
                with eval_mode():
                    core = evaluate_core(model, tokenizer, bundle, device, max_per_task=args.core_max_per_task)
                print0(f"step {step:05d} | {core['core_label']}: {core['core']:.4f}")
                log({"type": "core", "core": core["core"], "core_label": core["core_label"],
                     "tasks": {k: v["centered"] for k, v in core["tasks"].items()}})
            else:
                print0(f"step {step:05d} | CORE skipped: no eval bundle at {bundle} (python -m scripts.base_eval downloads it)")
        if due(args.sample_every) and rank == 0:
            with eval_mode():
                samples = sample_texts(model, tokenizer, max_tokens=16, sampled=False)
            print0("\n".join(f"  {s!r}" for s in samples))
            log({"type": "sample", "samples": samples})
        if (last or flags[2] or (args.save_every > 0 and step % args.save_every == 0)) and step != resume_step:
            save()
        if last:
            break

        # one optimizer step (step -> step + 1): accum micro-steps of forward + backward, then the update
        sync()
        t0 = time.perf_counter()
        try:
            for a, loader in enumerate(loaders):
                x, y = next(loader)
                optimizer.sync_grads = a == accum - 1  # gradients cross ranks only after the last micro-step
                loss = step_model(x, y)
                (loss / accum).backward()
        except torch.cuda.OutOfMemoryError:
            raise RuntimeError(f"CUDA out of memory at --device-batch-size {B_dev}: try --device-batch-size "
                               f"{max(1, B_dev // 2)} (gradient accumulation keeps the total batch) or "
                               f"--device-batch-size auto") from None
        lrm = lr_multiplier(step, num_iterations, args)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"] = muon_momentum(step, num_iterations, args)
                group["weight_decay"] = weight_decay * 0.5 * (1 + math.cos(math.pi * step / num_iterations))
        optimizer.step()
        model.zero_grad(set_to_none=True)
        train_loss = loss.item()  # the last micro-step's loss, this rank (a sync point: fine once per step)
        sync()
        dt = time.perf_counter() - t0
        if step >= 10 or resume_step > 0:  # the first steps include compilation
            elapsed += dt
        smooth_loss = 0.9 * smooth_loss + 0.1 * train_loss
        debiased = smooth_loss / (1 - 0.9 ** (step + 1))
        tok_per_sec = B / dt
        util = mfu(tok_per_sec / world, flops_per_token, peak)
        step += 1
        eta = (num_iterations - step) * dt
        print0(f"step {step:05d}/{num_iterations:05d} ({100 * step / num_iterations:.1f}%) | loss {debiased:.4f} | "
               f"lrm {lrm:.2f} | dt {dt * 1e3:.0f}ms | tok/s {tok_per_sec:,.0f} | "
               f"mfu {'-' if util is None else f'{util:.1%}'} | elapsed {elapsed / 60:.1f}m | eta {eta / 60:.1f}m")
        log({"type": "train", "loss": debiased, "raw_loss": train_loss, "lr_mult": lrm, "dt": dt,
             "tok_per_sec": tok_per_sec, "mfu": util})

    print0(f"done: {num_iterations} steps, {elapsed / 60:.1f} min of training, final val bpb {val_bpb}")
    log({"type": "final", "val_bpb": val_bpb, "total_tokens": step * B, "total_flops": step * B * flops_per_token})
    for loader in loaders:
        loader.close()
    if wandb_run:
        wandb_run.finish()
    compute_cleanup()
    return {"val_bpb": val_bpb, "steps": num_iterations}


def main(argv=None):
    # SIGTERM (preemption, torchrun shutting down) or Ctrl-C: finish the step, checkpoint, exit cleanly
    stop_signal = []
    previous = {sig: signal.signal(sig, lambda signum, frame: stop_signal.append(signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return train(parse_args(argv), stop_signal)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    main()
