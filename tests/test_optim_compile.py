"""
The optimizer's update functions under torch.compile (the default on CUDA): the same steps as eager,
and no recompile while the schedules change lr, momentum and weight decay every step (they reach
the compiled graphs as 0-D tensors, not as constants baked into them).
"""
import torch
from torch._dynamo.utils import counters

from nanochat.optim import MuonAdamW
from optim_toy import adamw_group, muon_group, orthogonalize_in


def make(compile):
    """One Muon group (3 tall matrices), AdamW on a fp32 matrix, a bf16 table and a 0-D scalar."""
    gen = torch.Generator().manual_seed(0)
    muon = [(torch.randn(24, 8, generator=gen) * 0.1).requires_grad_() for _ in range(3)]
    adamw = [torch.randn(10, 8, generator=gen).requires_grad_(), torch.randn(6, 4, generator=gen).bfloat16().requires_grad_(),
             torch.tensor(0.5).requires_grad_()]
    opt = MuonAdamW([muon_group(params=muon, lr=0.02, momentum=0.9, weight_decay=0.1),
                     adamw_group(params=adamw, lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)],
                    compile=compile)
    return muon + adamw, opt


def scheduled_step(params, opt, step):
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
    opt.set_schedule(1 - step / 60, 0.85 + 0.002 * step, 0.1 * (1 - step / 60))  # every value changes every step
    opt.step()


def test_compiled_updates_match_eager_and_never_recompile():
    torch._dynamo.reset()
    counters.clear()
    (eager_params, eager), (params, compiled) = make(False), make(True)
    assert compiled.muon_update is not eager.muon_update  # really compiled (the CPU default is eager)
    init = [p.detach().clone() for p in params]
    with orthogonalize_in(torch.float32):  # compare without bf16 noise (a GPU runs Muon's matmuls in bf16)
        for step in range(3):
            scheduled_step(eager_params, eager, step)
            scheduled_step(params, compiled, step)
        for p, q, p0 in zip(params, eager_params, init):
            assert p.dtype == q.dtype
            moved = (q.float() - p0.float()).abs().max()
            assert moved > 1e-3  # it trained
            # fused kernels round in another order: far below one bf16 ulp of the bf16 table
            assert (p.float() - q.float()).abs().max() <= (1e-2 if p.dtype == torch.bfloat16 else 1e-5) * moved
        graphs = counters["stats"]["unique_graphs"]
        assert graphs == 2  # one per group: muon_update, adamw_update
        for step in range(3, 50):
            scheduled_step(params, compiled, step)
    assert counters["stats"]["unique_graphs"] == graphs  # 47 more scheduled steps: no recompile
    assert not counters["recompiles"]
