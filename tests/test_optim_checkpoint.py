"""
World-size-independent optimizer checkpoints: MuonAdamW.full_state_dict() / load_full_state_dict().
Train K steps on A gloo processes, save, resume on B processes for K more steps: the result must match
one process training 2K steps on the same global batches, for (A, B) in (2,1), (1,2), (2,3), (1,1).
"""
import os
import time

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from nanochat import optim
from optim_toy import MUON, Toy, orthogonalize_in, spawn_gloo

# Small on purpose (fast): SHARD_MIN_NUMEL is lowered so that "emb", "wide" and the bf16 "ve" are sharded.
SHARD_MIN = 256
V, D, C, WIDE = 101, 16, 7, 600  # 101 rows: not divisible by 2 or 3
N_TOKENS, K = 60, 3  # 60 tokens split evenly over 1, 2 or 3 ranks; K steps before and after the checkpoint
# emb: sharded by rows, unevenly at W=2 and W=3; wide: sharded, 2 rows, so at W=3 one rank owns no rows at
# all; ve: bf16, sharded, so its moments must stay fp32; 5 attn matrices: a padded round at W=2 and 3.
TOY = Toy(V=V, D=D, C=C, WIDE=WIDE, n_attn=5, hidden=23, ve_rows=V, ve_dim=4, ve_out_std=0.5, wide_stride=5)
init_params, loss_fn, make_optimizer = TOY.init_params, TOY.loss_fn, TOY.make_optimizer
ORDER = ["emb", "wide", "ve", "head", "lam", "gain"] + [f"attn{i}" for i in range(5)] + \
        [f"fc{i}" for i in range(3)] + [f"proj{i}" for i in range(2)]  # as in make_optimizer's groups


