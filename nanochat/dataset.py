"""
Making the pretraining data: download ClimbMix's shards, or build shards in the same format
(nanochat/shards.py, which training reads) from local files, a Hugging Face dataset or the demo
corpus shipped in the package. Every build ends by writing the manifest that records the split.

    python -m nanochat.dataset -n 170                 # download 170 ClimbMix train shards + val (-n all: every one)
    python -m nanochat.dataset --demo                 # the small corpus shipped in nanochat/demo_data
    python -m nanochat.dataset --local corpus/ notes.txt --out /tmp/shards
    python -m nanochat.dataset --hf HuggingFaceFW/fineweb-edu --hf-config sample-10BT --max-docs 1000000

Downloads resume: a finished shard is skipped, a partial one continues where it stopped,
and nothing appears under a shard's real name until it has been checked to be whole.
A host that cannot be reached at all (no DNS, connection refused) fails at once, with the
offline options; a flaky one (timeouts, 5xx, dropped connections) is retried with backoff.
"""
import argparse
import errno
import gzip
import http.client
import itertools
import json
import os
import random
import re
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.cli import ArgumentParser, BadInput, Missing, Unavailable, check, run
from nanochat.common import atomic_write
from nanochat.shards import (CLIMBMIX, MANIFEST, _shard_paths, get_data_dir, list_shards, open_shard, read_manifest,
                             read_row_group)

BASE_URL = "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"
MAX_SHARD = 6542  # shards 0..6542 exist upstream; the last one is the validation split
VAL_SHARD = f"shard_{MAX_SHARD:05d}.parquet"
CHUNK_SIZE = 1 << 20
BUILDING = "building.json"  # written before a build's first shard, removed once its manifest is in place
# shipped inside the package (see demo_data/NOTICE), so the CPU demo needs no network
DEMO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_data")
DEMO_CORPUS = os.path.join(DEMO_DIR, "corpus")
DEMO_EVAL_BUNDLE = os.path.join(DEMO_DIR, "eval_bundle")
OFFLINE_HINT = ("offline, run with NANOCHAT_DATA_SOURCE=demo (the built-in demo data) or NANOCHAT_DATA_SOURCE="
                "path/to/texts, and NANOCHAT_EVAL_BUNDLE=path/to/eval_bundle; or point NANOCHAT_DATA_URL "
                "(NANOCHAT_EVAL_BUNDLE_URL for the eval bundle) at a mirror")


def shard_url(index):
    # read at call time so a mirror (or a test server) can be swapped in with NANOCHAT_DATA_URL
    base = os.environ.get("NANOCHAT_DATA_URL") or BASE_URL
    return f"{base.rstrip('/')}/shard_{index:05d}.parquet"


# -----------------------------------------------------------------------------
# Downloading shards

def write_manifest(data_dir, source, train, val):
    """Record which shards (file names in data_dir) are train and which val, and their source."""
    docs = {name: pq.read_metadata(os.path.join(data_dir, name)).num_rows for name in train + val}
    manifest = {"source": source, "train": train, "val": val, "docs": docs}
    with atomic_write(os.path.join(data_dir, MANIFEST)) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
    return manifest


def _fetch(url, tmp, timeout):
    """One attempt at streaming `url` into `tmp`, continuing a partial file if the server allows."""
    have = os.path.getsize(tmp) if os.path.exists(tmp) else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as resp:
        # 206 means we get just the rest; a 200 means the server ignored Range and sends it all again
        resumed = resp.status == 206 and resp.headers.get("Content-Range", "").startswith(f"bytes {have}-")
        expected = int(resp.headers.get("Content-Length", -1))
        got = 0
        with open(tmp, "ab" if resumed else "wb") as f:
            while chunk := resp.read(CHUNK_SIZE):
                f.write(chunk)
                got += len(chunk)
    if got < expected:  # urllib returns b"" instead of raising when a connection drops early
        raise ConnectionError(f"connection dropped after {got:,} of {expected:,} bytes")


