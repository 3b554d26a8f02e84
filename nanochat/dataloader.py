"""
The pretraining dataloader: parquet shards of raw text in, (inputs, targets) batches out.

Every row of a batch is T+1 tokens of whole documents, each starting with <|bos|>,
packed best-fit: keep a buffer of at least 1,000 tokenized documents, and fill each row by
repeatedly taking the largest buffered document that still fits; when none fits, crop
the shortest one to fill the row exactly. There is no padding (every token trains), and
no row ever starts mid-document. The cost is the cropped tail of those last documents,
reported as `crop_fraction` (~35% of tokens at T=2048 on web text).

The details follow the leaderboard record's loader exactly, because its val bpb is measured
through it: the same rule must pick the same tokens. Before every placement the buffer is topped
up to 1,000 documents, 128 at a time (documents i..i+127 of a row group, i a multiple of 128); a
tie between equally long documents goes to the one that entered the buffer first, for the best
fit and for the crop alike; the stream starts over when the shards are used up.

The rank's documents form one fixed stream: epoch by epoch, shard by shard, row groups
rank, rank+W, rank+2W, ... of each shard, documents in file order. Every document is named
by its place in that stream, (epoch, shard, row group, doc), so the loader's whole state is
"where the stream is" plus "which documents sit in the buffer": a few KB, from which
load_state_dict() rebuilds the buffer and resumes with exactly the batches that the
uninterrupted loader would have produced.

Row groups are read and tokenized ahead of the packer in a background thread (tiktoken
releases the GIL while it encodes, so it runs beside the training loop); the packer only
ever takes results that are, in steady state, already there. One thread tokenizes ~3M
tokens/s, ~25x what an H100 consumes; more threads mostly fight over the GIL.
"""
import bisect
import itertools
import os
import random
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from nanochat.cli import BadInput
from nanochat.shards import list_shards, open_shard, read_row_group

CHUNK = 128  # documents added to the buffer at a time, as the record's loader tokenizes them


