"""
Byte-level BPE: trained with rustbpe (fast, parallel), run with tiktoken (fast, multithreaded).
Saved as one plain JSON file (the split regex, the merge ranks in base64, the special tokens),
never a pickle, so a tokenizer is inspectable and safe to load from anywhere.
"""
import base64
import hashlib
import json
import os

import tiktoken

from nanochat.cli import BadInput, Missing

# GPT-4's split pattern, except numbers are split into groups of 1-2 digits (not 1-3):
# a small vocab spends fewer slots on 3-digit numbers.
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""

# Specials get the last ids of the vocab; <|bos|> starts every document. The chat
# tokens are unused in pretraining but reserved now so the vocab never changes later.
SPECIAL_TOKENS = [
    "<|bos|>",
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",
    "<|output_start|>", "<|output_end|>",
]
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # every byte is a token, and the specials come on top


class Tokenizer:
    def __init__(self, ranks, pattern=SPLIT_PATTERN, special_tokens=SPECIAL_TOKENS, name="nanochat"):
        specials = {tok: len(ranks) + i for i, tok in enumerate(special_tokens)}
        self.enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
        self.bos_token_id = specials.get("<|bos|>")
        self.path = None  # the tokenizer.json it was loaded from or saved to, for messages

    def fingerprint(self):
        """A short hash of everything that maps text to ids: the split pattern, every merge rank
        and the special tokens with their ids. Stored in each checkpoint: a retrained tokenizer of
        the same vocab size gives other ids for the same text, which a model cannot notice."""
        h = hashlib.sha256(self.enc._pat_str.encode())
        for b, rank in sorted(self.enc._mergeable_ranks.items(), key=lambda kv: kv[1]):
            h.update(rank.to_bytes(4, "little") + len(b).to_bytes(4, "little") + b)
        for tok, i in sorted(self.enc._special_tokens.items(), key=lambda kv: kv[1]):
            h.update(f"\0{i}:{tok}".encode())
        return h.hexdigest()[:16]

    # --- training, saving, loading ---

    @classmethod
    def train(cls, texts, vocab_size, pattern=SPLIT_PATTERN):
        """Learn merges from an iterator of strings. vocab_size counts the specials too."""
        import rustbpe
        if vocab_size < MIN_VOCAB_SIZE:
            raise BadInput(f"--vocab-size {vocab_size} is too small: need at least {MIN_VOCAB_SIZE} "
                           f"(256 byte tokens + {len(SPECIAL_TOKENS)} specials)")
        num_merges_vocab = vocab_size - len(SPECIAL_TOKENS)
        bpe = rustbpe.Tokenizer()
        bpe.train_from_iterator(texts, num_merges_vocab, pattern=pattern)
        ranks = {bytes(b): rank for b, rank in bpe.get_mergeable_ranks()}
        if len(ranks) < num_merges_vocab:  # rustbpe stops early when no pair is left to merge
            raise BadInput(f"the training text ran out of pairs to merge at {len(ranks) + len(SPECIAL_TOKENS)} "
                           f"tokens, short of --vocab-size {vocab_size}: use more text (--max-chars, more "
                           f"shards) or a smaller --vocab-size")
        return cls(ranks, pattern)

    def save(self, directory):
        from nanochat.common import atomic_write
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "tokenizer.json")
        ranks = sorted(self.enc._mergeable_ranks.items(), key=lambda kv: kv[1])
        data = {
            "pattern": self.enc._pat_str,
            "special_tokens": list(self.enc._special_tokens),  # in id order
            "tokens": [base64.b64encode(b).decode("ascii") for b, _ in ranks],  # index = rank
        }
        with atomic_write(path) as tmp, open(tmp, "w") as f:
            json.dump(data, f)
        self.path = path
        return path

    @classmethod
    def load(cls, directory):
        path = os.path.join(directory, "tokenizer.json")
        if not os.path.exists(path):
            raise Missing(f"no tokenizer at {path}; train one with: python -m scripts.tok_train")
        try:
            with open(path) as f:
                data = json.load(f)
            ranks = {base64.b64decode(t): i for i, t in enumerate(data["tokens"])}
            tokenizer = cls(ranks, data["pattern"], data["special_tokens"])
        except (ValueError, KeyError, TypeError) as e:  # bad JSON, UTF-8 or base64, a missing field
            raise BadInput(f"{path} is corrupt ({type(e).__name__}): retrain it with python -m scripts.tok_train "
                           f"(a model trained with the old tokenizer needs that exact file back)") from None
        tokenizer.path = path
        return tokenizer

    @classmethod
    def from_tiktoken_file(cls, path, pattern, special_tokens=("<|endoftext|>",), name=None):
        """A reference tokenizer (GPT-2, cl100k) from a local `.tiktoken` ranks file."""
        from tiktoken.load import load_tiktoken_bpe
        return cls(load_tiktoken_bpe(path), pattern, list(special_tokens), name or os.path.basename(path))

    # --- using it ---

    @property
    def vocab_size(self):
        return self.enc.n_vocab

    def encode_special(self, token):
        return self.enc.encode_single_token(token)

    def encode(self, text, prepend=None, num_threads=8):
        """str -> list[int]; list[str] -> list[list[int]] (tokenized in parallel threads).
        Special-token strings in the text are encoded as plain text, never as specials."""
        prefix = [] if prepend is None else [prepend if isinstance(prepend, int) else self.encode_special(prepend)]
        if isinstance(text, str):
            return prefix + self.enc.encode_ordinary(text)
        ids = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
        return [prefix + row for row in ids] if prefix else ids

    def decode(self, ids):
        return self.enc.decode(ids)

    def token_bytes(self):
        """UTF-8 byte length of every token id (0 for specials): the denominator of bits per byte."""
        import torch
        lengths = [0] * self.vocab_size
        for b, rank in self.enc._mergeable_ranks.items():
            lengths[rank] = len(b)
        return torch.tensor(lengths, dtype=torch.int32)


def byte_level_alphabet():
    """GPT-2's map from the 256 bytes to printable characters, in which byte-level BPE vocabularies
    (Hugging Face's tokenizers) are written: printable Latin-1 stands for itself, every other byte
    is shifted to U+0100 and up, in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    chars, shifted = {}, 0
    for b in range(256):
        chars[b] = chr(b) if b in printable else chr(256 + shifted)
        shifted += b not in printable
    return chars


def get_tokenizer_dir():
    from nanochat.common import get_base_dir
    return os.path.join(get_base_dir(), "tokenizer")


def get_tokenizer():
    return Tokenizer.load(get_tokenizer_dir())
