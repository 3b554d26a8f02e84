"""
Pretrain the base model.

    python -m scripts.base_train --depth 12                                  # one GPU or CPU
    torchrun --standalone --nproc_per_node=8 -m scripts.base_train --depth 24 --target-param-data-ratio 8 --fp8

--depth sets the model and, through it, every default: the training horizon (tokens =
ratio × (matrix + lm_head params)), the total batch size, the learning rates and the weight
decay. Each rank processes --device-batch-size × --max-seq-len tokens per micro-step and
accumulates gradients up to the total batch. Metrics go to <run dir>/metrics.jsonl (and
wandb with --run); checkpoints to <run dir>/step_NNNNNN; --resume continues exactly.
"""
import argparse
import os
import shlex
import signal
import sys
import time
from contextlib import nullcontext

import torch

from nanochat import cli
from nanochat.cli import DEVICE_TYPES, ArgumentParser, Unavailable, check, every, flag_error
from nanochat.checkpoint import get_run_dir, list_steps, own_run, step_dir
from nanochat.common import compute_cleanup, compute_init, get_peak_flops, mfu, print0
from nanochat.core_eval import evaluate_core, get_eval_bundle_dir
from nanochat.dataloader import StepLoader
from nanochat.engine import sample_texts
from nanochat.gpt import build_model, compile_model
from nanochat.loss_eval import evaluate_split
from nanochat.estimate import check_fits
from nanochat.optim import build_optimizer
from nanochat.recipe import DEPTH, add_flags, flag_problems, from_flags
from nanochat.run import (Run, agree, claim_run_dir, log, probe_device_batch, resume, save, save_every_minutes,
                          start_logging)
from nanochat.tokenizer import get_tokenizer

# -----------------------------------------------------------------------------
# Flags: the run's shape (shared with scripts.plan), then evaluation, logging and checkpoints

def parse_args(argv=None):
    p = ArgumentParser("python -m scripts.base_train", __doc__)
    add_flags(p)  # model, horizon, batch, optimization: shared with scripts.plan
    # evaluation, logging, checkpoints (every N steps: 0 = off)
    p.add_argument("--eval-every", type=every, default=250, help="val bpb every N steps and at the end; 0: off")
    p.add_argument("--bpb-tokens", type=int, default=10 * 2 ** 19,
                   help="val tokens per periodic bpb evaluation (fewer than the final one: it runs often)")
    p.add_argument("--final-bpb-tokens", type=int, default=80 * 2 ** 19,
                   help="val tokens of the bpb evaluation at the end: the leaderboard's count, so that the final "
                        "val bpb compares with the record's")
    p.add_argument("--core-every", type=every, default=2000,
                   help="CORE (a subset, see --core-max-per-task) every N steps and at the end; 0: off")
    p.add_argument("--core-max-per-task", type=int, default=500,
                   help="CORE items per task during training (the first N of each task's fixed shuffle)")
    p.add_argument("--eval-bundle", default=None, help="CORE eval bundle dir (default: <base dir>/eval_bundle)")
    p.add_argument("--sample-every", type=every, default=2000, help="print greedy samples every N steps and at the end; 0: off")
    p.add_argument("--save-every", type=every, default=0, help="checkpoint every N steps (always at the end); 0: off")
    p.add_argument("--save-every-minutes", type=float, default=None,
                   help="checkpoint every N minutes of wall time, so a crash costs at most that much "
                        "(default: auto: 30 on CUDA, where a save of a big model takes seconds to a minute; "
                        "10 on CPU/MPS, where runs are small and saves cheap; 0: off)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the model's init and of the order the training streams read their row groups in "
                        "(which documents are train or val does not change); repeat a run over seeds to measure "
                        "its noise (default: the record's: init seed 42, row groups in file order)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint of the run dir (or start it, if it has none)")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a run dir that holds another run: it is moved aside to <tag>.old-<time>")
    p.add_argument("--model-tag", default=None, help="run dir name under base_checkpoints/ (default: d<depth>)")
    p.add_argument("--run-dir", default=None, metavar="DIR",
                   help="the run dir itself, anywhere, instead of a --model-tag (scripts.sweep puts its runs under sweeps/)")
    p.add_argument("--run", default=None, help="wandb run name (default: no wandb; WANDB_MODE=offline works)")
    p.add_argument("--device-type", default=None, choices=DEVICE_TYPES, help="default: autodetect")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on with CUDA, off elsewhere)")
    p.add_argument("--regional-compile", action="store_true",
                   help="with compilation: each block compiled on its own, the rest eager, instead of the whole "
                        "model (a faster cold start; gradient reductions overlap backward)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the GPU's dense bf16 peak, for MFU (default: the table's for known GPUs; NANOCHAT_PEAK_TFLOPS)")
    p.add_argument("--skip-memory-check", action="store_true",
                   help="start even if the memory estimate says the run does not fit the GPU (or the RAM)")
    args = p.parse_args(argv)
    check(p, flag_problems(args) + [
        (args.bpb_tokens < 1, f"--bpb-tokens {args.bpb_tokens}: must be >= 1 (--eval-every 0 turns bpb off)"),
        (args.final_bpb_tokens < 1,
         f"--final-bpb-tokens {args.final_bpb_tokens}: must be >= 1 (--eval-every 0 turns bpb off)"),
        (args.core_max_per_task < 1,
         f"--core-max-per-task {args.core_max_per_task}: must be >= 1 (--core-every 0 turns CORE off)"),
        (args.model_tag is not None and ("/" in args.model_tag or args.model_tag.startswith(".")),
         f"--model-tag {args.model_tag!r}: a plain directory name, not a path"),
        (args.model_tag is not None and args.run_dir is not None, "--model-tag and --run-dir: give one"),
        (args.overwrite and args.resume, "--overwrite and --resume: give one (start afresh, or continue)"),
        (args.save_every_minutes is not None and args.save_every_minutes < 0,
         f"--save-every-minutes {args.save_every_minutes}: must be >= 0 (0: off; leave the flag out for auto)"),
        (args.peak_tflops is not None and args.peak_tflops <= 0, f"--peak-tflops {args.peak_tflops}: must be > 0"),
    ])
    return args


