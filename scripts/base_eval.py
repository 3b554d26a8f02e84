"""
Evaluate a base model checkpoint: CORE (the DCLM in-context tasks), bits per byte on train and
val text, and a few samples. Results go to <run_dir>/base_eval.json, which the report reads.

    python -m scripts.base_eval                                   # newest run, newest step
    torchrun --nproc_per_node=8 -m scripts.base_eval --model-tag d24
    python -m scripts.base_eval --core-max-per-task 100 --bpb-tokens 524288   # quick look
    python -m scripts.base_eval --hf-path openai-community/gpt2-xl      # any Hugging Face causal LM

CORE and bpb are measured the way the public time-to-GPT-2 leaderboard measures them (docs/EVAL.md),
so they compare with GPT-2's CORE and the record's val bpb. --core-max-per-task K scores the first K
of each task's fixed shuffle (the same items in every run): cheaper, but not comparable with a full
score; the label and base_eval.json say which it was.
A Hugging Face model (pip install -e '.[hf]') is scored by the same CORE and bpb code with its
own tokenizer; its results go to <base dir>/hf_eval/<model>/base_eval.json.

The eval bundle is downloaded to $NANOCHAT_BASE_DIR/eval_bundle on first use (or pass
--eval-bundle PATH to an unzipped copy; NANOCHAT_EVAL_BUNDLE_URL points at a mirror).
"""
import math
import os
import re
import shutil
import sys
import tempfile
import time
import zipfile
import zlib

import torch.distributed as dist

from nanochat.cli import DEVICE_TYPES, ArgumentParser, Missing, Unavailable, check, run
from nanochat.checkpoint import get_run_dir, load_model, newest_model_tag, save_json
from nanochat.common import compute_cleanup, compute_init, get_base_dir, print0
from nanochat.core_eval import evaluate_core, get_eval_bundle_dir
from nanochat.dataset import download_file
from nanochat.engine import SAMPLE_PROMPTS, sample_texts
from nanochat.loss_eval import evaluate_split
from nanochat.shards import list_shards
from nanochat.tokenizer import get_tokenizer

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"


# -----------------------------------------------------------------------------
# The eval bundle

