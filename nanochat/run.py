"""
The bookkeeping of a training run, kept out of the training's way (scripts/base_train.py): the
run's state, where it lives and that it is claimed, how it resumes, what it writes (config.json,
metrics.jsonl, checkpoints, wandb), how its processes agree when to stop or save, and the
probe that picks a device batch.
"""
import argparse
import json
import math
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from nanochat.attention import describe_backend
from nanochat.checkpoint import check_tokenizer, list_steps, load_checkpoint, load_meta, save_checkpoint, step_dir
from nanochat.cli import BadInput, Unavailable
from nanochat.common import any_rank, atomic_write, print0, unknown_peak_note
from nanochat.shards import get_data_dir, read_manifest


@dataclass
class Run:
    """Everything the training loop reads, and the loop state that a checkpoint keeps."""
    args: argparse.Namespace
    recipe: object
    model: torch.nn.Module
    step_model: torch.nn.Module  # compiled (CUDA) or the model itself
    optimizer: object
    loader: object  # this rank's data streams (StepLoader)
    tokenizer: object
    device: torch.device
    rank: int
    world: int
    run_dir: str
    eval_mode: object = nullcontext  # evaluation runs in bf16 even in an fp8 run
    wandb_run: object = None
    step: int = 0
    resume_step: int = 0
    resume_evaluated: bool = False  # the checkpoint resumed from had run its step's evaluations
    evaluated: bool = False  # this step's evaluations ran to the end (a stop request cuts them short)
    elapsed: float = 0.0  # seconds of training steps (compilation excluded)
    smooth_loss: float = 0.0
    val_bpb: float = None
    val_tokens: int = None  # scored by the newest val bpb evaluation
    last_save: float = field(default_factory=time.time)

    @property
    def metrics_path(self):
        return os.path.join(self.run_dir, "metrics.jsonl")


