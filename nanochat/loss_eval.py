"""
Bits per byte: the validation loss in a unit that does not depend on the tokenizer.
A bigger vocab makes fewer, harder-to-predict tokens, so loss per token cannot compare two
tokenizers; loss per byte of the original text can: bpb = Σ nats / (ln 2 · Σ bytes).
"""
import math

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate_bpb(model, batches, steps, token_bytes):
    """bpb over `steps` batches of (x, y) from `batches`, summed over all ranks. Targets that
    are special tokens (0 bytes) or ignored (-1) count neither their loss nor their bytes."""
    device = token_bytes.device
    nats = torch.zeros((), dtype=torch.float64, device=device)
    nbytes = torch.zeros((), dtype=torch.int64, device=device)
    for _ in range(steps):
        x, y = next(batches)
        loss = model(x, y, loss_reduction="none").view(-1).double()
        y = y.view(-1)
        target_bytes = torch.where(y >= 0, token_bytes[y.clamp(min=0)], 0)
        nats += (loss * (target_bytes > 0)).sum()
        nbytes += target_bytes.sum()
    if dist.is_initialized():
        dist.all_reduce(nats)
        dist.all_reduce(nbytes)
    return nats.item() / (math.log(2) * max(1, nbytes.item()))


def evaluate_split_bpb(model, tokenizer, split, tokens, B, T, device, rank=0, world_size=1):
    """bpb over the first ~`tokens` tokens of a split (all ranks together), from a fresh loader."""
    from nanochat.dataloader import DataLoader
    loader = DataLoader(tokenizer, B, T, split, device, rank=rank, world_size=world_size)
    try:
        steps = max(1, tokens // (B * T * world_size))
        return evaluate_bpb(model, loader, steps, tokenizer.token_bytes().to(device))
    finally:
        loader.close()
