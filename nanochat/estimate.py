"""
What a training run will cost, estimated before anything runs: the memory it needs per GPU (or in
RAM on a CPU), so that plan can pick a device batch and base_train can refuse a run that cannot
fit instead of growing until the out-of-memory killer takes the machine; and its time and money
on a given number and kind of GPUs (plan, sweep).

Weights, gradients and optimizer state are counted; the activations are what the compiled model
saves for backward, MEASURED on small models and scaled (see below); allocator overhead,
fragmentation and temporaries other than the logits' gradient are covered only by a margin.
"""
import functools
import math
import os
from collections import defaultdict

import torch
import torch.nn as nn

from nanochat.cli import Unavailable
from nanochat.common import PEAK_BF16_FLOPS
from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import SHARD_MIN_NUMEL

SAFETY = 0.9  # use at most 90% of the device's memory
# --gpu name -> (key in nanochat.common.PEAK_BF16_FLOPS, memory in GB = 1e9 bytes)
GPUS = {
    "h100": ("H100", 80), "h200": ("H200", 141), "h20": ("H20", 96), "b200": ("B200", 180),
    "a100": ("A100", 80), "a100-40gb": ("A100", 40), "a40": ("A40", 48), "l40s": ("L40S", 48), "l40": ("L40", 48),
    "l4": ("L4", 24), "rtx6000ada": ("RTX 6000 Ada", 48), "a6000": ("RTX A6000", 48),
    "5090": ("RTX 5090", 32), "4090": ("RTX 4090", 24), "4080": ("RTX 4080", 16), "3090": ("RTX 3090", 24),
}
# MFU measured on a GPU kind, at a depth and precision (fp8 or not): docs/PERF.md has each with its
# command. One GPU, the whole optimizer on it, d24 at 16 x 2048 compiled with FlexAttention, and d12
# in base_train. The fp8 figure had lm_head in bf16 (--fp8 now runs it in fp8 too: likely a bit
# low). Other GPUs and runs assume 45 %: below the fp8 figure because an H100 has less memory
# bandwidth for the elementwise kernels and an 8-GPU run adds communication (unmeasured), above the
# bf16 one because 8 GPUs shard the optimizer.
MEASURED_MFU = {("H200", 24, True): 0.491, ("H200", 24, False): 0.420, ("H200", 12, False): 0.386}
DEFAULT_MFU = 0.45

# Activations are MEASURED, not counted by hand: what the compiled model saves for backward depends on
# what the compiler fuses and recomputes. measure_saved_bytes() compiles small models on the CPU with
# the partitioner inductor uses (the "aot_eager_decomp_partition" backend: inductor's decompositions
# and min-cut rematerialization, without generating kernels) and records every tensor the compiled
# forward saves. Every saved per-token tensor is C, 4C or n_head wide, so the bytes per token per
# layer grow exactly with the width at a fixed head_dim; outside the blocks they grow with C and V.
PROBE_WIDTH, PROBE_VOCABS, PROBE_B, PROBE_T = 256, (512, 1024), 3, 40  # T, B: no model dim equals them
# The backward's largest temporary (not saved, so not measured): the fp32 gradient of the logits.
LOGIT_GRAD_BYTES_PER_VOCAB = 4


