"""The leaderboard record's packing rule, written plainly in a few lines, for tests to hold our
DataLoader (and the val bpb measured through it) against; and a tokenizer whose document lengths
are what a test writes."""
import numpy as np
import torch


class CharTokenizer:
    """One token per character (its code point), BOS = 0: document lengths are what the test writes."""
    bos_token_id = 0

    def __init__(self):
        self.enc = self

    def encode_to_numpy(self, text, disallowed_special=()):
        return np.array([ord(c) for c in text], dtype=np.uint32)

    def token_bytes(self):
        return torch.tensor([0] + [1] * 255)  # BOS counts no bytes


def record_rows(docs_by_row_group, rank, world, T, n_rows, bos=0):
    """The record's loader, written plainly from its rule: row groups rank, rank+W, ... in chunks of
    128 documents; before every placement the buffer is topped up to >= 1,000 documents; the
    largest document that fits (the first in on a tie), else the shortest cropped (the first in)."""
    def chunks():
        while True:
            for group in docs_by_row_group[rank::world]:
                for i in range(0, len(group), 128):
                    yield group[i:i + 128]
    stream, buffer, out = chunks(), [], []
    for _ in range(n_rows):
        row = []
        while len(row) < T + 1:
            while len(buffer) < 1000:
                buffer += [[bos] + [ord(c) for c in doc] for doc in next(stream)]
            room = T + 1 - len(row)
            fits = [i for i, doc in enumerate(buffer) if len(doc) <= room]
            i = max(fits, key=lambda i: (len(buffer[i]), -i)) if fits else \
                min(range(len(buffer)), key=lambda i: len(buffer[i]))
            row += buffer.pop(i)[:room]
        out.append(row)
    return out
