"""
The GPT: a decoder-only Transformer, the GPT-2 speedrun record's model.

Relative to GPT-2 it keeps the shape (pre-norm blocks of attention + MLP) and changes the parts:
- rotary position embeddings instead of learned ones, and RMSNorm on q and k (QK-norm)
- parameter-free RMSNorm everywhere, no biases, untied input and output embeddings
- sliding-window attention on most layers (pattern "SSSL": three short, one long)
- a ReLU² MLP, value embeddings mixed into V, learned residual scalars that re-inject
  the input embedding, a "smear" of the previous token, a "backout" of the middle layer
- logits soft-capped at ±15
`--depth` is the one dial: width, heads and every learning rate follow from it.
"""
import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.attention import attention, get_backend, prepare_flex
from nanochat.common import compute_dtype


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_embd: int = 768
    window_pattern: str = "SSSL"  # tiled over the layers; "L" = full context everywhere

    @classmethod
    def from_depth(cls, depth, vocab_size=32768, sequence_len=2048, head_dim=128, window_pattern="SSSL"):
        # width grows with depth (64 per layer), rounded up to whole heads
        n_embd = math.ceil(depth * 64 / head_dim) * head_dim
        return cls(sequence_len, vocab_size, depth, n_embd // head_dim, n_embd, window_pattern)

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    def window_sizes(self):
        """Per-layer attention window. Short windows are cheap and local context is most of what a
        layer needs; the periodic long layers (and always the last) carry the long-range information."""
        long, short = self.sequence_len, math.ceil(self.sequence_len / 4 / 128) * 128
        sizes = [long if self.window_pattern[i % len(self.window_pattern)] == "L" else min(short, long)
                 for i in range(self.n_layer)]
        sizes[-1] = long
        return sizes

    def has_value_embed(self, layer):
        return (self.n_layer - 1 - layer) % 2 == 0  # alternating layers, always including the last


def norm(x):
    return F.rms_norm(x, (x.size(-1),))  # no learnable gain: the next layer's weights can absorb it


class Linear(nn.Linear):
    """Bias-free linear layer. The weight is kept in fp32 (the optimizer's master copy) and cast
    to the activations' dtype (bf16 on GPU) on the fly; no autocast anywhere."""

    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype))


def rotary_cos_sin(seq_len, head_dim, base=100_000, device=None):
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    return angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]  # (1, T, 1, D/2)