def _is_parquet(path):
    """A whole parquet file ends with the magic bytes PAR1 and has a footer pyarrow can parse."""
    try:
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            if f.read() != b"PAR1":
                return False
        pq.read_metadata(path)
        return True
    except (OSError, pa.ArrowException):
        return False


class HostUnreachable(Unavailable):
    """The host of a URL cannot be reached at all: retrying in a few seconds will not help."""


def _unreachable(url, e):
    """A HostUnreachable for a failed name lookup or a refused / unroutable connection, else None.
    These come from a machine without network (or a wrong URL), not from a flaky link."""
    reason = getattr(e, "reason", e)  # urllib wraps the socket error in a URLError
    if not (isinstance(reason, socket.gaierror)
            or getattr(reason, "errno", None) in (errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH)):
        return None
    host = urllib.parse.urlsplit(url).netloc
    return HostUnreachable(f"could not download {url}: cannot reach {host} "
                           f"({getattr(reason, 'strerror', None) or reason}); {OFFLINE_HINT}")


def download_file(url, path, verify, retries=5, backoff=2.0, timeout=30):
    """Download url to path, which appears only once `verify(temp_path)` accepts the bytes.
    Transient failures (network errors, timeouts, 5xx, bytes that fail verification) are
    retried with exponential backoff; a 4xx is not, nor a host that cannot be reached at all
    (HostUnreachable). Raises RuntimeError naming the URL."""
    if os.path.exists(path):
        return path  # only verified files are ever renamed into place, so this one is whole
    tmp = path + ".partial"  # a fixed temp name lets a re-run resume it
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            _fetch(url, tmp, timeout)
        except urllib.error.HTTPError as e:
            if e.code == 416 and os.path.exists(tmp):  # our partial file is not a prefix: start over
                os.remove(tmp)
            elif e.code < 500 and e.code not in (408, 429):  # asking again will not change the answer
                raise Unavailable(f"could not download {url}: {e}") from None
            error = e
            continue
        except (OSError, http.client.HTTPException) as e:  # refused, reset, dropped, timed out
            if unreachable := _unreachable(url, e):
                raise unreachable from None
            if getattr(e, "errno", None) == errno.ENOSPC:  # retrying cannot help until space is freed
                raise Unavailable(f"no space left on device while writing {tmp}: free space in "
                                  f"{os.path.dirname(tmp)} and run again (the partial download resumes)") from None
            error = e
            continue
        if verify(tmp):
            os.replace(tmp, path)
            return path
        os.remove(tmp)  # the bytes themselves are bad, so resuming them would not help
        error = "the downloaded file is corrupt or truncated"
    raise Unavailable(f"could not download {url} after {retries + 1} attempts: {error}")


def download_shard(index, data_dir=None, retries=5, backoff=2.0, timeout=30):
    """Download shard `index` into data_dir (verified as a whole parquet file) and return its path."""
    path = os.path.join(data_dir or get_data_dir(), f"shard_{index:05d}.parquet")
    return download_file(shard_url(index), path, _is_parquet, retries, backoff, timeout)


def _check_download_source(data_dir):
    """Downloaded shards may only join other ClimbMix shards: mixed in with shards built from other
    data they would silently change the training data (and old names would pass for ClimbMix)."""
    manifest = read_manifest(data_dir)
    if manifest is not None and manifest["source"] != CLIMBMIX:
        raise BadInput(f"{data_dir} holds shards built from {manifest['source']}, not {CLIMBMIX}: set "
                       f"NANOCHAT_BASE_DIR to another dir (or --out), or delete {data_dir} to download")
    # no manifest: only an interrupted download may be resumed, and download() fetches the val
    # shard first, so shards without it came from elsewhere (an old --local build) and would be
    # relabelled as ClimbMix train data by the manifest written at the end
    paths = _shard_paths(data_dir)
    if manifest is None and paths and os.path.join(data_dir, VAL_SHARD) not in paths:
        raise BadInput(f"{data_dir} holds {len(paths)} shards with no {MANIFEST} and no ClimbMix val shard "
                       f"{VAL_SHARD}, so they are not an interrupted ClimbMix download: set NANOCHAT_BASE_DIR "
                       f"to another dir (or --out), or delete {data_dir} to download")


