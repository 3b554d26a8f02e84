"""
The pretraining data as training reads it: a directory of parquet shards, each with one `text`
column stored in row groups (the unit a data stream reads), and a manifest.json that records
where the shards came from and which of them are the train and the val split. The split is
written down when the shards are made (nanochat/dataset.py builds and downloads them), never
guessed from file names: a lost val shard must be an error, not a train shard silently promoted
to val (the model would be scored on its training data).
"""
import json
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.cli import BadInput, Missing
from nanochat.common import get_base_dir

SHARD_RE = re.compile(r"shard_\d+\.parquet")  # full match, so .partial / .tmp files never count
MANIFEST = "manifest.json"
CLIMBMIX = "climbmix"  # the source name of downloaded shards, in manifests and NANOCHAT_DATA_SOURCE


def get_data_dir():
    data_dir = os.path.join(get_base_dir(), "base_data")
    os.makedirs(data_dir, exist_ok=True)
    return data_dir


def _shard_paths(data_dir):
    names = os.listdir(data_dir) if os.path.isdir(data_dir) else []
    return sorted(os.path.join(data_dir, n) for n in names if SHARD_RE.fullmatch(n))


def read_manifest(data_dir):
    """The manifest of data_dir ({"source", "train", "val", "docs"}), or None if there is none."""
    path = os.path.join(data_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        if isinstance(manifest["source"], str) and manifest["train"] and manifest["val"]:
            return manifest
    except (ValueError, KeyError, TypeError):
        pass
    raise BadInput(f"{path}: not a valid shard manifest; delete {data_dir} and build the shards "
                   f"again (python -m nanochat.dataset --local PATH, or -n 8 to download)")


def list_shards(split, data_dir=None):
    """The shard paths of one split, as the manifest records them. Every shard the manifest
    names must exist: a missing one is an error naming the file and how to get it back."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    data_dir = data_dir or get_data_dir()
    manifest = read_manifest(data_dir)
    if manifest is None:
        found = len(_shard_paths(data_dir))
        unfinished = f" (it holds {found} shards of an unfinished build or download)" if found else ""
        raise Missing(f"no {MANIFEST} in {data_dir}{unfinished}: download shards with `python -m nanochat.dataset "
                      f"-n 8`, or build them with `python -m nanochat.dataset --local PATH`; the same command run "
                      f"again finishes an interrupted one")
    for which in ("val", "train"):
        for name in manifest[which]:
            if not os.path.exists(os.path.join(data_dir, name)):
                fix = ("run `python -m nanochat.dataset -n 8` to download it again" if manifest["source"] == CLIMBMIX
                       else f"delete {data_dir} and build it again from {manifest['source']}")
                raise Missing(f"{os.path.join(data_dir, name)}: this {which} shard (listed in "
                              f"{MANIFEST}) is missing; {fix}")
    return [os.path.join(data_dir, name) for name in manifest[split]]


def _unreadable(path, e):
    # pyarrow's messages can span lines and hold raw bytes of the damaged file: keep one clean line
    reason = " ".join("".join(c if c.isprintable() else " " for c in str(e)).split())
    return BadInput(f"{path}: not a readable parquet shard ({reason}); delete it and run "
                    f"python -m nanochat.dataset again (or rebuild with --local)")


def open_shard(path):
    """The ParquetFile of a shard, or a one-line ValueError naming the damaged file and the fix."""
    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:  # garbage, truncated or empty (a full disk, a killed copy)
        raise _unreadable(path, e) from None
    if "text" not in pf.schema_arrow.names:
        raise BadInput(f"{path}: no 'text' column (columns: {', '.join(pf.schema_arrow.names)}); delete it "
                       f"and run python -m nanochat.dataset again (or rebuild with --local)")
    return pf


def read_row_group(path, rg):
    """The documents (strings) of one row group of a shard."""
    try:
        return open_shard(path).read_row_group(rg, columns=["text"]).column("text").to_pylist()
    except (OSError, pa.ArrowException) as e:  # a sound footer over damaged pages shows up only here
        raise _unreadable(path, e) from None


def iter_documents(split, data_dir=None, rank=0, world_size=1):
    """Yield the documents of a split, shard by shard. Rank r reads row groups r, r+W, r+2W, ...
    of every shard, so W ranks together see each document exactly once without coordinating."""
    for path in list_shards(split, data_dir):
        for rg in range(rank, open_shard(path).num_row_groups, world_size):
            yield from read_row_group(path, rg)
