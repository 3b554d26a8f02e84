"""
A nanochat model for Hugging Face transformers: AutoModelForCausalLM.from_pretrained(DIR,
trust_remote_code=True) loads a directory written by `python -m scripts.export`. Standalone on
purpose (torch and transformers only), so the directory works on a machine without nanochat.

The architecture, as nanochat trains it: pre-norm blocks with parameter-free RMSNorm and no biases;
attention with rotary embeddings (base 100,000), QK-norm with a 1.2 gain and a sliding window per
layer (the window pattern tiled over the layers, short = a quarter of the context, the last layer
long); value embeddings on alternating layers, mixed into V through a per-head gate 3·sigmoid(W·x[:12]);
a ReLU² MLP; residual scalars that re-inject the embedding before every block; a smear of the
previous token's embedding; a backout of the stream after the middle block; logits soft-capped at
±15. It recomputes the whole sequence at every generation step (no KV cache): simple, and exact for
the sliding windows.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast


class NanochatConfig(PretrainedConfig):
    model_type = "nanochat"

    def __init__(self, sequence_len=2048, vocab_size=32768, n_layer=12, n_head=6, n_embd=768, window_pattern="SSSL",
                 **kwargs):
        self.sequence_len, self.vocab_size, self.n_layer = sequence_len, vocab_size, n_layer
        self.n_head, self.n_embd, self.window_pattern = n_head, n_embd, window_pattern
        self.max_position_embeddings = sequence_len  # the context it was trained on
        kwargs.setdefault("use_cache", False)
        super().__init__(**kwargs)

    def window_sizes(self):
        long, short = self.sequence_len, math.ceil(self.sequence_len / 4 / 128) * 128
        sizes = [long if self.window_pattern[i % len(self.window_pattern)] == "L" else min(short, long)
                 for i in range(self.n_layer)]
        sizes[-1] = long
        return sizes

    def has_value_embed(self, layer):
        return (self.n_layer - 1 - layer) % 2 == 0


def norm(x):
    return F.rms_norm(x, (x.size(-1),))


class Linear(nn.Linear):
    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype))


def rotary(x, positions):
    head_dim = x.size(-1)
    inv_freq = 100_000 ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=x.device) / head_dim)
    angles = torch.outer(positions.float(), inv_freq)
    cos, sin = angles.cos()[None, :, None, :].to(x.dtype), angles.sin()[None, :, None, :].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def attend(q, k, v, window):
    """Causal attention of (B, T, H, D) tensors, each query seeing itself and `window` keys back."""
    T = q.size(1)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if window >= T:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    t = torch.arange(T, device=q.device)[:, None]
    j = torch.arange(T, device=q.device)[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=(j <= t) & (t - j <= window)).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        C, self.n_head = config.n_embd, config.n_head
        self.window = config.window_sizes()[layer]
        self.c_q, self.c_k, self.c_v, self.c_proj = Linear(C, C), Linear(C, C), Linear(C, C), Linear(C, C)
        self.ve_gate = Linear(12, config.n_head) if config.has_value_embed(layer) else None

    def forward(self, x, ve, positions):
        B, T, C = x.shape
        q, k, v = (lin(x).view(B, T, self.n_head, C // self.n_head) for lin in (self.c_q, self.c_k, self.c_v))
        if ve is not None:
            v = v + (3 * torch.sigmoid(self.ve_gate(x[..., :12]))).unsqueeze(-1) * ve.view_as(v)
        q, k = norm(rotary(q, positions)) * 1.2, norm(rotary(k, positions)) * 1.2
        return self.c_proj(attend(q, k, v, self.window).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc, self.c_proj = Linear(config.n_embd, 4 * config.n_embd), Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.attn, self.mlp = Attention(config, layer), MLP(config)

    def forward(self, x, ve, positions):
        x = x + self.attn(norm(x), ve, positions)
        return x + self.mlp(norm(x))


class NanochatForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = NanochatConfig
    _no_split_modules = ["Block"]

    def __init__(self, config):
        super().__init__(config)
        V, C, L = config.vocab_size, config.n_embd, config.n_layer
        self.wte = nn.Embedding(V, C)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(L))
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(V, C) for i in range(L) if config.has_value_embed(i)})
        self.lm_head = Linear(C, V)
        self.resid_lambdas = nn.Parameter(torch.ones(L))
        self.x0_lambdas = nn.Parameter(torch.zeros(L))
        self.smear_gate = Linear(24, 1)
        self.smear_lambda = nn.Parameter(torch.zeros(()))
        self.backout_lambda = nn.Parameter(torch.zeros(()))
        self.post_init()

    def _init_weights(self, module):
        pass  # the weights always come from the exported checkpoint

    def get_input_embeddings(self):
        return self.wte

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        B, T = input_ids.shape
        positions = torch.arange(T, device=input_ids.device)
        x = norm(self.wte(input_ids))
        gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[..., :24]))
        x = x + gate * torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
        x0, L = x, self.config.n_layer
        for i, block in enumerate(self.blocks):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](input_ids) if str(i) in self.value_embeds else None
            x = block(x, ve, positions)
            if i == L // 2:
                x_mid = x
        x = norm(x - self.backout_lambda * x_mid)
        logits = 15 * torch.tanh(self.lm_head(x).float() / 15)
        loss = None
        if labels is not None:  # the usual causal shift: position t predicts token t + 1
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        return {"input_ids": input_ids}  # no KV cache: the whole sequence every step