class DataLoader:
    def __init__(self, tokenizer, B, T, split, device="cpu", rank=0, world_size=1,
                 data_dir=None, buffer_size=1000, prefetch=8, threads=1, allow_empty=False, seed=None):
        self.tokenizer, self.B, self.T, self.split, self.seed = tokenizer, B, T, split, seed
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        self.buffer_size, self.prefetch = buffer_size, prefetch
        self.threads = threads
        self.bos = tokenizer.bos_token_id
        self.paths = list_shards(split, data_dir)
        self.num_row_groups = [open_shard(p).num_row_groups for p in self.paths]  # fails early on a bad shard
        # Evaluation may leave a rank without a row group (allow_empty: it yields no batch and adds
        # zero to the all-reduced sums); a training stream without one would have nothing to train on.
        self.empty = all(n <= rank for n in self.num_row_groups)
        if self.empty and not allow_empty:
            # base_train runs processes × micro-steps streams: each needs a row group of its own
            raise BadInput(f"data stream {rank} of {world_size} gets no row group of the {split!r} shards "
                           f"({sum(self.num_row_groups)} row groups in {len(self.paths)} shards; a training run "
                           f"reads processes × gradient-accumulation micro-steps streams): lower --total-batch-size "
                           f"or raise --device-batch-size (fewer micro-steps), or rebuild the shards with a "
                           f"smaller --row-group-size (python -m nanochat.dataset --local ... --row-group-size 64)")
        self.buffer = []           # (length, seq, docid, tokens), sorted: best-fit is a bisect
        self.pending = deque()     # (docid, tokens) tokenized but not yet in the buffer, in stream order
        self.cursor = (0, *self._stream_order(0)[0], 0) if not self.empty else None  # docid of the next document
        self.seq = 0
        self.epoch = 0  # of the newest document packed: > 0 once the stream has started over
        self.tokens_seen = self.tokens_cropped = 0
        self.stream = None  # row groups still to read; None until the first batch (or after a restore)
        # CUDA: a small ring of pinned host buffers; each is refilled only after the
        # non-blocking copy out of it has finished (its event), never while in flight.
        self.pinned = self.device.type == "cuda"
        if self.pinned:
            self.host = [torch.empty(B, T + 1, dtype=torch.int32, pin_memory=True) for _ in range(3)]
            self.copied = [None] * len(self.host)
            self.step = 0

    # --- the document stream (read and tokenized in background threads) ---

    def _stream_order(self, epoch):
        """This stream's row groups, (shard, row group), in the order an epoch reads them: shard by
        shard, rank, rank+W, ... (the record's order); with a seed, that list shuffled by (seed,
        epoch), so that runs that differ only in their seed see the documents in other orders."""
        order = [(s, g) for s in range(len(self.paths))
                 for g in range(self.rank, self.num_row_groups[s], self.world_size)]
        if self.seed is not None:
            random.Random(f"{self.seed}-{epoch}").shuffle(order)
        return order

    def _row_groups(self, start):
        """Row groups of this rank from `start` on, forever (epoch after epoch); none if the rank has none."""
        if self.empty:
            return
        epoch, shard, rg, doc = start
        order = self._stream_order(epoch)
        for s, g in order[order.index((shard, rg)):]:
            yield epoch, s, g, doc
            doc = 0
        for epoch in itertools.count(epoch + 1):
            for s, g in self._stream_order(epoch):
                yield epoch, s, g, 0

    def _tokenize(self, shard, rg, first=0, only=None):
        """[(doc index, tokens)] for docs `first`.. of a row group (or just those in `only`)."""
        texts = read_row_group(self.paths[shard], rg)  # opens its own reader: threads never share one
        encode = self.tokenizer.enc.encode_to_numpy  # numpy out: no Python int per token
        return [(i, encode(texts[i], disallowed_special=())) for i in (only or range(first, len(texts)))]

    def _next_doc(self):
        """The next (docid, tokens) of the stream; None if the rank has no row group."""
        while not self.pending:
            if self.stream is None:  # (re)start reading ahead from the cursor
                self.pool = ThreadPoolExecutor(self.threads)
                self.stream = self._row_groups(self.cursor)
                self.inflight = deque()
            for epoch, s, g, doc in itertools.islice(self.stream, self.prefetch - len(self.inflight)):
                self.inflight.append(((epoch, s, g), self.pool.submit(self._tokenize, s, g, doc)))
            if not self.inflight:
                return None
            rg, future = self.inflight.popleft()
            try:
                docs = future.result()  # a bad shard's error surfaces here, in the training loop
            except Exception:
                self.close()  # stop reading ahead; a retry restarts at the cursor and fails the same way
                raise
            self.pending.extend((rg + (i,), tokens) for i, tokens in docs)
        docid, tokens = self.pending.popleft()
        self.cursor = docid[:3] + (docid[3] + 1,)
        return docid, tokens

    def close(self):
        if self.stream is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.stream = None

    # --- best-fit packing (main thread) ---

    def _add(self, docid, tokens):
        bisect.insort(self.buffer, (len(tokens) + 1, self.seq, docid, tokens))  # +1 for the BOS
        self.seq += 1

    def _refill(self):
        """Top the buffer up to buffer_size documents, a chunk (up to the next multiple of CHUNK
        documents of the row group) at a time."""
        while len(self.buffer) < self.buffer_size and (doc := self._next_doc()):
            self._add(*doc)
            while self.pending and self.pending[0][0][3] % CHUNK:  # pending holds the rest of a row group
                self._add(*self._next_doc())

    def _fill_row(self, row):
        pos, n = 0, len(row)
        while pos < n:
            self._refill()
            if not self.buffer:
                raise StopIteration  # a rank without a row group (evaluation only)
            room = n - pos
            # the largest length that fits (else the shortest), and of that length the oldest
            i = max(0, bisect.bisect_right(self.buffer, (room, float("inf"))) - 1)
            i = bisect.bisect_left(self.buffer, (self.buffer[i][0],))
            length, _, docid, tokens = self.buffer.pop(i)
            self.epoch = max(self.epoch, docid[0])
            take = min(length, room)
            row[pos] = self.bos
            row[pos + 1:pos + take] = tokens[:take - 1]
            pos += take
            self.tokens_seen += length
            self.tokens_cropped += length - take

    def _next_batch(self, out):
        for row in out:
            self._fill_row(row)
        return out

    def __iter__(self):
        return self

    def __next__(self):
        if not self.pinned:
            # numpy does the int64 copies: torch's intra-op threads would fight the tokenizer threads
            batch = self._next_batch(np.empty((self.B, self.T + 1), dtype=np.int64))
            return torch.from_numpy(batch[:, :-1].copy()), torch.from_numpy(batch[:, 1:].copy())
        slot = self.step % len(self.host)
        self.step += 1
        if self.copied[slot] is not None:
            self.copied[slot].synchronize()  # the copy that last read this buffer is done
        self._next_batch(self.host[slot].numpy())
        batch = self.host[slot].to(self.device, non_blocking=True)
        self.copied[slot] = torch.cuda.Event()
        self.copied[slot].record()
        batch = batch.long()
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    @property
    def crop_fraction(self):
        """Share of the tokens taken from documents that were cropped away (not trained on)."""
        return self.tokens_cropped / max(1, self.tokens_seen)

    # --- exact resume ---

    def state_dict(self):
        return {
            "cursor": list(self.cursor),
            "buffer": [list(docid) for _, _, docid, _ in self.buffer],  # in (length, age) order
            "tokens_seen": self.tokens_seen, "tokens_cropped": self.tokens_cropped,
            "rank": self.rank, "world_size": self.world_size, "split": self.split, "seed": self.seed,
            "shards": [os.path.basename(p) for p in self.paths],  # docids index into this list
        }

    def load_state_dict(self, state):
        if (state["rank"], state["world_size"], state["split"]) != (self.rank, self.world_size, self.split):
            raise BadInput(f"dataloader state is for rank {state['rank']}/{state['world_size']} "
                           f"split {state['split']!r}, not rank {self.rank}/{self.world_size} {self.split!r}")
        if state.get("seed") != self.seed:
            raise BadInput(f"the checkpoint's data streams were read in the order of --seed {state.get('seed')}, "
                           f"not {self.seed}: resume with the run's --seed")
        shards = [os.path.basename(p) for p in self.paths]
        if state["shards"] != shards:
            raise BadInput(f"dataloader state was saved over {len(state['shards'])} {self.split} shards "
                           f"({state['shards'][0]}..{state['shards'][-1]}) but {os.path.dirname(self.paths[0])} "
                           f"now holds {len(shards)}: resume with the same shards")
        self.close()
        self.pending.clear()
        self.buffer, self.seq = [], 0
        # Re-tokenize the buffered documents, one read per row group they came from.
        docids = [tuple(d) for d in state["buffer"]]
        tokens = {}
        for (epoch, s, g), group in itertools.groupby(sorted(docids), key=lambda d: d[:3]):
            for i, toks in self._tokenize(s, g, only=[d[3] for d in group]):
                tokens[(epoch, s, g, i)] = toks
        for docid in docids:
            self._add(docid, tokens[docid])
        self.cursor = tuple(state["cursor"])
        self.tokens_seen, self.tokens_cropped = state["tokens_seen"], state["tokens_cropped"]


class StepLoader:
    """The batches of one optimizer step on one rank: one from each of its `accum` data streams,
    one per gradient-accumulation micro-step. Stream (rank, a) is DataLoader rank*accum + a of
    world*accum, so the global batch is the same for any split of processes × micro-steps: 8 GPUs
    with accum 1 see exactly the batches of 1 GPU with accum 8 (and a checkpoint resumes on either)."""

    def __init__(self, tokenizer, B, T, split, device, rank, world, accum, seed=None):
        self.streams = [DataLoader(tokenizer, B, T, split, device, rank=rank * accum + a, world_size=world * accum,
                                   seed=seed) for a in range(accum)]

    def __iter__(self):
        return self

    def __next__(self):
        """[(x, y)] of the step's micro-steps, each (B, T)."""
        return [next(stream) for stream in self.streams]

    def state_dict(self):
        return [stream.state_dict() for stream in self.streams]

    def close(self):
        for stream in self.streams:
            stream.close()
