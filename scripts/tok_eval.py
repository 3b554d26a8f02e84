"""
Compression of our tokenizer against GPT-2's and GPT-4's (cl100k): UTF-8 bytes per token
on training and validation text. More bytes per token = shorter sequences = more text per
training step. The reference tokenizers are used only if a copy is available offline: pass
--gpt2/--cl100k a `.tiktoken` ranks file, or have it in tiktoken's cache (TIKTOKEN_CACHE_DIR).

    python -m scripts.tok_eval --gpt2 path/to/gpt2.tiktoken
"""
import hashlib
import os
import sys
import tempfile

from nanochat.cli import ArgumentParser, Missing, run
from nanochat.checkpoint import save_json
from nanochat.shards import iter_documents
from nanochat.tokenizer import Tokenizer, get_tokenizer, get_tokenizer_dir

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
CL100K_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
REFERENCES = {  # name: (tiktoken's download URL, which names its cache file; split pattern)
    "gpt2": ("https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken", GPT2_PATTERN),
    "cl100k": ("https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken", CL100K_PATTERN),
}


def find_reference(name, path=None):
    """A reference tokenizer from a local file or tiktoken's cache, never the network; else None."""
    url, pattern = REFERENCES[name]
    if path is None:
        cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "data-gym-cache")
        path = os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest())
    elif not os.path.exists(path):
        raise Missing(f"--{name} {path}: no such file")
    return Tokenizer.from_tiktoken_file(path, pattern, name=name) if os.path.exists(path) else None


def sample_text(split, max_chars):
    docs, n = [], 0
    for text in iter_documents(split):
        docs.append(text)
        n += len(text)
        if n >= max_chars:
            break
    return docs


def main(argv=None):
    parser = ArgumentParser("python -m scripts.tok_eval", __doc__)
    parser.add_argument("--gpt2", metavar="FILE",
                        help="GPT-2 ranks file, r50k_base .tiktoken (default: tiktoken's cache, else skipped)")
    parser.add_argument("--cl100k", metavar="FILE",
                        help="GPT-4 ranks file, cl100k_base .tiktoken (default: tiktoken's cache, else skipped)")
    parser.add_argument("--max-chars", type=int, default=10_000_000, help="characters of text per split")
    args = parser.parse_args(argv)

    texts = {split: sample_text(split, args.max_chars) for split in ("train", "val")}
    nbytes = {split: sum(len(t.encode("utf-8")) for t in docs) for split, docs in texts.items()}
    tokenizers = {"ours": get_tokenizer(), "gpt2": find_reference("gpt2", args.gpt2),
                  "cl100k": find_reference("cl100k", args.cl100k)}

    print(f"UTF-8 bytes per token (train: {nbytes['train']:,} bytes, val: {nbytes['val']:,} bytes)")
    print(f"{'tokenizer':<10} {'vocab':>8} {'train':>7} {'val':>7}  {'val tokens vs gpt2':>18}")
    counts = {name: {split: sum(map(len, tok.encode(docs))) for split, docs in texts.items()}
              for name, tok in tokenizers.items() if tok is not None}
    for name, tok in tokenizers.items():
        if tok is None:
            print(f"{name:<10} {'-':>8} {'-':>7} {'-':>7}  skipped: no offline copy (pass --{name} FILE "
                  f"or set TIKTOKEN_CACHE_DIR)")
            continue
        ratio = {split: nbytes[split] / max(1, counts[name][split]) for split in texts}
        vs = f"{counts[name]['val'] / counts['gpt2']['val'] - 1:+.1%}" if "gpt2" in counts else "-"
        print(f"{name:<10} {tok.vocab_size:>8,} {ratio['train']:>7.2f} {ratio['val']:>7.2f}  {vs:>18}")
    save_json(os.path.join(get_tokenizer_dir(), "tok_eval.json"), {  # for the report
        "bytes": nbytes, "tokens": counts, "vocab": {name: tokenizers[name].vocab_size for name in counts}})
    return counts


if __name__ == "__main__":
    sys.exit(run(main))
