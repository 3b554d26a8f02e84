"""
Checkpoints: one directory per step, written completely or not at all.

    base_checkpoints/<tag>/step_000500/
        model.pt        the weights (rank 0)
        rank0.pt ...    each rank's optimizer shard, dataloader state and RNG state
        meta.json       step, model config, training args, loop state (human-readable)

Every rank writes into step_000500.tmp/; once all have finished, rank 0 renames the
directory. A crash at any moment therefore leaves either a complete checkpoint or a
.tmp directory that is ignored, and never damages an earlier checkpoint.
"""
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


def list_steps(run_dir):
    """Steps with a complete checkpoint, oldest first."""
    names = os.listdir(run_dir) if os.path.isdir(run_dir) else []
    return sorted(int(m.group(1)) for n in names if (m := re.fullmatch(r"step_(\d+)", n)))


def step_dir(run_dir, step):
    return os.path.join(run_dir, f"step_{step:06d}")


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(run_dir, step, model, optimizer, meta, rank_state, rank=0, keep=2):
    """Called by every rank. rank_state: this rank's dataloader state, RNG state, etc."""
    final = step_dir(run_dir, step)
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crash during an earlier save
        os.makedirs(tmp)
    _barrier()
    if rank == 0:
        torch.save(model.state_dict(), os.path.join(tmp, "model.pt"))
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"step": step, **meta}, f, indent=2)
    torch.save({"optimizer": optimizer.state_dict() if optimizer else None, **rank_state},
               os.path.join(tmp, f"rank{rank}.pt"))
    _barrier()
    if rank == 0:
        if os.path.exists(final):  # re-saving a step (e.g. the final step after a resume)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_steps(run_dir)[:-keep] if keep else []:
            shutil.rmtree(step_dir(run_dir, old), ignore_errors=True)
    _barrier()
    return final


def load_meta(run_dir, step=None):
    steps = list_steps(run_dir)
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {run_dir}: train one with python -m scripts.base_train")
    step = steps[-1] if step is None else step
    path = os.path.join(step_dir(run_dir, step), "meta.json")
    with open(path) as f:
        return json.load(f)


def load_model(run_dir, device, step=None):
    """(model, meta) from the newest (or the given) checkpoint of a run."""
    meta = load_meta(run_dir, step)
    model = build_model(GPTConfig(**meta["model_config"]), device)
    path = os.path.join(step_dir(run_dir, meta["step"]), "model.pt")
    model.load_state_dict(torch.load(path, map_location=device, weights_only=True))
    return model, meta


def load_rank_state(run_dir, step, rank):
    path = os.path.join(step_dir(run_dir, step), f"rank{rank}.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: resume with the same number of processes as the checkpoint")
    return torch.load(path, map_location="cpu", weights_only=False)


def save_json(path, data):
    """Small results files (eval scores, tokenizer stats) written atomically."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_write(path) as tmp, open(tmp, "w") as f:
        json.dump(data, f, indent=2)
