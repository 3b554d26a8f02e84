"""
Checkpoints: one directory per step, written completely or not at all, readable by any
number of processes.

    base_checkpoints/<tag>/step_000500/
        model.pt        the weights
        optimizer.pt    the optimizer state, gathered from all ranks' shards (MuonAdamW.full_state_dict)
        loaders.json    the state of every data stream (processes × micro-steps of them), in order
        meta.json       step, model config, training args, loop state (human-readable)

Rank 0 writes everything into step_000500.tmp/ and renames it when complete. A crash at any
moment therefore leaves either a complete checkpoint or a .tmp directory that is ignored,
and never damages an earlier checkpoint. Because nothing in it is per-rank, a run saved by 8
processes resumes on 1 (or 3) and vice versa; see docs/RELIABILITY.md for what stays exact.
"""
import dataclasses
import json
import os
import re
import shutil

import torch
import torch.distributed as dist

from nanochat.common import atomic_write, get_base_dir
from nanochat.gpt import GPTConfig, build_model


def get_run_dir(model_tag):
    return os.path.join(get_base_dir(), "base_checkpoints", model_tag)


def newest_model_tag(base_dir=None):
    """The most recently modified run under base_checkpoints/, or None if there is none."""
    root = os.path.join(base_dir or get_base_dir(), "base_checkpoints")
    tags = [t for t in os.listdir(root) if os.path.isdir(os.path.join(root, t))] if os.path.isdir(root) else []
    return max(tags, key=lambda t: os.path.getmtime(os.path.join(root, t)), default=None)


def list_steps(run_dir):
    """Steps with a complete checkpoint, oldest first."""
    names = os.listdir(run_dir) if os.path.isdir(run_dir) else []
    return sorted(int(m.group(1)) for n in names if (m := re.fullmatch(r"step_(\d+)", n)))


def step_dir(run_dir, step):
    return os.path.join(run_dir, f"step_{step:06d}")


def save_checkpoint(run_dir, step, model, optimizer, meta, loader_states, rank=0, keep=2):
    """Called by every rank: the optimizer shards and the ranks' data-stream states (a list per
    rank, rank-major = stream order) are gathered, then rank 0 writes. Keeps the newest `keep`."""
    optimizer_state = optimizer.full_state_dict() if optimizer is not None else None
    streams = loader_states
    if dist.is_initialized():
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, loader_states)
        streams = [state for states in per_rank for state in states]
    final = step_dir(run_dir, step)
    if rank == 0:
        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crash during an earlier save
        os.makedirs(tmp)
        torch.save(model.state_dict(), os.path.join(tmp, "model.pt"))
        torch.save(optimizer_state, os.path.join(tmp, "optimizer.pt"))
        for name, data in (("loaders.json", streams), ("meta.json", {"step": step, **meta})):
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(data, f)
        if os.path.exists(final):  # re-saving a step (e.g. the final step after a resume)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_steps(run_dir)[:-keep] if keep else []:
            shutil.rmtree(step_dir(run_dir, old), ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()  # nobody goes on (or reads it) before it is complete
    return final


def _damaged(path, e):
    # disk trouble, not a half-written save (those never get their final name): name the way back
    fix = f"delete {os.path.dirname(path)} to resume from the previous checkpoint"
    if isinstance(e, FileNotFoundError):
        return FileNotFoundError(f"{path} is missing: {fix}")
    return ValueError(f"{path} is truncated or corrupt ({type(e).__name__}): {fix}")


def _torch_load(path, **kwargs):
    try:
        return torch.load(path, **kwargs)
    except torch.OutOfMemoryError:
        raise  # the file is fine; the device is full
    except Exception as e:  # a damaged zip or pickle can fail in many ways, all meaning the same
        raise _damaged(path, e) from None


def load_meta(run_dir, step=None):
    steps = list_steps(run_dir)
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {run_dir}: train one with python -m scripts.base_train")
    step = steps[-1] if step is None else step
    return _json_load(os.path.join(step_dir(run_dir, step), "meta.json"))


def _json_load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bad UTF-8
        raise _damaged(path, e) from None


def load_weights(run_dir, step, device):
    return _torch_load(os.path.join(step_dir(run_dir, step), "model.pt"), map_location=device, weights_only=True)


def load_model(run_dir, device, step=None, vocab_size=None):
    """(model, meta) from the newest (or the given) checkpoint of a run. vocab_size: the tokenizer's,
    checked against the model's (a different tokenizer would silently give garbage)."""
    meta = load_meta(run_dir, step)
    trained = meta["model_config"]["vocab_size"]
    if vocab_size is not None and vocab_size != trained:
        from nanochat.tokenizer import get_tokenizer_dir
        raise ValueError(f"checkpoint {step_dir(run_dir, meta['step'])} was trained with a vocab of {trained} tokens "
                         f"but the tokenizer at {os.path.join(get_tokenizer_dir(), 'tokenizer.json')} has "
                         f"{vocab_size}: use the tokenizer the model was trained with")
    model = build_model(GPTConfig(**meta["model_config"]), device)
    model.load_state_dict(load_weights(run_dir, meta["step"], device))
    return model, meta


def load_training_state(run_dir, step):
    """(optimizer state, list of data-stream states) of a checkpoint, the same for any world size."""
    d = step_dir(run_dir, step)
    optimizer_state = _torch_load(os.path.join(d, "optimizer.pt"), map_location="cpu", weights_only=False)
    return optimizer_state, _json_load(os.path.join(d, "loaders.json"))


def load_checkpoint(run_dir, model, optimizer, loaders, rank=0, step=None):
    """The inverse of save_checkpoint, called by every rank: the newest (or the given) checkpoint of
    a run goes into the model, the optimizer (re-sharded for this world size) and this rank's data
    streams. The optimizer keeps its own hyperparameters (the schedule sets them). Returns meta."""
    meta = load_meta(run_dir, step)
    d = step_dir(run_dir, meta["step"])
    if meta["model_config"] != dataclasses.asdict(model.config):
        raise ValueError(f"--resume: the checkpoint in {run_dir} is a different model ({meta['model_config']}); "
                         f"use the same --depth and model flags or another --model-tag")
    optimizer_state, streams = load_training_state(run_dir, meta["step"])
    world = dist.get_world_size() if dist.is_initialized() else 1
    if len(streams) != world * len(loaders):
        raise ValueError(f"--resume: {d} has {len(streams)} data streams (processes × micro-steps) but this run "
                         f"has {world} × {len(loaders)}: keep --total-batch-size and --device-batch-size, so that "
                         f"processes × gradient accumulation stays {len(streams)}")
    model.load_state_dict(load_weights(run_dir, meta["step"], next(model.parameters()).device))
    optimizer.load_full_state_dict(optimizer_state)
    for a, loader in enumerate(loaders):  # rank-major: this rank's streams are rank*A ... rank*A + A-1
        loader.load_state_dict(streams[rank * len(loaders) + a])
    return meta


def save_json(path, data):
    """Small results files (eval scores, tokenizer stats) written atomically."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_write(path) as tmp, open(tmp, "w") as f:
        json.dump(data, f, indent=2)
