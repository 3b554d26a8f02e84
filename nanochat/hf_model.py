"""
Any Hugging Face causal LM behind the small interface our CORE and bpb code use, so a published
model can be scored by exactly the code that scores ours:

    pip install -e '.[hf]'
    python -m scripts.base_eval --hf-path openai-community/gpt2-xl   # GPT-2 1.5B: CORE 0.2565?

Re-deriving GPT-2's reference CORE this way, on your own GPU, is the check that our evaluator
and the one that produced the reference agree, before trusting the comparison.

What the eval code needs, and where it comes from here:
- model(idx) -> logits (B, T, V); model(idx, targets, loss_reduction) -> loss, ignoring -1
- model.config.sequence_len: the longest row the model takes (GPT-2: 1024 positions)
- tokenizer.encode(text, prepend=id), tokenizer.bos_token_id, tokenizer.enc.encode_to_numpy
  (the dataloader's fast path), tokenizer.token_bytes() (the bpb denominator)
The tokenizer is the model's own: scoring GPT-2 with our tokenizer would be meaningless, and
bits per byte stays comparable across tokenizers because bytes are counted with the model's
tokenizer.
"""
import os
import re
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.cli import BadInput, Unavailable
from nanochat.tokenizer import byte_level_alphabet


class HFModel(nn.Module):
    """A transformers causal LM with our model's call signature."""

    def __init__(self, hf_model):
        super().__init__()
        self.hf = hf_model
        cfg = hf_model.config
        seq_len = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
        if seq_len is None:
            raise BadInput(f"{type(hf_model).__name__}: its config gives no context length "
                           "(n_positions or max_position_embeddings)")
        self.config = SimpleNamespace(sequence_len=seq_len, vocab_size=cfg.vocab_size)

    def forward(self, idx, targets=None, loss_reduction="mean"):
        # No attention mask: our eval rows are right-padded, and a causal model's logits at real
        # positions never see the padding after them. On CUDA the fp32 weights run under bf16
        # autocast, as the leaderboard's evaluator runs them (its GPT-2 scores were measured so).
        with torch.autocast("cuda", torch.bfloat16, enabled=idx.is_cuda):
            logits = self.hf(input_ids=idx, use_cache=False).logits.float()
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-1, reduction=loss_reduction)


class HFTokenizer:
    """A transformers tokenizer with our tokenizer's methods."""

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        # Our rows start with the document-start token, as in training. GPT-2 has no BOS of its
        # own: <|endoftext|> (its eos, and its bos in transformers) is what it saw between documents.
        bos = hf_tokenizer.bos_token_id if hf_tokenizer.bos_token_id is not None else hf_tokenizer.eos_token_id
        if bos is None:
            raise BadInput(f"tokenizer {hf_tokenizer.name_or_path!r} has neither a bos nor an eos token")
        self.bos_token_id = bos
        self.hf.model_max_length = int(1e12)  # we crop rows ourselves: silence the length warning
        self.enc = self  # the dataloader calls tokenizer.enc.encode_to_numpy

    @property
    def vocab_size(self):
        return len(self.hf)

    def encode(self, text, prepend=None):
        """str -> list[int]; list[str] -> list[list[int]]. No special tokens are added but
        `prepend` (an id), and none are parsed out of the text."""
        if not isinstance(text, str):
            return [self.encode(t, prepend) for t in text]
        ids = self.hf.encode(text, add_special_tokens=False, split_special_tokens=True)
        return ([] if prepend is None else [prepend]) + ids

    def encode_to_numpy(self, text, disallowed_special=()):
        return np.array(self.encode(text), dtype=np.uint32)

    def decode(self, ids):
        return self.hf.decode(ids)

    def token_bytes(self):
        """UTF-8 byte length of every token id (0 for special tokens): the bpb denominator.
        A byte-level BPE token is one character per byte; a SentencePiece piece is its text
        with "▁" for a space, or a byte-fallback piece "<0xNN>" for one byte."""
        pieces = self.hf.convert_ids_to_tokens(list(range(len(self.hf))))
        special = set(self.hf.all_special_ids)
        alphabet = set(byte_level_alphabet().values())
        byte_level = all(set(p) <= alphabet for i, p in enumerate(pieces) if i not in special and p)
        lengths = []
        for i, piece in enumerate(pieces):
            if i in special or not piece:
                lengths.append(0)
            elif byte_level:
                lengths.append(len(piece))
            elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
                lengths.append(1)
            else:
                lengths.append(len(piece.replace("▁", " ").encode("utf-8")))
        return torch.tensor(lengths, dtype=torch.int32)


def load_hf_model(path, device):
    """(model, tokenizer) for a Hugging Face model id or local directory, fp32 weights on `device`."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise Unavailable("--hf-path needs transformers: pip install -e '.[hf]'") from None
    # a directory written by scripts.export brings its own model code: run it (a hub id's is not trusted)
    local_code = os.path.isdir(path) and os.path.exists(os.path.join(path, "modeling_nanochat.py"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=local_code)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInput(f"--hf-path {path}: {first} (a Hugging Face model id like "
                       f"openai-community/gpt2, or a local directory saved with save_pretrained)") from None
    model = HFModel(model.to(device=device, dtype=torch.float32))
    model.eval()
    return model, HFTokenizer(tokenizer)