def probe_device_batch(model, seq_len, device, world, compiled=False):
    """The largest power-of-two device batch whose forward + backward, plus the optimizer state
    still to be allocated (~8 bytes per parameter, sharded), fits in 90% of the GPU's memory.
    compiled: probe the model as training will run it (torch.compile saves less for backward than
    eager: the eager model would pick too small a batch). One dynamic-shape compile serves every
    probed batch; it is dropped afterwards, so training compiles its own static graph."""
    if device.type != "cuda":
        return 16  # no out-of-memory to probe for: the CPU default
    forward = torch.compile(model, dynamic=True) if compiled else model
    total = torch.cuda.get_device_properties(device).total_memory
    optimizer_bytes = 8 * sum(p.numel() for p in model.parameters()) / world
    best = 0
    for b in (1, 2, 4, 8, 16, 32, 64):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            x = torch.randint(0, model.config.vocab_size, (b, seq_len), device=device)
            forward(x, x).backward()
            fits = torch.cuda.max_memory_allocated(device) + optimizer_bytes <= 0.9 * total
        except torch.cuda.OutOfMemoryError:
            fits = False
        model.zero_grad(set_to_none=True)
        if not fits:
            break
        best = b
    if compiled:
        torch._dynamo.reset()
    torch.cuda.empty_cache()
    if dist.is_initialized():  # every rank must run the same batch
        agreed = torch.tensor(best, device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        best = int(agreed)
    if best == 0:
        raise Unavailable("--device-batch-size auto: not even 1 sequence fits in GPU memory; "
                          "use a smaller --depth or --max-seq-len")
    print0(f"--device-batch-size auto: {best} (largest power of two that fits)")
    return best


def claim_run_dir(run_dir, resume, overwrite, rank):
    """A run without --resume must not land in a dir holding another run: that run's newer
    checkpoints would outrank (and its rotation delete) the new ones, and metrics.jsonl would mix
    both. Refused, or with --overwrite the old run is moved aside (never deleted)."""
    taken = os.path.isdir(run_dir) and bool(list_steps(run_dir) or any(
        os.path.exists(os.path.join(run_dir, name)) for name in ("metrics.jsonl", "config.json")))
    if taken and not (resume or overwrite):
        raise BadInput(f"{run_dir} holds another run: continue it with --resume, start this one under another "
                       f"--model-tag, or move the old one aside with --overwrite")
    if dist.is_initialized():  # every rank has looked before rank 0 moves it
        dist.barrier()
    if taken and overwrite and rank == 0:
        aside = f"{run_dir}.old-{time.strftime('%Y%m%d-%H%M%S')}"
        os.rename(run_dir, aside)
        print0(f"--overwrite: moved the old run to {aside}")
    if dist.is_initialized():
        dist.barrier()


def resume(run):
    """--resume: load the newest checkpoint (weights, optimizer, data streams, loop state) and drop
    what the stopped run logged after it, whatever it was (no checkpoint yet: everything; a kill
    mid-write can leave a torn last line: dropped too). The horizon must be the checkpoint's: the
    LR schedule was laid out for it, and a shorter one would run past its end."""
    meta = load_meta(run.run_dir) if list_steps(run.run_dir) else None
    if meta is None:
        print0(f"--resume: no checkpoint in {run.run_dir} yet, starting from scratch")
    else:
        check_tokenizer(run.run_dir, run.tokenizer, meta)  # a retrained tokenizer would silently remap every token
        meta = load_checkpoint(run.run_dir, run.model, run.optimizer, run.loader.streams, rank=run.rank,
                               step=meta["step"])
        if meta.get("num_iterations", run.recipe.num_iterations) != run.recipe.num_iterations:
            raise BadInput(f"--resume: {step_dir(run.run_dir, meta['step'])} is from a run of "
                           f"{meta['num_iterations']} steps, these flags give {run.recipe.num_iterations}: resume "
                           f"with the run's flags, or start a new run under another --model-tag")
        run.step = run.resume_step = meta["step"]
        run.elapsed, run.smooth_loss = meta["loop"]["elapsed"], meta["loop"]["smooth_loss"]
        run.resume_evaluated = meta["loop"]["evaluated"]
        print0(f"resumed from {step_dir(run.run_dir, run.step)}")
    if run.rank == 0 and os.path.exists(run.metrics_path):
        def kept(record):  # what led up to the checkpoint, and its step's evaluations unless they run again
            return record["step"] < run.step or (record["step"] == run.step and
                                                 (record["type"] == "train" or run.resume_evaluated))
        with open(run.metrics_path) as f:
            keep = [line for line in f if line.endswith("\n") and kept(json.loads(line))]
        with atomic_write(run.metrics_path) as tmp, open(tmp, "w") as f:
            f.writelines(keep)


def start_logging(run, command):
    """config.json (the derived recipe, the flags, the command, the machine) and wandb; a summary for people."""
    r, config = run.recipe, run.recipe.config
    train_config = {**r.to_json(), "args": vars(run.args), "world_size": run.world, "command": command,
                    "attention_backend": describe_backend(), "tokenizer": run.tokenizer.fingerprint(),
                    "val_data": (read_manifest(get_data_dir()) or {}).get("source"),
                    "device_name": torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else run.device.type,
                    "dtype": str(run.model.wte.weight.dtype).replace("torch.", "")}
    if run.rank == 0:
        os.makedirs(run.run_dir, exist_ok=True)
        with atomic_write(os.path.join(run.run_dir, "config.json")) as tmp, open(tmp, "w") as f:
            json.dump(train_config, f, indent=2)
        if run.args.run:
            import wandb
            run.wandb_run = wandb.init(project="nanochat", name=run.args.run, config=train_config, dir=run.run_dir)
    print0(f"model d{config.n_layer}: {config.n_embd} wide, {config.n_head} heads, {r.num_params['total']:,} params, "
           f"{r.flops_per_token:.3e} FLOPs/token")
    if unknown_peak_note(run.device, run.args.peak_tflops):
        print0(unknown_peak_note(run.device, run.args.peak_tflops))
    print0(f"horizon: {r.num_iterations:,} steps × {r.total_batch_size:,} tokens = {r.tokens:,} tokens "
           f"({r.tokens / r.horizon_params:.1f} per matrix+head param), {r.tokens * r.flops_per_token:.3e} FLOPs; "
           f"{run.world} process(es) × {r.grad_accum_steps} micro-steps of {r.device_batch_size}×{config.sequence_len}; "
           f"Muon weight decay {r.muon_weight_decay:.4g}")


def save(run):
    meta = {"model_config": asdict(run.recipe.config), "args": vars(run.args),
            "total_batch_size": run.recipe.total_batch_size, "num_iterations": run.recipe.num_iterations,
            "world_size": run.world, "tokenizer": run.tokenizer.fingerprint(),
            "loop": {"elapsed": run.elapsed, "smooth_loss": run.smooth_loss, "evaluated": run.evaluated}}
    save_checkpoint(run.run_dir, run.step, run.model, run.optimizer, meta, run.loader.state_dict(), rank=run.rank)
    run.last_save = time.time()


def log(run, record):
    tokens = run.step * run.recipe.total_batch_size  # the total batch counts tokens, not rows
    record = {"step": run.step, "elapsed": run.elapsed, "tokens": tokens, "flops": tokens * run.recipe.flops_per_token,
              **record}
    if run.rank == 0:
        with open(run.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if run.wandb_run:
            run.wandb_run.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=run.step)


def save_every_minutes(minutes, device):
    """The --save-every-minutes in effect: the flag's value, or its device default: 30 on CUDA, where a
    save of a big model takes seconds to a minute; 10 on CPU/MPS, where runs are small and saves cheap."""
    if minutes is None:  # auto
        return 30 if device.type == "cuda" else 10
    return minutes


def agree(run, stop_signal, train_loss, save_minutes):
    """(stop signal number or 0, diverged, timed save), the same on every rank: a signal may reach
    the ranks a step apart and their clocks differ, so all three are agreed (one tiny collective
    per step buys lockstep; SIGTERM wins over SIGINT)."""
    timed_save = save_minutes > 0 and time.time() - run.last_save > 60 * save_minutes
    term, interrupt, diverged, timed_save = any_rank(
        (signal.SIGTERM in stop_signal, signal.SIGINT in stop_signal, not math.isfinite(train_loss), timed_save),
        run.device)
    return int(signal.SIGTERM) if term else int(signal.SIGINT) if interrupt else 0, diverged, timed_save