def apply_rotary(x, cos, sin):
    """Rotate each pair of channels (i, i + D/2) by an angle proportional to the position, so
    q·k depends only on the distance between the two tokens."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.layer, self.n_head, self.head_dim = layer, config.n_head, config.head_dim
        self.window = config.window_sizes()[layer]
        C = config.n_embd
        self.c_q, self.c_k, self.c_v, self.c_proj = Linear(C, C), Linear(C, C), Linear(C, C), Linear(C, C)
        # value embeddings: a per-token vector added into V, gated per head by 3·sigmoid(W·x[:12])
        self.ve_gate = Linear(12, config.n_head) if config.has_value_embed(layer) else None

    def forward(self, x, ve, cos, sin, kv_cache=None):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_head, self.head_dim)
        if ve is not None:
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :12]))  # (B, T, H) in (0, 3)
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_head, self.head_dim)
        # QK-norm bounds the attention logits (no softmax blow-ups at high LR); the 1.2 gain
        # on each of q and k gives back some sharpness (1.44 / sqrt(d) effective scale)
        q = norm(apply_rotary(q, cos, sin)) * 1.2
        k = norm(apply_rotary(k, cos, sin)) * 1.2
        if kv_cache is not None:  # decoding: attend over the cached tokens plus these new ones
            k, v = kv_cache.update(self.layer, k, v)
        y = attention(q, k, v, self.window)
        return self.c_proj(y.reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())  # ReLU²: sparse, and better than GELU here


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, kv_cache=None):
        x = x + self.attn(norm(x), ve, cos, sin, kv_cache)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        V, C, L = config.vocab_size, config.n_embd, config.n_layer
        self.wte = nn.Embedding(V, C)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(L))
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(V, C) for i in range(L) if config.has_value_embed(i)})
        self.lm_head = Linear(C, V)
        # before block i: x = resid_lambdas[i]·x + x0_lambdas[i]·x0 (the embedding, re-injected)
        self.resid_lambdas = nn.Parameter(torch.ones(L))
        self.x0_lambdas = nn.Parameter(torch.zeros(L))
        self.smear_gate = Linear(24, 1)
        self.smear_lambda = nn.Parameter(torch.zeros(()))
        self.backout_lambda = nn.Parameter(torch.zeros(()))
        # rotary tables, longer than the context so sampling can run past it; filled by init_weights
        cos, sin = rotary_cos_sin(4 * config.sequence_len, config.head_dim, device="meta")
        self.register_buffer("cos", torch.empty_like(cos), persistent=False)
        self.register_buffer("sin", torch.empty_like(sin), persistent=False)

    @torch.no_grad()
    def init_weights(self):
        """Initialize in place (the model is built on the meta device, then materialized)."""
        C, L = self.config.n_embd, self.config.n_layer
        s = 3 ** 0.5 * C ** -0.5  # uniform(-s, s) has std 1/sqrt(C)
        nn.init.normal_(self.wte.weight, std=0.8)
        nn.init.normal_(self.lm_head.weight, std=0.001)  # start near uniform predictions
        for block in self.blocks:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                nn.init.uniform_(lin.weight, -s, s)
            nn.init.uniform_(block.mlp.c_fc.weight, -0.4 * s, 0.4 * s)
            # zero output projections: every block starts as the identity
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:  # gates start just above neutral: small and positive
                nn.init.uniform_(block.attn.ve_gate.weight, 0, 0.02)
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -s, s)
        self.resid_lambdas.copy_(torch.linspace(1.15, 1.05, L))
        self.x0_lambdas.copy_(torch.linspace(0.20, 0.05, L))
        nn.init.uniform_(self.smear_gate.weight, 0, 0.02)
        self.smear_lambda.zero_()
        self.backout_lambda.fill_(0.2)
        # embeddings are looked up, not multiplied: store them directly in the compute dtype
        dtype = compute_dtype(self.wte.weight.device.type)
        for emb in [self.wte, *self.value_embeds.values()]:
            emb.to(dtype)
        cos, sin = rotary_cos_sin(self.cos.size(1), self.config.head_dim, device=self.cos.device)
        self.cos, self.sin = cos.to(dtype), sin.to(dtype)

    def forward(self, idx, targets=None, loss_reduction="mean", kv_cache=None):
        B, T = idx.shape
        L = self.config.n_layer
        T0 = 0 if kv_cache is None else kv_cache.pos  # with a KV cache, idx continues after T0 tokens
        cos, sin = self.cos[:, T0:T0 + T], self.sin[:, T0:T0 + T]
        x = norm(self.wte(idx))
        # smear: add a gated bit of the previous token's embedding (cheap bigram information).
        # The first token has no predecessor, unless a KV cache kept it from the previous call.
        first = kv_cache.prev_embed if kv_cache is not None and T0 > 0 else torch.zeros_like(x[:, :1])
        if kv_cache is not None:
            kv_cache.prev_embed = x[:, -1:]
        gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[..., :24]))
        x = x + gate * torch.cat([first, x[:, :-1]], dim=1)
        x0 = x
        for i, block in enumerate(self.blocks):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, kv_cache)
            if i == L // 2:
                x_mid = x  # the stream right after the middle block, remembered for the backout below
        if kv_cache is not None:
            kv_cache.pos += T  # every layer has stored these T tokens: advance once, here
        # backout: subtract part of the mid-depth stream, whose low-level features the
        # output head does not need
        x = norm(x - self.backout_lambda * x_mid)
        logits = self.lm_head(x).float()
        logits = 15 * torch.tanh(logits / 15)  # softcap: bounded logits, steadier training
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-1, reduction=loss_reduction)

    # --- sizes and costs ---

    def num_params(self):
        """Parameter counts by group."""
        n = lambda params: sum(p.numel() for p in params)
        counts = {
            "wte": n(self.wte.parameters()),
            "value_embeds": n(self.value_embeds.parameters()),
            "lm_head": n(self.lm_head.parameters()),
            "transformer_matrices": n(self.blocks.parameters()),
            "scalars": n([self.resid_lambdas, self.x0_lambdas, self.smear_lambda, self.backout_lambda,
                          self.smear_gate.weight]),
        }
        counts["total"] = n(self.parameters())
        assert sum(counts.values()) == 2 * counts["total"], "a parameter is missing from the groups"
        return counts

    def estimate_flops(self):
        """Training FLOPs per token: 6 per weight of every matmul (2 forward, 4 backward), plus
        attention's two T×T products per layer, 12·H·D·(keys attended). Embedding lookups are
        free. Counted from nn.Linear weights, so it does not matter which Linear class (bf16,
        fp8) implements a layer."""
        matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        cfg = self.config
        attn = sum(12 * cfg.n_head * cfg.head_dim * min(w, cfg.sequence_len) for w in cfg.window_sizes())
        return 6 * matmul + attn

    # --- optimizer ---

    def param_groups(self):
        """Every parameter, once, under the name the recipe's optimizer groups use."""
        return {
            "lm_head": list(self.lm_head.parameters()),
            "wte": list(self.wte.parameters()),
            "value_embeds": list(self.value_embeds.parameters()),
            "resid_lambdas": [self.resid_lambdas],
            "x0_lambdas": [self.x0_lambdas],
            "smear_backout": [self.smear_gate.weight, self.smear_lambda, self.backout_lambda],
            "matrices": list(self.blocks.parameters()),
        }


def build_model(config, device):
    """Create the model on the meta device (no memory, no wasted init), then materialize it on
    `device` and initialize. The same config can be sized without allocating: GPT(config) under
    `with torch.device("meta")`."""
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    # pick (and print) the kernel now, not inside torch.compile; a fast one is tried on these shapes first
    get_backend(device, model.wte.weight.dtype, config.head_dim, config.window_sizes())
    # flex's masks of the training shape, before anything compiles: a plain torch.compile(model) then
    # never recompiles for them (a no-op with every other backend)
    prepare_flex(config.window_sizes(), config.sequence_len, device)
    return model


def compile_model(model, regional=False):
    """What training runs: the whole model as one torch.compile graph (the fused head and loss
    included), or with `regional`, each block compiled on its own and the rest eager. The blocks
    share their code, so the compiler traces one block per kind (short or long window, with or
    without a value embedding) instead of all of them: a faster cold start. And each block is then
    its own autograd node, so its gradients are final, and the optimizer's reductions can start,
    while backward is still running through the blocks below. The parameters are shared; `model`
    itself stays eager, for evaluation and sampling at any shape."""
    if not regional:
        return torch.compile(model)
    twin = copy.copy(model)  # a second view of the same modules, with compiled blocks
    twin._modules = dict(model._modules)
    twin.blocks = nn.ModuleList([torch.compile(block) for block in model.blocks])
    return twin