def download(num_train_shards=8, data_dir=None, workers=8, retries=5, backoff=2.0):
    """Download the validation shard, then train shards 0..n-1 (n = None: all of them) several at
    a time. Shards already present are skipped, so re-running resumes an interrupted download.
    Once all are in, the manifest lists every ClimbMix shard present: the val one, and train the rest."""
    data_dir = data_dir or get_data_dir()
    _check_download_source(data_dir)
    n = MAX_SHARD if num_train_shards is None else min(num_train_shards, MAX_SHARD)
    total = n + 1
    print(f"downloading {n} train shards + 1 val shard to {data_dir}", flush=True)

    def progress(done, path):
        print(f"[{done}/{total}] {os.path.basename(path)} ({os.path.getsize(path) / 1e6:.1f} MB)", flush=True)
    # the val shard first, alone: any shard here without it is then known not to be from a download
    progress(1, download_shard(MAX_SHARD, data_dir, retries, backoff))
    errors = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(download_shard, i, data_dir, retries, backoff): i for i in range(n)}
        for done, future in enumerate(as_completed(futures), 2):
            try:
                progress(done, future.result())
            except HostUnreachable:  # every other shard would fail the same way: stop now
                for f in futures:
                    f.cancel()
                raise
            except RuntimeError as e:
                errors[futures[future]] = e
                print(f"[{done}/{total}] failed: {e}", flush=True)
    if errors:
        first = errors[min(errors)]
        raise Unavailable(f"{first} ({len(errors)} of {total} shards failed; run again to resume)")
    train = [os.path.basename(p) for p in _shard_paths(data_dir) if os.path.basename(p) != VAL_SHARD]
    write_manifest(data_dir, CLIMBMIX, train, [VAL_SHARD])


# -----------------------------------------------------------------------------
# Building shards from other sources

# Automatic row groups: at most 1,024 documents each (a row group is read whole, so this bounds
# the memory of a read), and at least 64 per train shard and 8 in the val shard, so that even a
# small corpus gives every data stream its own row groups: a run reads the train split with
# processes × gradient-accumulation streams (16 for a d12 run on one GPU, 64 for 8 GPUs × 8
# micro-steps) and the val split with one stream per process.
MAX_ROW_GROUP = 1024
MIN_ROW_GROUPS = {"train": 64, "val": 8}