def train(P, opt, world, rank, steps):
    """Global steps `steps` on this rank's slice of each global batch; schedules depend on the step only.
    Orthogonalization in fp32, so that Muon is compared tightly, not at the bf16 noise floor."""
    fixed = init_params()[1]
    for step in steps:
        gen = torch.Generator().manual_seed(100 + step)
        # distinct tokens: no row sums contributions from two ranks (see test_optim)
        idx, tgt = torch.randperm(V, generator=gen)[:N_TOKENS], torch.randint(0, C, (N_TOKENS,), generator=gen)
        sl = slice(rank * N_TOKENS // world, (rank + 1) * N_TOKENS // world)
        loss_fn(P, fixed, idx[sl], tgt[sl]).backward()
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * (1.0 - 0.1 * step)
            if group["kind"] == "muon":
                group["momentum"] = 0.85 + 0.02 * step
        with orthogonalize_in(torch.float32):
            opt.step()
        opt.zero_grad(set_to_none=True)


def detached(P):
    return {k: v.detach().clone() for k, v in P.items()}


def resume(ckpt, world, rank):
    """A fresh model + optimizer at this world size, loaded from ckpt, trained steps K..2K-1."""
    P, _ = init_params()
    with torch.no_grad():
        for k, v in ckpt["params"].items():
            P[k].copy_(v)
    opt = make_optimizer(P)
    opt.load_full_state_dict(ckpt["optim"])
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    train(P, opt, world, rank, range(K, 2 * K))
    return detached(P), hyper


def snapshot(opt):
    """opt.state as {param index: {key: value}}, cloned."""
    params = [p for g in opt.param_groups for p in g["params"]]
    return {i: {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
            for i, p in enumerate(params) if p in opt.state}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for i in a:
        assert a[i].keys() == b[i].keys()
        for k in a[i]:
            if torch.is_tensor(a[i][k]):
                assert a[i][k].dtype == b[i][k].dtype and torch.equal(a[i][k], b[i][k]), (i, k)
            else:
                assert a[i][k] == b[i][k], (i, k)


class AllocatedBytes(TorchDispatchMode):
    """Bytes of the new storages that tensor ops allocate while active (outputs that alias an input,
    like in-place ops or the collectives' buffers, are not new)."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                self.total += t.untyped_storage().nbytes()
        return out


def state_bytes(state):
    return sum(v.numel() * v.element_size() for s in state.values() for v in s.values() if torch.is_tensor(v))


def first_half(world, rank):
    """K steps, then the checkpoint; also checks a load(full_state_dict()) round trip changes nothing
    (on rank 0: the only one that receives the full state) and what the gather allocates."""
    P, _ = init_params()
    opt = make_optimizer(P)
    train(P, opt, world, rank, range(K))
    before = snapshot(opt)
    with AllocatedBytes() as allocated:
        full = opt.full_state_dict()
    if full is not None:
        opt.load_full_state_dict(full)
        assert_same_state(snapshot(opt), before)
    for p, s in opt.state.items():  # the moments stay fp32, also for the bf16 table
        assert s["exp_avg" if "exp_avg" in s else "momentum_buffer"].dtype == torch.float32
    return dict(params=detached(P), optim=full, allocated=allocated.total, own=state_bytes(opt.state))


def _worker(rank, world, rdzv, out_dir, ckpt_path):
    torch.set_num_threads(1)
    optim.SHARD_MIN_NUMEL = SHARD_MIN  # a fresh interpreter: the test's monkeypatch does not reach it
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=world)
    out = {"resumed": resume(torch.load(ckpt_path), world, rank)}
    if world == 2:
        out["ckpt"] = first_half(world, rank)
    torch.save(out, f"{out_dir}/rank{rank}.pt")
    dist.barrier()  # no rank tears the group down while a peer still talks to it (gloo aborts then)
    dist.destroy_process_group()


def spawn(world, ckpt_path, tmp_path_factory):
    return spawn_gloo(_worker, world, tmp_path_factory.mktemp(f"w{world}"), str(ckpt_path))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    mp_patch = pytest.MonkeyPatch()
    mp_patch.setattr(optim, "SHARD_MIN_NUMEL", SHARD_MIN)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        P, _ = init_params()
        opt = make_optimizer(P)
        train(P, opt, 1, 0, range(2 * K))
        out = {"ref": detached(P), "ckpt": {1: first_half(1, 0)}}
        d = tmp_path_factory.mktemp("ckpt")
        torch.save(out["ckpt"][1], d / "w1.pt")  # what rank 0 of a run would write
        w2 = spawn(2, d / "w1.pt", tmp_path_factory)  # resumes (1, 2); writes the world-2 checkpoint
        out["resumed"] = {(1, 2): [r["resumed"] for r in w2]}
        out["ckpt"][2] = [r["ckpt"] for r in w2]
        torch.save(out["ckpt"][2][0], d / "w2.pt")
        out["resumed"][(2, 3)] = [r["resumed"] for r in spawn(3, d / "w2.pt", tmp_path_factory)]
        for a in (1, 2):  # resume on one process, from a torch.save/torch.load round trip
            out["resumed"][(a, 1)] = [resume(torch.load(d / f"w{a}.pt"), 1, 0)]
    finally:
        torch.set_num_threads(threads)
        mp_patch.undo()
    return out


def relative_deviation(a, b, init=None):
    """max |a - b| / max |b|; with init: ‖a - b‖ / ‖b - init‖, relative to how far training moved it."""
    a, b = a.float(), b.float()
    if init is not None:
        return ((a - b).norm() / (b - init.float()).norm()).item()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# fp32 AdamW: gradients equal up to summation order. Muon (fp32 orthogonalization): fp32 rounding amplified
# by the polynomials (test_optim measures <= 2e-6 of the movement). bf16 table: its gradient is rounded
# to bf16 differently at another world size, and Adam passes relative gradient errors straight through.
TOL = {"adamw": 1e-6, "muon": 1e-5, "bf16": 0.1}


def kind(name, t):
    return "muon" if name.startswith(MUON) else "bf16" if t.dtype == torch.bfloat16 else "adamw"


@pytest.mark.parametrize("a,b", [(2, 1), (1, 2), (2, 3), (1, 1)])
def test_resume_on_another_world_size_matches_uninterrupted(runs, a, b):
    ref, init = runs["ref"], init_params()[0]
    results = runs["resumed"][(a, b)]
    saved_groups = runs["ckpt"][1 if a == 1 else 2]
    saved_groups = (saved_groups if a == 1 else saved_groups[0])["optim"]["param_groups"]
    dev = {}
    for params, hyper in results:
        for k, v in params.items():  # every rank ends with the same parameters
            assert torch.equal(v, results[0][0][k]), k
        for h, s in zip(hyper, saved_groups):  # state only: the hyperparameters stay the new optimizer's own
            assert h["kind"] == s["kind"] and h["lr"] == h["initial_lr"] != s["lr"]  # s: scheduled at step K-1
    for k, v in results[0][0].items():
        assert (ref[k].float() - init[k].detach().float()).abs().max() > 1e-3, k  # it trained
        t = kind(k, v)
        dev[k] = relative_deviation(v, ref[k], init[k].detach() if t != "adamw" else None)
        if (a, b) == (1, 1):  # same process count, same arithmetic: bit for bit
            assert torch.equal(v, ref[k]), k
        assert dev[k] <= TOL[t], (k, dev[k])
    print(f"\n({a}, {b}) vs uninterrupted: " + " ".join(f"{k}={v:.0e}" for k, v in dev.items()))


def test_full_state_dict_goes_to_rank_0_only(runs):
    # Rank 1 gets None and allocates less than the shards it already holds (only the zero-padded copy
    # of a short last block, to send), never the full state; rank 0 allocates at least the full state.
    rank0, rank1 = runs["ckpt"][2]
    full = state_bytes(rank0["optim"]["state"])
    assert rank1["optim"] is None
    assert 0 < rank1["allocated"] < 0.5 * rank1["own"] and rank1["own"] < 0.6 * full, \
        (rank1["allocated"], rank1["own"], full)  # measured: 8320 < 21676 < 39940 bytes
    assert rank0["allocated"] >= full


def test_full_state_dict_is_independent_of_world_size(runs):
    one, twos = runs["ckpt"][1]["optim"], [runs["ckpt"][2][0]["optim"]]
    for two in twos:  # rank 0 gets the whole thing
        assert one["param_groups"] == two["param_groups"]
        assert one["state"].keys() == two["state"].keys() == set(range(len(ORDER)))
        for i, name in enumerate(ORDER):
            s1, s2 = one["state"][i], two["state"][i]
            assert s1.keys() == s2.keys()
            assert set(s1) == ({"momentum_buffer", "second_moment"} if name.startswith(MUON)
                               else {"step", "exp_avg", "exp_avg_sq"})
            p = runs["ref"][name]
            for key, v1 in s1.items():
                if key == "step":
                    assert v1 == s2[key] == K
                    continue
                v2 = s2[key]
                assert v1.device.type == v2.device.type == "cpu" and v1.dtype == v2.dtype == torch.float32
                expected = p.shape if key != "second_moment" else \
                    (p.size(0), 1) if p.size(0) >= p.size(1) else (1, p.size(1))
                assert v1.shape == v2.shape == expected, (name, key)
                assert v1.abs().max() > 0, (name, key)  # real state, not a zero pad
                tol = 0.1 if p.dtype == torch.bfloat16 else 1e-5  # Muon buffers: fp32 rounding, amplified
                assert relative_deviation(v2, v1) <= tol, (name, key, relative_deviation(v2, v1))


def test_load_takes_exactly_this_ranks_share(runs):
    # Which slices a rank keeps, checked directly: an optimizer that believes it is rank 1 of 3 (loading
    # needs no collective, so no process group is needed). The resume tests check the values end to end.
    full = runs["ckpt"][1]["optim"]
    P, _ = init_params()
    opt = make_optimizer(P)
    opt.rank, opt.world = 1, 3  # pretend: rank 1 of 3 (no collective is needed to load)
    for u in opt.units:
        u.sharded = u.params[0].numel() >= SHARD_MIN and opt.param_groups[u.group]["kind"] == "adamw"
    opt.load_full_state_dict(full)
    # emb: 101 rows -> blocks of 34, rank 1 owns rows 34..67; wide: 2 rows -> blocks of 1, rank 1 owns row 1
    assert torch.equal(opt.state[P["emb"]]["exp_avg"], full["state"][0]["exp_avg"][34:68])
    assert torch.equal(opt.state[P["wide"]]["exp_avg_sq"], full["state"][1]["exp_avg_sq"][1:2])
    assert opt.state[P["head"]]["exp_avg"].shape == P["head"].shape  # small: whole tensor everywhere
    # attn: 5 matrices, rounds of 3 -> rank 1 owns matrices 1 and 4; fc: 3 -> matrix 1; proj: 2 -> 1
    attn = opt.state[P["attn0"]]["momentum_buffer"]
    assert attn.shape == (2, D, D)
    assert torch.equal(attn[0], full["state"][7]["momentum_buffer"]) and torch.equal(attn[1], full["state"][10]["momentum_buffer"])
    proj = opt.state[P["proj0"]]["second_moment"]
    assert proj.shape == (1, 1, 23) and torch.equal(proj[0], full["state"][15]["second_moment"])
    assert P["attn1"] not in opt.state  # one state entry per group, under its first matrix


def _abort_worker(rank, world, rdzv, out_dir, save_first):
    if save_first:  # save, then wait for the others like the real workers' final barrier
        torch.save(rank, f"{out_dir}/rank{rank}.pt")
        while not all(os.path.exists(f"{out_dir}/rank{r}.pt") for r in range(world)):
            time.sleep(0.01)
    os.abort()  # what gloo's teardown does in the rare bad case: SIGABRT


def test_spawn_gloo_tolerates_only_a_late_abort(tmp_path):
    (tmp_path / "late").mkdir(); (tmp_path / "early").mkdir()
    assert spawn_gloo(_abort_worker, 2, tmp_path / "late", True) == [0, 1]  # results all saved: complete
    with pytest.raises(Exception, match="SIGABRT"):
        spawn_gloo(_abort_worker, 2, tmp_path / "early", False)  # nothing saved: a real failure
