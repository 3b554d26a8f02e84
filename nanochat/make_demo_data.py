"""
Regenerate nanochat/demo_data/, the small dataset that ships inside the package so that
`bash speedrun.sh` runs end to end on a machine with no GPU and no network:

    corpus/web_dclm.jsonl.gz        780 web pages (DCLM repository, MIT)
    corpus/tinyshakespeare.txt.gz   1.1M characters of Shakespeare (public domain)
    eval_bundle/                    core.yaml, eval_meta_data.csv and the same 50 items of every
                                    task file (a fixed-seed random sample, so reruns are identical)

    python -m nanochat.make_demo_data --shared ../shared

Nothing at runtime needs this script; it exists so the shipped files can be rebuilt and checked.
Sources and licences are listed in demo_data/NOTICE.
"""
import gzip
import os
import random
import shutil
import sys

from nanochat.cli import ArgumentParser, check, run
from nanochat.dataset import DEMO_DIR

CORPUS_FILES = ["web_dclm.jsonl", "tinyshakespeare.txt"]  # not the WikiText file: CC BY-SA
ITEMS_PER_TASK = 50
SEED = 0


def write_gzip(src, dest):
    # mtime=0: the same input gives the same bytes, so a rebuild shows no diff in git
    with open(src, "rb") as f, open(dest, "wb") as raw, gzip.GzipFile(
            filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz:
        shutil.copyfileobj(f, gz)


def sample_lines(src, dest, k, seed):
    """The same k random lines of src on every run, kept in their original order."""
    with open(src, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    keep = sorted(random.Random(seed).sample(range(len(lines)), min(k, len(lines))))
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with open(dest, "w", encoding="utf-8") as f:
        f.writelines(lines[i] if lines[i].endswith("\n") else lines[i] + "\n" for i in keep)
    return len(keep), len(lines)


def make_demo_data(shared, out=DEMO_DIR, k=ITEMS_PER_TASK, seed=SEED):
    corpus = os.path.join(out, "corpus")
    os.makedirs(corpus, exist_ok=True)
    for name in CORPUS_FILES:
        write_gzip(os.path.join(shared, "corpus", name), os.path.join(corpus, name + ".gz"))
    src_bundle, bundle = os.path.join(shared, "eval_bundle"), os.path.join(out, "eval_bundle")
    shutil.rmtree(bundle, ignore_errors=True)
    os.makedirs(bundle)
    shutil.copyfile(os.path.join(src_bundle, "eval_meta_data.csv"), os.path.join(bundle, "eval_meta_data.csv"))
    with open(os.path.join(src_bundle, "core.yaml"), encoding="utf-8") as f:
        core_yaml = f.read()
    with open(os.path.join(bundle, "core.yaml"), "w", encoding="utf-8") as f:
        f.write(f"# nanochat demo bundle: {k} items per task file, sampled with seed {seed} "
                f"(nanochat/make_demo_data.py); not a comparable CORE score.\n" + core_yaml)
    data = os.path.join(src_bundle, "eval_data")
    for root, _, names in sorted(os.walk(data)):
        for name in sorted(n for n in names if n.endswith(".jsonl")):
            rel = os.path.relpath(os.path.join(root, name), data)
            kept, total = sample_lines(os.path.join(root, name), os.path.join(bundle, "eval_data", rel), k, seed)
            print(f"{rel}: {kept} of {total} items")
    print(f"wrote {out}")


def main(argv=None):
    parser = ArgumentParser("python -m nanochat.make_demo_data", __doc__)
    parser.add_argument("--shared", default="../shared", metavar="DIR", help="dir holding corpus/ and eval_bundle/")
    parser.add_argument("--out", default=DEMO_DIR, metavar="DIR", help="output dir")
    args = parser.parse_args(argv)
    needed = [os.path.join(args.shared, need) for need in ["corpus", "eval_bundle"]]
    check(parser, [(not os.path.isdir(path), f"{path} not found: pass --shared DIR") for path in needed])
    make_demo_data(args.shared, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
