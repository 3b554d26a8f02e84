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
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import time
import warnings

import torch
import torch.distributed as dist

from nanochat.cli import BadInput, Missing, Unavailable
from nanochat.common import atomic_write, fsync_path, get_base_dir
from nanochat.gpt import GPTConfig, build_model


def get_run_dir(model_tag):
    return os.path.join(get_base_dir(), "base_checkpoints", model_tag)


def own_run(run_dir, rank=0):
    """Make this job the one owner of a run until its rank 0 exits, or refuse with one line naming
    the live owner. Two processes writing one run dir would replace each other's checkpoints and
    mix their metrics. The lock is an flock on <run_dir>.lock (beside the dir, so that --overwrite
    can move the dir aside under it): the kernel drops it when the process dies, however it dies,
    so a crashed run (kill -9 too) leaves nothing to clean up. Under torchrun rank 0 holds it and
    every rank gets the same answer. Returns the lock's open file: keep it until the run ends.
    A filesystem without flock (some network mounts) gets a warning and no lock."""
    path, error, handle = run_dir.rstrip("/") + ".lock", None, None
    if rank == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            handle.flush()
        except BlockingIOError:
            handle.seek(0)
            error = (f"{run_dir} is in use by {handle.read().strip() or 'another process'} ({path}): wait for it "
                     f"to finish or stop it, or train under another --model-tag")
            handle.close()
        except OSError as e:  # no flock here (ENOLCK, ENOSYS): run, but say what is not guarded
            warnings.warn(f"cannot lock {path} ({e.strerror}): nothing stops a second run on this --model-tag")
    if dist.is_initialized():
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise BadInput(error)
    return handle


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
    """Called by every rank: the optimizer shards (to rank 0 only: no other rank ever holds the full
    state) and the ranks' data-stream states (a list per rank, rank-major = stream order) are
    gathered, then rank 0 writes. Keeps `keep` checkpoints: this one and the newest keep - 1 before
    it (0: all). Rotation never deletes a step newer than the one written: that is another run's
    work (base_train refuses to write behind a newer one).
    meta: anything JSON, stored in meta.json; base_train puts the model config, the flags, the
    loop state and the tokenizer's fingerprint there (meta["tokenizer"] = tokenizer.fingerprint())."""
    optimizer_state = optimizer.full_state_dict() if optimizer is not None else None  # None on rank != 0
    streams = loader_states
    if dist.is_initialized():
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, loader_states)
        streams = [state for states in per_rank for state in states]
    final = step_dir(run_dir, step)
    error = None
    if rank == 0:
        files = {"model.pt": model.state_dict(), "optimizer.pt": optimizer_state,
                 "loaders.json": streams, "meta.json": {"step": step, **meta}}
        try:
            _write_checkpoint(final, files)
            older = [s for s in list_steps(run_dir) if s < step]
            for old in older[:max(0, len(older) - (keep - 1))] if keep else []:
                shutil.rmtree(step_dir(run_dir, old), ignore_errors=True)
        except Exception as e:  # noqa: BLE001 (the other ranks must hear of it, not wait forever)
            error = e
    if dist.is_initialized():  # nobody goes on (or reads it) before it is complete, or failed
        box = [None if error is None else str(error)]
        dist.broadcast_object_list(box, src=0)
        if rank != 0 and box[0] is not None:
            raise Unavailable(f"rank 0 could not save {final}: {box[0]}")
    if error is not None:
        raise error
    return final


