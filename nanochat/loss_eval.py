"""
Bits per byte: the validation loss in a unit that does not depend on the tokenizer.
A bigger vocab makes fewer, harder-to-predict tokens, so loss per token cannot compare two
tokenizers; loss per byte of the original text can: bpb = Σ nats / (ln 2 · Σ bytes).
"""
import math

import torch
import torch.distributed as dist

from nanochat.common import print0


@torch.no_grad()
def evaluate_bpb(model, batches, steps, token_bytes, return_tokens=False):
    """bpb over up to `steps` batches of (x, y) from `batches` (fewer if it runs out), summed over
    all ranks. Targets that are special tokens (0 bytes) or ignored (-1) count neither their loss
    nor their bytes. return_tokens: (bpb, tokens), tokens = the target positions evaluated."""
    device = token_bytes.device
    # nats, bytes, target positions: one tensor so that one all_reduce sums all three
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    for _, (x, y) in zip(range(steps), batches):
        loss = model(x, y, loss_reduction="none").view(-1).double()
        y = y.view(-1)
        target_bytes = torch.where(y >= 0, token_bytes[y.clamp(min=0)], 0)
        totals[0] += (loss * (target_bytes > 0)).sum()
        totals[1] += target_bytes.sum()
        totals[2] += (y >= 0).sum()
    if dist.is_initialized():
        dist.all_reduce(totals)
    nats, nbytes, tokens = totals.tolist()
    bpb = nats / (math.log(2) * max(1.0, nbytes))
    return (bpb, int(tokens)) if return_tokens else bpb


def evaluate_split(model, tokenizer, split, tokens, B, T, device, rank=0, world_size=1):
    """(bpb, tokens scored) over the first ~`tokens` tokens of a split (all ranks together), from
    a fresh loader, and never more than one pass: asking for more than the split holds scores the
    whole split once (and says so) instead of repeating documents. A small split may have fewer row
    groups than ranks: a rank without one scores nothing, the ranks with data score its share, and
    the all-reduced sums still give the right bpb."""
    from nanochat.dataloader import DataLoader
    loader = DataLoader(tokenizer, B, T, split, device, rank=rank, world_size=world_size, one_pass=True,
                        allow_empty=True)
    readers = min(world_size, max(loader.num_row_groups))  # ranks r < max row groups get some (round-robin)
    try:
        steps = max(1, tokens // (B * T * readers))
        bpb, scored = evaluate_bpb(model, loader, steps, tokenizer.token_bytes().to(device), return_tokens=True)
    finally:
        loader.close()
    if scored < steps * B * T * readers:
        print0(f"note: the {split} split holds only {scored:,} tokens in batches of {B}x{T}: bpb is over those "
               f"(one pass), not the {tokens:,} asked for")
    return bpb, scored


def evaluate_split_bpb(model, tokenizer, split, tokens, B, T, device, rank=0, world_size=1):
    """bpb only: evaluate_split without the token count."""
    return evaluate_split(model, tokenizer, split, tokens, B, T, device, rank, world_size)[0]