def _unpack(zip_path, dest):
    """Extract into a temp dir next to dest, then rename into place: dest is whole or absent."""
    tmp = tempfile.mkdtemp(prefix=".eval_bundle.", dir=os.path.dirname(os.path.abspath(dest)))
    try:
        with zipfile.ZipFile(zip_path) as z:
            z.extractall(tmp)
        src = os.path.join(tmp, "eval_bundle")  # the zip has one top-level eval_bundle/ dir
        if not os.path.exists(os.path.join(src, "core.yaml")):
            raise zipfile.BadZipFile("no eval_bundle/core.yaml inside")
        os.replace(src, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def download_eval_bundle(dest, url=None, retries=4, backoff=2.0, timeout=60):
    """Download the eval bundle zip (retried, verified, as for shards) and unpack it to dest."""
    url = url or os.environ.get("NANOCHAT_EVAL_BUNDLE_URL") or EVAL_BUNDLE_URL
    parent = os.path.dirname(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    zip_path = os.path.join(parent, "eval_bundle.zip")
    print0(f"downloading the CORE eval bundle from {url}")
    try:
        download_file(url, zip_path, zipfile.is_zipfile, retries, backoff, timeout)
        _unpack(zip_path, dest)
    except (RuntimeError, zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise Unavailable(f"{e}; download and unzip it yourself and pass --eval-bundle PATH/eval_bundle") from None
    finally:
        if os.path.exists(zip_path):
            os.remove(zip_path)
    return dest


def ensure_eval_bundle(path, rank=0):
    """The bundle dir, downloaded by rank 0 if absent while the other ranks wait. If rank 0
    fails it exits with the error, and torchrun then stops the other ranks."""
    if rank == 0 and not os.path.isdir(path):
        download_eval_bundle(path)
    if dist.is_initialized():
        dist.barrier()
    return path


# -----------------------------------------------------------------------------

def load_subject(args, device):
    """(model, tokenizer, output dir, what was evaluated): one of our checkpoints, or a Hugging
    Face model with its own tokenizer."""
    if args.hf_path:
        from nanochat.hf_model import load_hf_model
        model, tokenizer = load_hf_model(args.hf_path, device)
        out_dir = os.path.join(get_base_dir(), "hf_eval", re.sub(r"[^\w.-]+", "--", args.hf_path.strip("/")))
        return model, tokenizer, out_dir, {"model": args.hf_path, "step": None}
    tag = args.model_tag or newest_model_tag()
    if tag is None:
        raise Missing("no run under base_checkpoints/: train one with python -m scripts.base_train")
    run_dir = get_run_dir(tag)
    tokenizer = get_tokenizer()
    model, meta = load_model(run_dir, device, args.step, tokenizer=tokenizer)
    return model, tokenizer, run_dir, {"model": tag, "step": meta["step"]}


def print_results(result):
    print(f"\n{'task':<34} {'accuracy':>9} {'centered':>9} {'items':>6}")
    for label, t in result["tasks"].items():
        print(f"{label:<34} {t['accuracy']:>9.4f} {t['centered']:>9.4f} {t['n_items']:>6}")
    for label in result["skipped"]:
        why = result["skipped_why"][label]
        print(f"{label:<34} {'-':>9} {'-':>9}  (data file {why.split(' (')[0]})")
    print(f"{result['core_label']} (rules: {result['rules']}): {result['core']:.4f}   (GPT-2 1.5B: 0.2565 over all 22)")
    for split, value in result["bpb"].items():
        print(f"{split} bpb: {value:.4f}" + ("" if math.isfinite(value) else "  (not finite!)"))
    for s in result["samples"]:
        print("-" * 40 + "\n" + s)


def parse_args(argv=None):
    p = ArgumentParser("python -m scripts.base_eval", __doc__)
    p.add_argument("--model-tag", default=None, help="run under base_checkpoints/ (default: the newest)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--hf-path", default=None,
                   help="evaluate a Hugging Face causal LM instead: a model id or a local dir (needs the hf extra)")
    p.add_argument("--eval-bundle", default=None,
                   help="unzipped eval bundle dir (default: <base dir>/eval_bundle, downloaded if absent)")
    p.add_argument("--core-max-per-task", type=int, default=None,
                   help="the first N of each CORE task's fixed shuffle of its items, not comparable with a full "
                        "score (default: all items)")
    p.add_argument("--bpb-tokens", type=int, default=40 * 2 ** 19,
                   help="tokens of train and of val text for bpb, the leaderboard's count; 0: off")
    p.add_argument("--device-batch-size", type=int, default=16, help="rows per forward pass for bpb")
    p.add_argument("--device-type", default=None, choices=DEVICE_TYPES, help="default: autodetect")
    p.add_argument("--samples", type=int, default=4,
                   help="prompts to sample continuations of (none for --hf-path); 0: off")
    p.add_argument("--download-only", action="store_true", help="fetch the eval bundle if absent, then exit")
    args = p.parse_args(argv)
    check(p, [
        (args.core_max_per_task is not None and args.core_max_per_task < 1,
         f"--core-max-per-task {args.core_max_per_task}: must be >= 1 (leave it out for all items)"),
        (args.bpb_tokens < 0, f"--bpb-tokens {args.bpb_tokens}: must be >= 0 (0: off)"),
        (args.samples < 0, f"--samples {args.samples}: must be >= 0 (0: off)"),
        (args.device_batch_size < 1, f"--device-batch-size {args.device_batch_size}: must be >= 1"),
        (args.hf_path and (args.model_tag or args.step is not None),
         "--hf-path evaluates a Hugging Face model: drop --model-tag/--step"),
    ])
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.download_only:
        ensure_eval_bundle(get_eval_bundle_dir(args.eval_bundle))
        return 0

    if args.bpb_tokens > 0:
        try:
            list_shards("val")  # fail now, not after a long CORE run: bpb needs the text shards
        except Missing as e:
            raise Missing(f"{e} (or pass --bpb-tokens 0 to skip bpb)") from None

    _, rank, _, world, device = compute_init(args.device_type)
    model, tokenizer, out_dir, subject = load_subject(args, device)
    print0(f"evaluating {subject['model']}" + (f" at step {subject['step']}" if subject["step"] is not None else "")
           + f" on {world} x {device.type}")

    bundle = get_eval_bundle_dir(args.eval_bundle)
    ensure_eval_bundle(bundle, rank)
    t0 = time.time()
    core = evaluate_core(model, tokenizer, bundle, device, args.core_max_per_task)
    print0(f"CORE took {time.time() - t0:.0f}s")

    model.eval()
    bpb, bpb_tokens = {}, {}
    if args.bpb_tokens > 0:
        for split in ("train", "val"):
            bpb[split], bpb_tokens[split] = evaluate_split(model, tokenizer, split, args.bpb_tokens,
                                                           args.device_batch_size, model.config.sequence_len,
                                                           device, rank, world)
    # sampling uses our model's KV cache: a Hugging Face model gets none
    samples = sample_texts(model, tokenizer, SAMPLE_PROMPTS[:args.samples]) if rank == 0 and not args.hf_path else []

    result = {**subject, **core, "bpb": bpb, "bpb_tokens": bpb_tokens, "samples": samples}
    if rank == 0:
        print_results(result)
        save_json(os.path.join(out_dir, "base_eval.json"), result)
        print(f"wrote {os.path.join(out_dir, 'base_eval.json')}")
    return result


if __name__ == "__main__":
    try:
        status = run(main)
    finally:
        compute_cleanup()
    sys.exit(status)
