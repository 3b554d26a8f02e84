"""
The toy model shared by test_optim.py and test_optim_checkpoint.py: a parameter set that exercises every
kind of tensor MuonAdamW handles (sharded/unsharded fp32 AdamW tensors, a bf16 table, scalars, and Muon
groups of square, tall and wide matrices), a loss over it, and the optimizer's parameter groups.
Imported by module name, so the workers that mp.spawn starts (which get pytest's sys.path) find it too.
"""
import contextlib
import dataclasses
import os

import torch
import torch.nn.functional as F

from nanochat import optim
from nanochat.optim import MuonAdamW

MUON = ("attn", "fc", "proj")

def adamw_group(params, lr, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0):
    """A MuonAdamW AdamW group, every hyperparameter given (the optimizer has no defaults of its own)."""
    return dict(kind="adamw", params=params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def muon_group(params, lr, momentum=0.95, beta2=0.9, weight_decay=0.0, ns_steps=5):
    """A MuonAdamW Muon group, every hyperparameter given."""
    return dict(kind="muon", params=params, lr=lr, momentum=momentum, beta2=beta2, weight_decay=weight_decay,
                ns_steps=ns_steps)



@dataclasses.dataclass(frozen=True)
class Toy:
    V: int  # rows of "emb" and of the fixed features (token ids are < V)
    D: int  # model width
    C: int  # classes
    WIDE: int  # columns of the 2-row "wide" tensor
    n_attn: int  # square D x D Muon matrices, used in pairs (an odd last one is a residual layer of its own)
    hidden: int  # rows of the tall "fc" matrices (columns of the wide "proj" ones)
    ve_rows: int  # the bf16 table: ve_rows x ve_dim, indexed by idx % ve_rows
    ve_dim: int
    ve_out_std: float
    wide_stride: int = 1  # "wide" is read at columns (idx * wide_stride) % WIDE

    def init_params(self):
        gen = torch.Generator().manual_seed(0)
        r = lambda *shape, std: torch.randn(*shape, generator=gen) * std
        V, D, C, H = self.V, self.D, self.C, self.hidden
        P = {
            "emb": r(V, D, std=0.5),
            "wide": r(2, self.WIDE, std=0.5),  # 2 rows: at W=3 one rank owns no rows at all
            "ve": r(self.ve_rows, self.ve_dim, std=0.5).bfloat16(),  # bf16: its moments must stay fp32
            "head": r(C, D, std=0.1),
            "lam": torch.ones(2), "gain": torch.tensor(1.0),  # scalars
        }
        P.update({f"attn{i}": r(D, D, std=D ** -0.5) for i in range(self.n_attn)})
        P.update({f"fc{i}": r(H, D, std=D ** -0.5) for i in range(3)})  # tall
        P.update({f"proj{i}": r(D, H, std=H ** -0.5) for i in range(2)})  # wide
        fixed = {"feat": r(V, D, std=1.0), "mix": r(2, D, std=1.0), "readout": r(H, C, std=0.1),
                 "ve_out": r(self.ve_dim, C, std=self.ve_out_std)}
        return {k: v.requires_grad_() for k, v in P.items()}, fixed

    def loss_fn(self, P, fixed, idx, tgt):
        # Three independent parts, so that the fp32 AdamW parameters never see the bf16 noise of the
        # Muon and bf16 parameters (that keeps the 1e-6 comparisons meaningful).
        # Part A: fp32 AdamW parameters only.
        x = P["emb"][idx] + P["wide"][:, (idx * self.wide_stride) % self.WIDE].T @ fixed["mix"]
        x = F.rms_norm(x, (self.D,)) * P["gain"]
        loss_adamw = F.cross_entropy((P["lam"][0] * x + P["lam"][1] * x.tanh()) @ P["head"].T, tgt)
        # Part B: the bf16 table.
        loss_bf16 = F.cross_entropy(P["ve"][idx % self.ve_rows].float() @ fixed["ve_out"], tgt)
        # Part C: Muon matrices only, a small residual MLP on fixed features.
        h = fixed["feat"][idx]
        for i in range(2):
            h = h + torch.tanh(h @ P[f"attn{2 * i}"].T) @ P[f"attn{2 * i + 1}"].T
            h = h + F.relu(h @ P[f"fc{i}"].T).square() @ P[f"proj{i}"].T * 0.1
        for i in range(4, self.n_attn):
            h = h + torch.tanh(h @ P[f"attn{i}"].T)
        loss_muon = F.cross_entropy(F.relu(h @ P["fc2"].T) @ fixed["readout"], tgt)
        return loss_adamw + loss_bf16 + loss_muon

    def make_optimizer(self, P):
        return MuonAdamW([
            adamw_group(params=[P["emb"], P["wide"], P["ve"]], lr=0.05),
            adamw_group(params=[P["head"]], lr=0.01, weight_decay=0.1),
            adamw_group(params=[P["lam"], P["gain"]], lr=0.02, betas=(0.9, 0.99)),
            muon_group(params=[P[f"attn{i}"] for i in range(self.n_attn)], lr=0.02, weight_decay=0.2),
            muon_group(params=[P[f"fc{i}"] for i in range(3)], lr=0.02, weight_decay=0.2),
            muon_group(params=[P[f"proj{i}"] for i in range(2)], lr=0.02, weight_decay=0.2),
        ])


@contextlib.contextmanager
def orthogonalize_in(dtype):
    """Run MuonAdamW's MuonEq + Polar Express in `dtype` (fp32: compare Muon without the bf16 noise floor)."""
    orig = optim.ORTHO_DTYPE
    optim.ORTHO_DTYPE = dtype
    try:
        yield
    finally:
        optim.ORTHO_DTYPE = orig


def spawn_gloo(worker, world, out_dir, *args):
    """Run worker(rank, world, rendezvous_file, out_dir, *args) in `world` fresh processes; each
    saves its results to out_dir/rank{r}.pt; returns them in rank order. gloo can abort a process
    after its work is done, while its threads are torn down at exit (a known torch issue: SIGABRT,
    "terminate called without an active exception"); once every rank has saved its results the
    run is complete, so that late abort is not a test failure. Anything earlier still is. Workers
    must save before a final barrier, so that no rank reaches teardown before all have saved."""
    import torch.multiprocessing as mp
    try:
        mp.spawn(worker, args=(world, f"{out_dir}/rdzv", str(out_dir), *args), nprocs=world)
    except mp.ProcessExitedException:
        if not all(os.path.exists(f"{out_dir}/rank{r}.pt") for r in range(world)):
            raise
    return [torch.load(f"{out_dir}/rank{r}.pt") for r in range(world)]