def run_tag(args):
    return args.model_tag or f"d{args.depth or DEPTH}"


def recipe_from_flags(args, vocab_size, world, device_batch_size=None):
    """The run's recipe from the flags; a batch the processes cannot split is a flag error (one line)."""
    try:
        return from_flags(args, vocab_size, world, device_batch_size)
    except ValueError as e:
        flag_error("python -m scripts.base_train", str(e))


# -----------------------------------------------------------------------------
# Flags -> recipe -> model -> optimizer -> data

def build(args, rank, world, device):
    """Everything training reads, from the flags. Writes nothing: a bad flag leaves no trace."""
    tokenizer = get_tokenizer()
    auto_batch = args.device_batch_size == "auto"
    recipe = recipe_from_flags(args, tokenizer.vocab_size, world, 1 if auto_batch else None)
    T = recipe.config.sequence_len
    if not args.skip_memory_check:  # before allocating: a run too big for the device is refused, named
        check_fits(recipe.config, recipe.device_batch_size, world, device)
    if args.seed is not None:
        torch.manual_seed(args.seed)  # compute_init seeded 42: the record's init
    model = build_model(recipe.config, device)
    use_compile = device.type == "cuda" if args.compile is None else bool(args.compile)
    if auto_batch:  # the batch depends on the model's memory: probe, then re-derive (at most one micro-step)
        fits = probe_device_batch(model, T, device, world, compiled=use_compile)
        recipe = recipe_from_flags(args, tokenizer.vocab_size, world,
                                   min(fits, max(1, recipe.total_batch_size // (T * world))))
    eval_mode = nullcontext
    if args.fp8:
        from nanochat.fp8 import convert_to_float8, disable_fp8
        convert_to_float8(model)  # the blocks' matmuls and lm_head, as the record; softcap and loss stay fp32
        eval_mode = lambda: disable_fp8(model)  # noqa: E731 (evaluation runs in bf16)
    optimizer = build_optimizer(model, recipe.param_groups)
    step_model = compile_model(model, args.regional_compile) if use_compile else model
    loader = StepLoader(tokenizer, recipe.device_batch_size, T, "train", device, rank, world, recipe.grad_accum_steps,
                        args.seed)
    return Run(args, recipe, model, step_model, optimizer, loader, tokenizer, device, rank, world,
               args.run_dir or get_run_dir(run_tag(args)), eval_mode)


# -----------------------------------------------------------------------------
# Evaluation, the training step, the loop

def evaluate(run, last, should_stop):
    """Val bpb, CORE and samples, each every N steps and at the end (not again at the step a run
    resumed from, if they ran before it stopped). CORE and samples skip step 0: a random model scores
    chance and babbles, so they would only cost time; val bpb at step 0 is the baseline curve's start.
    Each gives up at a stop request (should_stop, checked between batches / items / prompts) and is
    then not logged. Returns whether any ran."""
    args, model, step = run.args, run.model, run.step
    done = step == run.resume_step and run.resume_evaluated
    due = lambda every: every > 0 and (last or step % every == 0) and not done  # noqa: E731
    later = step > 0 or last  # CORE and samples: not on the untrained model
    ran = due(args.eval_every) or (later and (due(args.core_every) or due(args.sample_every)))
    if due(args.eval_every):
        model.eval()
        with run.eval_mode():
            tokens = args.final_bpb_tokens if last else args.bpb_tokens
            bpb, scored = evaluate_split(run.step_model, run.tokenizer, "val", tokens, run.recipe.device_batch_size,
                                         run.recipe.config.sequence_len, run.device,
                                         run.rank, run.world, should_stop=should_stop)
        model.train()
        if bpb is None:
            return ran
        run.val_bpb, run.val_tokens = bpb, scored
        print0(f"step {step:05d} | val bpb {run.val_bpb:.4f} ({scored:,} tokens)")
        log(run, {"type": "val", "val_bpb": run.val_bpb, "tokens_scored": scored})
    if due(args.core_every) and later:
        bundle = get_eval_bundle_dir(args.eval_bundle)
        if os.path.isdir(bundle):
            with run.eval_mode():
                core = evaluate_core(model, run.tokenizer, bundle, run.device, max_per_task=args.core_max_per_task,
                                     should_stop=should_stop)
            if core is None:
                return ran
            print0(f"step {step:05d} | {core['core_label']}: {core['core']:.4f}")
            log(run, {"type": "core", "core": core["core"], "core_label": core["core_label"], "rules": core["rules"],
                      "max_per_task": core["max_per_task"], "tasks": {k: v["centered"] for k, v in core["tasks"].items()}})
        else:
            print0(f"step {step:05d} | CORE skipped: no eval bundle at {bundle} (python -m scripts.base_eval downloads it)")
    if due(args.sample_every) and later:
        # Every rank samples (the same greedy texts), rank 0 prints them: no rank waits at a collective
        # meanwhile, where a slow sample could run into the process group's timeout.
        with run.eval_mode():
            samples = sample_texts(model, run.tokenizer, max_tokens=16, sampled=False, should_stop=should_stop)
        if samples is None:
            return ran
        print0("\n".join(f"  {s!r}" for s in samples))  # print0 and log: rank 0 only
        log(run, {"type": "sample", "samples": samples})
    run.evaluated = True
    return ran


def train_step(run):
    """One optimizer step (step -> step + 1): accum micro-steps of forward + backward, then the
    update with this step's schedule. Returns (loss of the last micro-step, LR multiplier)."""
    accum, optimizer = run.recipe.grad_accum_steps, run.optimizer
    try:
        for a, (x, y) in enumerate(next(run.loader)):  # x, y: (device batch, T) token ids
            optimizer.sync_grads = a == accum - 1  # gradients cross ranks only after the last micro-step
            loss = run.step_model(x, y)
            (loss / accum).backward()
    except torch.cuda.OutOfMemoryError:
        b = run.recipe.device_batch_size
        raise Unavailable(f"CUDA out of memory at --device-batch-size {b}: try --device-batch-size "
                          f"{max(1, b // 2)} (gradient accumulation keeps the total batch) or "
                          f"--device-batch-size auto") from None
    sched = run.recipe.schedule(run.step)
    optimizer.set_schedule(sched.lr_multiplier, sched.momentum, sched.muon_weight_decay)
    optimizer.step()
    run.model.zero_grad(set_to_none=True)
    return loss.item(), sched.lr_multiplier  # .item() syncs: fine once per step


def train_loop(run, stop_signal):
    """Evaluate, checkpoint and train until the horizon or a stop signal. Returns the signal's
    number (0: the run reached its horizon)."""
    r, sync = run.recipe, torch.cuda.synchronize if run.device.type == "cuda" else (lambda: None)
    save_minutes, train_loss = save_every_minutes(run.args.save_every_minutes, run.device), 0.0
    while True:
        # Agree before acting: a signal or a clock may reach the ranks a step apart.
        stop, diverged, timed_save = agree(run, stop_signal, train_loss, save_minutes)
        # Divergence: stop at once rather than burn GPU hours on NaNs; the weights of step - 1 gave
        # the bad loss, so any checkpoint before them is good.
        if diverged:
            good = [s for s in list_steps(run.run_dir) if s < run.step - 1]
            raise RuntimeError(f"loss is not finite at step {run.step} (last loss {train_loss}): stopped. Last good "
                               f"checkpoint: {step_dir(run.run_dir, good[-1]) if good else 'none'}; resume from it "
                               f"with --resume, perhaps with a lower --matrix-lr")
        # Evaluate: costs steps, so only every N steps and at the end. A stop request cuts it
        # short (a preemption notice gives a minute or two; an eval can take many): agree again.
        last = run.step == r.num_iterations
        if not stop and evaluate(run, last, should_stop=lambda: bool(stop_signal)):
            stop, _, _ = agree(run, stop_signal, train_loss, 0)
        # Stop signal: checkpoint this step (the step in flight is finished); the caller exits
        # non-zero, so that a script running this stops too.
        if stop:
            if run.step != run.resume_step:
                save(run)
            print0(f"stopped by signal {stop} at step {run.step}; checkpoint in {step_dir(run.run_dir, run.step)}; "
                   f"continue with --resume")
            return stop
        # Checkpoint: at the end, every --save-every steps, every --save-every-minutes (a crash
        # then costs at most that much); each save is a full gather of the optimizer state. The
        # step resumed from is saved again only if its evaluations have now run.
        if (last or timed_save or (run.args.save_every > 0 and run.step % run.args.save_every == 0)) \
                and (run.step != run.resume_step or not run.resume_evaluated):
            save(run)
        if last:
            break
        # Train: one optimizer step, timed between syncs (asynchronous CUDA would otherwise lie).
        sync()
        t0 = time.perf_counter()
        train_loss, lrm = train_step(run)
        sync()
        report_step(run, train_loss, lrm, time.perf_counter() - t0)
    print0(f"done: {r.num_iterations} steps, {run.elapsed / 60:.1f} min of training, final val bpb {run.val_bpb}")
    log(run, {"type": "final", "val_bpb": run.val_bpb, "tokens_scored": run.val_tokens,
              "total_tokens": run.step * r.total_batch_size,
              "total_flops": run.step * r.total_batch_size * r.flops_per_token})
    return 0


def report_step(run, train_loss, lrm, dt):
    """Count the step and show it. The first 10 steps include compilation, so they do not count
    as training time; the loss shown is an EMA (one micro-batch is noisy), debiased for its zero start."""
    r = run.recipe
    if run.step >= 10 or run.resume_step > 0:
        run.elapsed += dt
    run.smooth_loss = 0.9 * run.smooth_loss + 0.1 * train_loss
    debiased = run.smooth_loss / (1 - 0.9 ** (run.step + 1))
    tok_per_sec = r.total_batch_size / dt
    util = mfu(tok_per_sec / run.world, r.flops_per_token, get_peak_flops(run.device, run.args.peak_tflops))
    run.step += 1
    run.evaluated = False
    print0(f"step {run.step:05d}/{r.num_iterations:05d} ({100 * run.step / r.num_iterations:.1f}%) | "
           f"loss {debiased:.4f} | lrm {lrm:.2f} | dt {dt * 1e3:.0f}ms | tok/s {tok_per_sec:,.0f} | "
           f"mfu {'n/a' if util is None else f'{util:.1%}'} | elapsed {run.elapsed / 60:.1f}m | "
           f"eta {(r.num_iterations - run.step) * dt / 60:.1f}m")
    log(run, {"type": "train", "loss": debiased, "raw_loss": train_loss, "lr_mult": lrm, "dt": dt,
              "tok_per_sec": tok_per_sec, "mfu": util})


def train(args, stop_signal, command):
    """recipe -> model -> resume -> loop; one exit path, which always cleans up."""
    _, rank, _, world, device = compute_init(args.device_type)
    run = lock = None
    try:
        run = build(args, rank, world, device)  # writes nothing: a bad flag leaves no trace
        lock = own_run(run.run_dir, rank)  # one job per run dir, until this one exits
        claim_run_dir(run.run_dir, args.resume, args.overwrite, rank)
        if args.resume:
            resume(run)
        if run.step == run.recipe.num_iterations and run.step == run.resume_step > 0 and run.resume_evaluated:
            print0(f"training already complete ({run.step} steps in {run.run_dir})")
            return {"val_bpb": None, "steps": run.step, "signal": 0}
        start_logging(run, command)
        stopped_by = train_loop(run, stop_signal)
        return {"val_bpb": run.val_bpb, "steps": run.step, "signal": stopped_by}
    finally:
        if run is not None:
            run.loader.close()
            if run.wandb_run:
                run.wandb_run.finish()
        if lock is not None:
            lock.close()  # releases the run for the next job
        compute_cleanup()


def main(argv=None):
    # SIGTERM (preemption, torchrun shutting down) or Ctrl-C: finish the step (or give up an
    # evaluation), checkpoint, clean up, then exit 128 + the signal's number (143, 130) as shells
    # do: a stopped run is not a finished one, and a script running it (speedrun.sh) must stop.
    stop_signal = []
    previous = {sig: signal.signal(sig, lambda signum, frame: stop_signal.append(signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        command = shlex.join(["python", "-m", "scripts.base_train", *(sys.argv[1:] if argv is None else argv)])
        result = train(parse_args(argv), stop_signal, command)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if result["signal"]:
        raise SystemExit(128 + result["signal"])
    return result


if __name__ == "__main__":
    sys.exit(cli.run(main))
