"""
Evaluate a base model checkpoint: CORE (the DCLM in-context tasks), bits per byte on train and
val text, and a few samples. Results go to <run_dir>/base_eval.json, which the report reads.

    python -m scripts.base_eval                                   # newest run, newest step
    torchrun --nproc_per_node=8 -m scripts.base_eval --model-tag d24
    python -m scripts.base_eval --max-per-task 100 --bpb-tokens 524288   # quick look

The eval bundle is downloaded to $NANOCHAT_BASE_DIR/eval_bundle on first use (or pass
--eval-bundle PATH to an unzipped copy; NANOCHAT_EVAL_BUNDLE_URL points at a mirror).
"""
import argparse
import math
import os
import shutil
import tempfile
import time
import zipfile
import zlib

import torch.distributed as dist

from nanochat.checkpoint import get_run_dir, load_model, newest_model_tag, save_json
from nanochat.common import compute_cleanup, compute_init, print0
from nanochat.core_eval import evaluate_core, get_eval_bundle_dir
from nanochat.dataset import download_file
from nanochat.engine import SAMPLE_PROMPTS, sample_texts
from nanochat.loss_eval import evaluate_split_bpb
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
        raise RuntimeError(f"{e}; download and unzip it yourself and pass --eval-bundle PATH/eval_bundle") from None
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

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-tag", default=None, help="run under base_checkpoints/ (default: the newest)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    parser.add_argument("--eval-bundle", default=None,
                        help="unzipped eval bundle dir (default: <base dir>/eval_bundle, downloaded if absent)")
    parser.add_argument("--max-per-task", type=int, default=None,
                        help="only the first K items of each task (a subset: not a comparable CORE score)")
    parser.add_argument("--bpb-tokens", type=int, default=10 * 524288,
                        help="tokens of train and of val text for bpb (0: skip)")
    parser.add_argument("--device-batch-size", type=int, default=16, help="rows per forward for bpb")
    parser.add_argument("--device-type", default=None, choices=["cuda", "mps", "cpu"], help="default: autodetect")
    parser.add_argument("--samples", type=int, default=4, help="prompts to sample continuations of (0: none)")
    parser.add_argument("--download-only", action="store_true", help="fetch the eval bundle if absent, then exit")
    args = parser.parse_args(argv)
    if args.download_only:
        try:
            return ensure_eval_bundle(get_eval_bundle_dir(args.eval_bundle))
        except RuntimeError as e:
            raise SystemExit(f"error: {e}") from None
    if args.max_per_task is not None and args.max_per_task < 1:
        parser.error("--max-per-task must be >= 1")

    _, rank, _, world_size, device = compute_init(args.device_type)
    tag = args.model_tag or newest_model_tag()
    if tag is None:
        raise FileNotFoundError("no run under base_checkpoints/: train one with python -m scripts.base_train")
    run_dir = get_run_dir(tag)
    tokenizer = get_tokenizer()
    model, meta = load_model(run_dir, device, args.step, tokenizer=tokenizer)
    print0(f"evaluating {run_dir} at step {meta['step']} on {world_size} x {device.type}")

    bundle = get_eval_bundle_dir(args.eval_bundle)
    try:
        ensure_eval_bundle(bundle, rank)
    except RuntimeError as e:
        raise SystemExit(f"error: {e}") from None
    t0 = time.time()
    core = evaluate_core(model, tokenizer, bundle, device, args.max_per_task)
    print0(f"CORE took {time.time() - t0:.0f}s")

    model.eval()
    bpb = {}
    if args.bpb_tokens > 0:
        for split in ("train", "val"):
            bpb[split] = evaluate_split_bpb(model, tokenizer, split, args.bpb_tokens, args.device_batch_size,
                                            model.config.sequence_len, device, rank, world_size)
    samples = sample_texts(model, tokenizer, SAMPLE_PROMPTS[:args.samples]) if rank == 0 else []

    result = {"step": meta["step"], **core, "bpb": bpb, "samples": samples}
    if rank == 0:
        print(f"\n{'task':<34} {'accuracy':>9} {'centered':>9}")
        for label, t in core["tasks"].items():
            print(f"{label:<34} {t['accuracy']:>9.4f} {t['centered']:>9.4f}")
        for label in core["skipped"]:
            print(f"{label:<34} {'-':>9} {'-':>9}  (data file missing)")
        print(f"{core['core_label']}: {core['core']:.4f}   (GPT-2 1.5B: 0.2565 over all 22)")
        for split, value in bpb.items():
            print(f"{split} bpb: {value:.4f}" + ("" if math.isfinite(value) else "  (not finite!)"))
        for s in samples:
            print("-" * 40 + "\n" + s)
        save_json(os.path.join(run_dir, "base_eval.json"), result)
        print(f"wrote {os.path.join(run_dir, 'base_eval.json')}")
    return result


if __name__ == "__main__":
    try:
        main()
    finally:
        compute_cleanup()
