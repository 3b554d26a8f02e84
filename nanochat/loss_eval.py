"""
Bits per byte: the validation loss in a unit that does not depend on the tokenizer.
A bigger vocab makes fewer, harder-to-predict tokens, so loss per token cannot compare two
tokenizers; loss per byte of the original text can: bpb = Σ nats / (ln 2 · Σ bytes).
"""
import math

import torch
import torch.distributed as dist

from nanochat.common import any_rank, print0


@torch.no_grad()
def evaluate_bpb(model, batches, steps, token_bytes, return_tokens=False, should_stop=None):
    """bpb over up to `steps` batches of (x, y) from `batches` (fewer if it runs out), summed over
    all ranks. Targets that are special tokens (0 bytes) or ignored (-1) count neither their loss
    nor their bytes. return_tokens: (bpb, tokens), tokens = the target positions evaluated.
    should_stop: a callable checked before every batch (a stop signal must not wait for a long
    evaluation); when it is true on any rank, all ranks give up and bpb is None."""
    device = token_bytes.device
    # nats, bytes, target positions: one tensor so that one all_reduce sums all three
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    batches, stopped = iter(batches), False
    for _ in range(steps):
        batch = next(batches, None)
        if should_stop is not None:
            # every batch, the ranks agree: stop? anyone still has a batch? (one tiny collective;
            # a rank whose share ran out keeps answering until all have)
            stopped, anyone_has_batch = any_rank((bool(should_stop()), batch is not None), device)
            if stopped or not anyone_has_batch:
                break
        elif batch is None:
            break
        if batch is None:
            continue  # this rank's share ran out, another's has not
        x, y = batch
        loss = model(x, y, loss_reduction="none").view(-1).double()
        y = y.view(-1)
        target_bytes = torch.where(y >= 0, token_bytes[y.clamp(min=0)], 0)
        totals[0] += (loss * (target_bytes > 0)).sum()
        totals[1] += target_bytes.sum()
        totals[2] += (y >= 0).sum()
    if dist.is_initialized():
        dist.all_reduce(totals)
    nats, nbytes, tokens = totals.tolist()
    bpb = None if stopped else nats / (math.log(2) * max(1.0, nbytes))
    return (bpb, int(tokens)) if return_tokens else bpb


def evaluate_split(model, tokenizer, split, tokens, B, T, device, rank=0, world_size=1, should_stop=None,
                   data_dir=None):
    """(bpb, tokens scored) over `tokens` tokens of a split, all ranks together, measured as the
    leaderboard's evaluation measures val bpb: a fresh loader packs rows from the split's start with
    the training rule, each rank scores tokens // (B × T × ranks) batches of them (at least one), and
    a split too small for that is read again from its start (the note says so). A small split may
    have fewer row groups than ranks: a rank without one scores nothing, and the all-reduced sums
    still give the bpb of what the others scored (the note says how much). should_stop: as in
    evaluate_bpb (bpb None when it stopped the evaluation)."""
    from nanochat.dataloader import DataLoader
    loader = DataLoader(tokenizer, B, T, split, device, rank=rank, world_size=world_size, data_dir=data_dir,
                        allow_empty=True)
    steps = max(1, tokens // (B * T * world_size))
    try:
        bpb, scored = evaluate_bpb(model, loader, steps, tokenizer.token_bytes().to(device), return_tokens=True,
                                   should_stop=should_stop)
        repeated = any_rank(loader.epoch > 0, device)
    finally:
        loader.close()
    if bpb is not None and repeated:
        print0(f"note: the {split} split is small for {scored:,} tokens: its documents were read again from the "
               f"start, and some were scored twice, as the leaderboard's evaluation does")
    if bpb is not None and scored < steps * B * T * world_size:
        print0(f"note: some of the {world_size} ranks hold no row group of the {split} split: bpb is over the "
               f"{scored:,} tokens the others scored, not {steps * B * T * world_size:,}")
    return bpb, scored