def _write_checkpoint(final, files):
    """Write `files` (name -> tensors or JSON data) into final.tmp/, then rename it to `final`.
    On any failure the .tmp directory is removed (a full disk stays full otherwise) and earlier
    checkpoints are untouched. Every file and the directory are fsynced before the rename, so
    after a power cut a checkpoint under its final name is complete."""
    run_dir = os.path.dirname(final)
    tmp = final + ".tmp"
    os.makedirs(run_dir, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crash during an earlier save
    need = sum(_nbytes(data) for data in files.values()) * 1.02 + (16 << 20)  # + pickle/zip/JSON overhead
    if shutil.disk_usage(run_dir).free < need:
        raise _no_space(final, need)
    try:
        os.makedirs(tmp)
        for name, data in files.items():
            with open(os.path.join(tmp, name), "wb") as f:  # a file object: torch then reports ENOSPC as OSError
                if name.endswith(".json"):
                    f.write(json.dumps(data).encode())
                else:
                    torch.save(data, f)
                f.flush()
                os.fsync(f.fileno())
        fsync_path(tmp)
        if os.path.exists(final):  # re-saving a step (e.g. the final step after a resume)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_path(run_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _no_space(final, need) from None  # the estimate was short, or the disk filled meanwhile
        raise


def _nbytes(obj):
    """Bytes torch.save writes for the tensors in obj: each storage once (it saves a storage, not
    a view, and tensors sharing one once); the rest (JSON, scalars) is estimated by its repr."""
    storages, rest = {}, 0

    def walk(x):
        nonlocal rest
        if isinstance(x, torch.Tensor):
            storages[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        elif isinstance(x, dict):
            for k, v in x.items():
                rest += len(repr(k))
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        else:
            rest += len(repr(x))
    walk(obj)
    return sum(storages.values()) + rest


def _no_space(final, need):
    mount = os.path.realpath(os.path.dirname(final))
    while not os.path.ismount(mount):
        mount = os.path.dirname(mount)
    have = shutil.disk_usage(os.path.dirname(final)).free
    return Unavailable(f"no space left on {mount} ({final}): need {need / 1e9:.2f} GB, have {have / 1e9:.2f} GB; "
                       f"free space or point NANOCHAT_BASE_DIR elsewhere")


def _damaged(path, e):
    # disk trouble, not a half-written save (those never get their final name): name the way back
    fix = f"delete {os.path.dirname(path)} to resume from the previous checkpoint"
    if isinstance(e, FileNotFoundError):
        return Missing(f"{path} is missing: {fix}")
    if isinstance(e, KeyError):
        return BadInput(f"{path} has no {e.args[0]!r} field: {fix}")
    return BadInput(f"{path} is truncated or corrupt ({type(e).__name__}): {fix}")


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
        raise Missing(f"no checkpoint in {run_dir}: train one with python -m scripts.base_train")
    if step is not None and step not in steps:
        raise Missing(f"{run_dir} has no checkpoint at step {step}; it has step(s) "
                      f"{', '.join(map(str, steps))} (leave out --step for the newest)")
    path = os.path.join(step_dir(run_dir, steps[-1] if step is None else step), "meta.json")
    meta = _json_load(path)
    for field in ("step", "model_config"):  # valid JSON that is not ours (a hand edit, another tool)
        if not isinstance(meta, dict) or field not in meta:
            raise _damaged(path, KeyError(field))
    return meta


def _json_load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bad UTF-8
        raise _damaged(path, e) from None


def load_weights(run_dir, step, device):
    return _torch_load(os.path.join(step_dir(run_dir, step), "model.pt"), map_location=device, weights_only=True)


def load_model(run_dir, device, step=None, vocab_size=None, tokenizer=None):
    """(model, meta) from the newest (or the given) checkpoint of a run. tokenizer (or just its
    vocab_size): the one the caller will use, checked against the model's (a different tokenizer
    would silently give garbage)."""
    meta = load_meta(run_dir, step)
    vocab_size = tokenizer.vocab_size if tokenizer is not None else vocab_size
    trained = meta["model_config"]["vocab_size"]
    if vocab_size is not None and vocab_size != trained:
        raise BadInput(f"checkpoint {step_dir(run_dir, meta['step'])} was trained with a vocab of {trained} tokens "
                       f"but the tokenizer at {_tokenizer_path(tokenizer)} has {vocab_size}: "
                       f"use the tokenizer the model was trained with")
    if tokenizer is not None:
        check_tokenizer(run_dir, tokenizer, meta)
    model = build_model(GPTConfig(**meta["model_config"]), device)
    model.load_state_dict(load_weights(run_dir, meta["step"], device))
    return model, meta


def _tokenizer_path(tokenizer=None):
    if tokenizer is not None and tokenizer.path:
        return tokenizer.path
    from nanochat.tokenizer import get_tokenizer_dir
    return os.path.join(get_tokenizer_dir(), "tokenizer.json")


def check_tokenizer(run_dir, tokenizer, meta=None):
    """Refuse a tokenizer other than the one the checkpoint was trained with (meta: that
    checkpoint's meta.json; default the run's newest). A retrained tokenizer of the same vocab
    size maps text to other ids: evaluation and training would go on, producing garbage.
    Checkpoints from before fingerprints were stored get a warning, once."""
    meta = load_meta(run_dir) if meta is None else meta
    saved = meta.get("tokenizer")
    if saved is None:
        warnings.warn(f"checkpoint {step_dir(run_dir, meta['step'])} does not record its tokenizer: cannot "
                      f"check that {_tokenizer_path(tokenizer)} is the one it was trained with", stacklevel=2)
    elif saved != (current := tokenizer.fingerprint()):
        raise BadInput(f"checkpoint {step_dir(run_dir, meta['step'])} was trained with tokenizer {saved} but "
                       f"{_tokenizer_path(tokenizer)} is tokenizer {current}: put back the "
                       f"tokenizer.json the model was trained with, or use another NANOCHAT_BASE_DIR")


def checkpoints_using(tokenizer, base_dir=None):
    """The newest checkpoint of every run under base_checkpoints/ trained with this tokenizer
    (runs from before fingerprints were stored: those with its vocab size)."""
    root = os.path.join(base_dir or get_base_dir(), "base_checkpoints")
    fingerprint = tokenizer.fingerprint()  # hashes every merge: once, not twice per run
    found = []
    for tag in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        try:
            meta = load_meta(os.path.join(root, tag))
        except (FileNotFoundError, ValueError):  # no checkpoint, or a damaged meta.json: cannot tell
            continue
        if meta.get("tokenizer", fingerprint) == fingerprint and meta["model_config"]["vocab_size"] == tokenizer.vocab_size:
            found.append(step_dir(os.path.join(root, tag), meta["step"]))
    return found


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
        raise BadInput(f"--resume: the checkpoint in {run_dir} is a different model ({meta['model_config']}); "
                       f"use the same --depth and model flags or another --model-tag")
    optimizer_state, streams = load_training_state(run_dir, meta["step"])
    world = dist.get_world_size() if dist.is_initialized() else 1
    if len(streams) != world * len(loaders):
        raise BadInput(f"--resume: {d} has {len(streams)} data streams (processes × micro-steps) but this run "
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
