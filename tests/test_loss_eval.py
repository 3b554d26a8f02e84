import math

import torch
import torch.nn as nn

from nanochat.loss_eval import evaluate_bpb


class Uniform(nn.Module):
    """Predicts every token with probability 1/V: loss ln(V) nats per target."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, x, y, loss_reduction="mean"):
        logits = torch.zeros(*x.shape, self.vocab)
        return nn.functional.cross_entropy(logits.view(-1, self.vocab), y.view(-1), ignore_index=-1,
                                           reduction=loss_reduction)


def test_bpb_of_uniform_model_by_hand():
    V = 16
    token_bytes = torch.tensor([1, 2, 3] * 5 + [0])  # token 15 is a special token (0 bytes)
    y = torch.tensor([[0, 1, 2, 15], [3, 4, -1, 5]])  # one special, one ignored target
    x = torch.zeros_like(y)
    batches = iter([(x, y), (x, y)])
    bpb = evaluate_bpb(Uniform(V), batches, 2, token_bytes)
    counted = [0, 1, 2, 3, 4, 5]  # the special and the ignored target count neither loss nor bytes
    nbytes = sum(token_bytes[t].item() for t in counted)
    assert math.isclose(bpb, 2 * len(counted) * math.log(V) / (math.log(2) * 2 * nbytes), rel_tol=1e-6)  # fp32 losses