def saved_for_backward(config, B=PROBE_B, T=PROBE_T, compiled=True):
    """(bytes per token, other bytes) of the tensors that the compiled model (bf16, on the CPU) saves
    for backward: each storage once, the parameters themselves not (they exist anyway). Per token:
    the tensors with a B×T or T dimension; the rest are copies such as the bf16 casts of weights.
    compiled=False: the eager fp32 model instead, as a CPU run trains it."""
    import torch._dynamo
    from unittest import mock
    from nanochat.gpt import build_model
    with mock.patch.dict(os.environ, NANOCHAT_DTYPE="bf16" if compiled else "fp32"):
        torch.manual_seed(0)
        model = build_model(config, "cpu")
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    per_token, other = {}, {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            (per_token if T in t.shape or B * T in t.shape else other)[ptr] = t.untyped_storage().nbytes()
        return t

    idx = torch.randint(0, config.vocab_size, (B, T))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            (torch.compile(model, backend="aot_eager_decomp_partition") if compiled else model)(idx, idx)
    finally:
        torch._dynamo.reset()
    return sum(per_token.values()) / (B * T), sum(other.values())


@functools.lru_cache
def measure_saved_bytes(head_dim, window_pattern):
    """Saved-for-backward bytes of the compiled model per token: (per layer per n_embd element,
    outside the blocks per n_embd element, per vocab entry), and (bytes per matmul weight element),
    from three small models: depth 2 and 4 (their difference is two layers: one with a value
    embedding, one without, as alternating layers have) and a second vocab size."""
    C, (V1, V2) = PROBE_WIDTH, PROBE_VOCABS
    cfg = lambda L, V: GPTConfig(sequence_len=PROBE_T * 2, vocab_size=V, n_layer=L, n_head=C // head_dim,  # noqa: E731
                                 n_embd=C, window_pattern=window_pattern)
    (s2, w2), (s4, _), (s2v, _) = [saved_for_backward(cfg(L, V)) for L, V in ((2, V1), (4, V1), (2, V2))]
    per_layer = (s4 - s2) / 2
    per_vocab = (s2v - s2) / (V2 - V1)
    with torch.device("meta"):
        matmul = sum(m.weight.numel() for m in GPT(cfg(2, V1)).modules() if isinstance(m, nn.Linear))
    return per_layer / C, (s2 - 2 * per_layer - per_vocab * V1) / C, per_vocab, w2 / matmul


# measure_saved_bytes() at the default head_dim and windows, recorded (torch 2.13.0) so that plan
# answers at once instead of compiling for ~20 s, also on the GPU node where speedrun.sh runs it;
# tests/test_plan.py re-measures it, so a torch whose compiler saves otherwise fails there.
RECORDED_SAVED_BYTES = {(128, "SSSL"): (39.1328125, 8.1015625, 2.0, 2.000002347439882)}


# What the uncompiled fp32 model (a CPU run) saves, measured the same way but without the compiler at
# the default head_dim and windows: about twice the compiled bf16 graph per layer, four times per
# vocab entry (the logits in fp32), and no bf16 copies of the weights. Head dim 64 with full windows
# measured within 0.2 % of it per layer.
EAGER_FP32_SAVED_BYTES = (76.15625, 28.09375, 8.0, 0.0)


def saved_bytes(head_dim, window_pattern):
    """measure_saved_bytes(), from the record where there is one."""
    return RECORDED_SAVED_BYTES.get((head_dim, window_pattern)) or measure_saved_bytes(head_dim, window_pattern)


def memory_estimate(model, device_batch_size, gpus, saved=None):
    """Estimated peak bytes per GPU for one micro-step of device_batch_size × seq_len tokens.
    saved: the saved-for-backward bytes to use (default: the compiled bf16 graph's, measured)."""
    cfg, W = model.config, gpus
    block_params = {id(p) for p in model.blocks.parameters()}
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    weights = grads = adamw = 0
    for p in model.parameters():
        nbytes = p.numel() * (2 if id(p) in embeddings else 4)  # embeddings bf16; Linear weights, scalars fp32
        weights += nbytes
        grads += nbytes  # a gradient has its parameter's dtype
        if id(p) not in block_params:  # AdamW: exp_avg + exp_avg_sq in fp32, sharded if large enough
            sharded = W > 1 and p.numel() >= SHARD_MIN_NUMEL
            adamw += 2 * 4 * (math.ceil(p.size(0) / W) * p[0].numel() if sharded and p.dim() > 0 else p.numel())
    # Muon: matrices of one shape are handled W at a time, each rank owning whole matrices:
    # ceil(n / W) fp32 momentum buffers per shape, plus the NorMuon factor (one per row or column)
    by_shape = defaultdict(int)
    for p in model.blocks.parameters():
        by_shape[tuple(p.shape)] += 1
    muon = sum(math.ceil(n / W) * 4 * (m * k + (m if m >= k else k)) for (m, k), n in by_shape.items())
    tokens = device_batch_size * cfg.sequence_len
    per_layer, outside, per_vocab, per_weight = saved or saved_bytes(cfg.head_dim, cfg.window_pattern)
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    activations = tokens * (cfg.n_embd * (per_layer * cfg.n_layer + outside) + per_vocab * cfg.vocab_size)
    parts = dict(weights=weights, grads=grads, adamw_state=adamw, muon_state=muon, activations=activations,
                 weight_copies=per_weight * matmul,  # the bf16 casts of the fp32 weights, saved for backward
                 logits_grad=tokens * LOGIT_GRAD_BYTES_PER_VOCAB * cfg.vocab_size)
    parts["total"] = sum(parts.values())
    return parts


# -----------------------------------------------------------------------------
# base_train's check, before it allocates anything

def device_memory(device):
    """Bytes the run can use: the GPU's memory, or the machine's RAM (within a cgroup's limit)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        ram = min(ram, int(limit)) if limit.isdigit() else ram
    except OSError:
        pass
    return ram


def run_estimate(config, device_batch_size, processes, device):
    """Estimated bytes one device needs: per GPU, or on a CPU for all the processes sharing its RAM
    (torchrun's LOCAL_WORLD_SIZE), uncompiled in fp32 there."""
    with torch.device("meta"):
        model = GPT(config)
    if device.type == "cuda":
        return memory_estimate(model, device_batch_size, processes)["total"]
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return local * memory_estimate(model, device_batch_size, processes, EAGER_FP32_SAVED_BYTES)["total"]


def check_fits(config, device_batch_size, processes, device):
    """Refuse a run whose estimate exceeds the device's memory, before anything is allocated (it
    would otherwise grow until the out-of-memory killer takes the machine): one line with both
    numbers and a device batch, or else a depth, that fits. The estimate leaves out allocator
    overhead, so it refuses only what cannot fit, not everything that will not."""
    have, need = device_memory(device), run_estimate(config, device_batch_size, processes, device)
    if need <= have:
        return
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device.type} RAM"
    fits = [b for b in (2 ** i for i in range(12)) if b < device_batch_size
            and run_estimate(config, b, processes, device) <= have]
    if fits:
        fix = f"--device-batch-size {max(fits)} (gradient accumulation keeps the total batch)"
    else:
        fix = f"--depth {largest_depth_that_fits(config, processes, device, have)}" + \
              (" at --device-batch-size 1" if device_batch_size > 1 else "")
    raise Unavailable(f"this run needs about {need / 1e9:,.1f} GB per device (estimate: weights, gradients, optimizer "
                      f"state, activations at device batch {device_batch_size} x {config.sequence_len}) but the "
                      f"{where} has {have / 1e9:,.1f} GB: try {fix}; or pass --skip-memory-check to try anyway")


def largest_depth_that_fits(config, processes, device, have):
    """The deepest model of this config's shape that fits at device batch 1 (0 if none does)."""
    head_dim = config.head_dim
    lo, hi = 0, config.n_layer  # lo fits (or is 0), hi does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        shape = GPTConfig.from_depth(mid, vocab_size=config.vocab_size, sequence_len=config.sequence_len,
                                     head_dim=head_dim, window_pattern=config.window_pattern)
        lo, hi = (mid, hi) if run_estimate(shape, 1, processes, device) <= have else (lo, mid)
    return lo


# -----------------------------------------------------------------------------
# Time and money

def time_and_cost(total_flops, gpus, gpu, depth, fp8, mfu=None, gpu_hour_cost=3.0, peak=None):
    """(MFU, where it comes from, training seconds, dollars) of total_flops on `gpus` GPUs of kind
    `gpu` (a GPUS key): the FLOPs at that fraction of the GPUs' bf16 peak (the table's, or `peak`).
    The MFU is the one given, else one measured on this GPU at this depth and precision
    (MEASURED_MFU), else assumed."""
    key = GPUS[gpu][0]
    if mfu is not None:
        source = "given (--mfu)"
    elif (key, depth, fp8) in MEASURED_MFU:
        mfu, source = MEASURED_MFU[key, depth, fp8], "measured, docs/PERF.md"
    else:
        mfu, source = DEFAULT_MFU, "assumed, not measured"
    seconds = total_flops / (gpus * (peak or PEAK_BF16_FLOPS[key]) * mfu)
    return mfu, source, seconds, seconds / 3600 * gpus * gpu_hour_cost