def _write_shard(path, texts, row_group_size, split):
    if row_group_size is None:
        row_group_size = max(1, min(MAX_ROW_GROUP, -(-len(texts) // MIN_ROW_GROUPS[split])))
    table = pa.table({"text": pa.array(texts, type=pa.string())})
    with atomic_write(path) as tmp:
        pq.write_table(table, tmp, row_group_size=row_group_size, compression="zstd")
    return path


def _refuse_existing(out_dir, source):
    """New shards mixed into old ones would silently change the data and which shard is the val
    split: refused. The one exception is a build of the same source that was killed before its
    manifest was written: its partial shards are removed and the build starts again."""
    building = _read_building(out_dir)
    if building == source and read_manifest(out_dir) is None:
        print(f"data: removing the shards of an unfinished build from {source} in {out_dir}, building again")
        for path in _shard_paths(out_dir):
            os.remove(path)
        os.remove(os.path.join(out_dir, BUILDING))
    if not _shard_paths(out_dir) and not os.path.exists(os.path.join(out_dir, MANIFEST)):
        return
    old = (read_manifest(out_dir) or {}).get("source")
    if old == source:
        raise BadInput(f"{out_dir} already holds shards built from {source}: use them as they are, "
                       f"or delete {out_dir} to build them again")
    what = old or (f"an unfinished build from {building}" if building else f"another source (no {MANIFEST})")
    raise BadInput(f"{out_dir} already holds shards from {what}, not from {source}: set NANOCHAT_BASE_DIR to "
                   f"another dir (or pass --out), or delete {out_dir}")


def _read_building(out_dir):
    """The source of the build in progress (or killed) in out_dir, or None."""
    try:
        with open(os.path.join(out_dir, BUILDING), encoding="utf-8") as f:
            return json.load(f)["source"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_shards(texts, out_dir, docs_per_shard=50_000, val_docs=10_000, row_group_size=None, source="write_shards"):
    """Write an iterable of documents as shards in out_dir: the first `val_docs` documents
    become the last shard (the val split), the rest shard_00000, shard_00001, ...; then the
    manifest, which records the split and `source`. row_group_size: documents per row group
    (None: automatic, see MIN_ROW_GROUPS). Returns the paths. A build killed midway leaves
    building.json naming its source, so that the same command run again starts it over."""
    _refuse_existing(out_dir, source)
    if val_docs < 1 or docs_per_shard < 1:
        raise BadInput(f"val_docs and docs_per_shard must be >= 1, got {val_docs} and {docs_per_shard}")
    os.makedirs(out_dir, exist_ok=True)
    with atomic_write(os.path.join(out_dir, BUILDING)) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump({"source": source}, f)
    docs, paths = iter(texts), []
    try:
        val = list(itertools.islice(docs, val_docs))
        while batch := list(itertools.islice(docs, docs_per_shard)):
            paths.append(_write_shard(os.path.join(out_dir, f"shard_{len(paths):05d}.parquet"), batch, row_group_size,
                                       "train"))
            print(f"wrote {os.path.basename(paths[-1])}: {len(batch):,} train docs", flush=True)
        if not paths:
            raise BadInput(f"only {len(val)} documents: need more than val_docs={val_docs} to leave some for training")
        paths.append(_write_shard(os.path.join(out_dir, f"shard_{len(paths):05d}.parquet"), val, row_group_size, "val"))
        print(f"wrote {os.path.basename(paths[-1])}: {len(val):,} val docs", flush=True)
        names = [os.path.basename(p) for p in paths]
        write_manifest(out_dir, source, names[:-1], names[-1:])  # last: shards without it are never used
    except BaseException:
        # leave nothing half-built behind: a re-run starts clean
        for path in paths:
            os.remove(path)
        os.remove(os.path.join(out_dir, BUILDING))
        raise
    os.remove(os.path.join(out_dir, BUILDING))
    return paths


def _text_lines(path):
    """(line number, line) of a text file (.gz files read as they are: the demo corpus ships
    compressed), or one line naming the file, and the line, that cannot be read."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    yield lineno, raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise BadInput(f"{path}:{lineno}: not UTF-8 text: convert the file to UTF-8") from None
    except (OSError, EOFError) as e:  # a .gz that is not gzip, or a truncated one
        raise BadInput(f"{path}: cannot be read ({type(e).__name__}: {e}): is it really "
                       f"{'gzip' if path.endswith('.gz') else 'a text file'}?") from None


def _checked(text, where):
    """A document's text, or one line naming the row that holds something else (null, a number, a list)."""
    if not isinstance(text, str):
        raise BadInput(f"{where}: the text is {json.dumps(text)[:40]}, not a string: fix or drop that row")
    return text


def _read_jsonl(path):
    for lineno, line in _text_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadInput(f"{path}:{lineno}: invalid JSON ({e})") from None
        if not isinstance(row, dict) or "text" not in row:
            raise BadInput(f"{path}:{lineno}: no 'text' field")
        yield _checked(row["text"], f"{path}:{lineno}")


def _read_txt(path):
    # plain text has no document markers; blank lines (paragraphs, speeches) are the natural ones
    text = "".join(line for _, line in _text_lines(path))
    yield from (doc.strip() for doc in re.split(r"\n\s*\n", text) if doc.strip())


def _read_parquet(path):
    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise BadInput(f"{path}: not a readable parquet file ({type(e).__name__}): is it really parquet?") from None
    if "text" not in pf.schema_arrow.names:
        raise BadInput(f"{path}: no 'text' column (columns: {', '.join(pf.schema_arrow.names)})")
    row = 0
    for rg in range(pf.num_row_groups):
        for text in read_row_group(path, rg):
            row += 1
            yield _checked(text, f"{path}: row {row}")


READERS = {".jsonl": _read_jsonl, ".txt": _read_txt, ".parquet": _read_parquet,
           ".jsonl.gz": _read_jsonl, ".txt.gz": _read_txt}


def _file_type(path):
    """The READERS key of a path ('.txt.gz' for notes.txt.gz), or None."""
    name = os.path.basename(path)
    return next((ext for ext in sorted(READERS, key=len, reverse=True) if name.endswith(ext)), None)


def _files_in(directory):
    """The files of a directory tree that have a reader; none is an error that lists what was skipped."""
    files = sorted(os.path.join(root, name) for root, _, names in os.walk(directory) for name in names)
    readable = [f for f in files if _file_type(f)]
    if not readable:
        skipped = ", ".join(os.path.relpath(f, directory) for f in files[:5]) + (" ..." if len(files) > 5 else "")
        raise BadInput(f"{directory}: no {' / '.join(READERS)} files in it"
                       + (f" (skipped {len(files)}: {skipped})" if files else " (it is empty)"))
    return readable


def read_local_documents(paths):
    """Yield the documents of .jsonl / .txt / .parquet files; directories are searched recursively."""
    for path in paths:
        if os.path.isdir(path):
            yield from read_local_documents(_files_in(path))
            continue
        if not os.path.exists(path):
            raise Missing(f"{path} does not exist")
        reader = READERS.get(_file_type(path))
        if reader is None:
            raise BadInput(f"{path}: unknown file type, expected {', '.join(READERS)} or a directory")
        yield from reader(path)


def local_source(paths):
    """How a manifest names local files: their absolute paths."""
    return ", ".join(os.path.abspath(p) for p in paths)


def build_local(paths, out_dir=None, seed=42, val_docs=10_000, source=None, **shard_kwargs):
    """Shards from local files. Documents are shuffled first so that train and val are drawn
    from the same mix, not from different files."""
    out_dir = out_dir or get_data_dir()
    source = source or local_source(paths)
    _refuse_existing(out_dir, source)  # before reading everything, not after
    docs = list(read_local_documents(paths))
    random.Random(seed).shuffle(docs)
    val_docs = min(val_docs, max(1, len(docs) // 10))  # a small corpus keeps ~90% for training
    return write_shards(docs, out_dir, val_docs=val_docs, source=source, **shard_kwargs)


def hf_source(name, config=None):
    return f"hf:{name}" + (f" ({config})" if config else "")


def build_hf(name, out_dir=None, config=None, split="train", text_column="text", max_docs=None, seed=42,
             **shard_kwargs):
    """Shards from a Hugging Face dataset (a hub name or a local path), streamed, never fully in memory.
    The shuffle buffer mixes nearby documents only; most hub datasets are already shuffled."""
    try:
        from datasets import load_dataset  # optional: only this path needs it
    except ImportError:
        raise Unavailable("--hf needs the `datasets` package: pip install datasets") from None
    out_dir = out_dir or get_data_dir()
    source = hf_source(name, config)
    _refuse_existing(out_dir, source)
    ds = load_dataset(name, config, split=split, streaming=True).shuffle(seed=seed, buffer_size=10_000)
    if max_docs is not None:
        ds = ds.take(max_docs)

    def texts():
        for i, row in enumerate(ds):
            if text_column not in row:
                raise BadInput(f"{name} has no column {text_column!r} (columns: {', '.join(row)}): "
                               f"pick one with --text-column")
            yield _checked(row[text_column], f"{name}: row {i} of the shuffled stream, column {text_column!r}")
    return write_shards(texts(), out_dir, source=source, **shard_kwargs)


# -----------------------------------------------------------------------------

def already_built(out_dir, source):
    """True if out_dir holds a whole set of shards built from `source` (each one is opened, so a
    damaged shard stops here, named, with the fix). Shards from another source raise, with the fix."""
    manifest = read_manifest(out_dir)
    if manifest is None or manifest["source"] != source:
        return False
    for split in ("train", "val"):
        for path in list_shards(split, out_dir):
            open_shard(path)
    return True


def shard_count(text):
    """-n: a number of shards, or 'all' (None)."""
    if text == "all":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of shards >= 1, or 'all'")
    return int(text)


def main(argv=None):
    parser = ArgumentParser("python -m nanochat.dataset", __doc__)
    parser.add_argument("-n", "--num-shards", type=shard_count, default=8, metavar="N",
                        help=f"ClimbMix train shards to download (1 to {MAX_SHARD}, or 'all'), plus the val shard")
    parser.add_argument("-w", "--workers", type=int, default=8, help="parallel downloads")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--local", nargs="+", metavar="PATH",
                        help=".jsonl / .txt / .parquet files (or .jsonl.gz / .txt.gz) or directories")
    source.add_argument("--hf", metavar="NAME", help="Hugging Face dataset name or local path")
    source.add_argument("--demo", action="store_true", help="the small corpus shipped in nanochat/demo_data (offline)")
    parser.add_argument("--hf-config", default=None, help="dataset config (subset) name (default: none)")
    parser.add_argument("--hf-split", default="train", help="the dataset split to read (--hf)")
    parser.add_argument("--text-column", default="text", help="the column holding the documents (--hf)")
    parser.add_argument("--max-docs", type=int, default=None, help="stop after this many documents (--hf; default: all)")
    parser.add_argument("--docs-per-shard", type=int, default=50_000, help="train documents per shard")
    parser.add_argument("--val-docs", type=int, default=10_000,
                        help="documents in the val shard (at most a tenth of a --local / --demo corpus)")
    parser.add_argument("--row-group-size", type=int, default=None,
                        help=f"documents per row group (default: auto, at most {MAX_ROW_GROUP} and at least "
                             f"{MIN_ROW_GROUPS['train']} row groups per train shard, {MIN_ROW_GROUPS['val']} in "
                             f"the val shard, so that every data stream gets some)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the document shuffle (--local, --demo, --hf)")
    parser.add_argument("--out", default=None, metavar="DIR", help="output dir (default: $NANOCHAT_BASE_DIR/base_data)")
    args = parser.parse_args(argv)
    check(parser, [(value is not None and value < 1, f"{flag} {value}: must be >= 1") for flag, value in [
        ("--workers", args.workers), ("--max-docs", args.max_docs), ("--docs-per-shard", args.docs_per_shard),
        ("--val-docs", args.val_docs), ("--row-group-size", args.row_group_size)]])
    out_dir = args.out or get_data_dir()
    shard_kwargs = dict(docs_per_shard=args.docs_per_shard, val_docs=args.val_docs, row_group_size=args.row_group_size)
    if args.local or args.demo or args.hf:
        name = "demo" if args.demo else hf_source(args.hf, args.hf_config) if args.hf else local_source(args.local)
        if already_built(out_dir, name):  # a re-run (speedrun.sh after a preemption) keeps them
            print(f"data: shards already in {out_dir} (built from {name})")
            return 0
    if args.local or args.demo:
        paths = [DEMO_CORPUS] if args.demo else args.local
        build_local(paths, out_dir, seed=args.seed, source=name, **shard_kwargs)
    elif args.hf:
        build_hf(args.hf, out_dir, config=args.hf_config, split=args.hf_split, text_column=args.text_column,
                 max_docs=args.max_docs, seed=args.seed, **shard_kwargs)
    else:
        download(args.num_shards, out_dir, workers=args.workers)
    print(f"done: {len(list_shards('train', out_dir))} train shard(s) + 1 val shard in {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
