"""
Muon + AdamW in one optimizer, for one process or many.

Muon (for the 2-D matrices inside the blocks) replaces each update by the nearest semi-orthogonal
matrix, so every direction in the matrix's input/output space moves by the same amount: the rare
directions a raw gradient barely touches learn as fast as the dominant ones. Per step it does
  Nesterov momentum -> MuonEq row equilibration -> Polar Express orthogonalization (both bf16 on GPU)
  -> Muon+ rescale -> NorMuon per-row step sizes -> cautious weight decay
  -> p -= lr * sqrt(max(1, rows/cols)) * update.
AdamW handles the rest (embeddings, lm_head, scalars), in fp32 even for bf16 parameters.

Distributed (ZeRO-2, no DDP wrapper): the optimizer averages the gradients itself. Each rank
receives the averaged gradient only for its shard (reduce-scatter), updates only that shard and
keeps optimizer state only for it, then all-gathers the new parameters. Small tensors are just
all-reduced and updated everywhere. A hook on every parameter launches its reduction as soon as
its gradient is final: inside backward when the model runs eagerly, but all at the end of it when
the whole model is compiled (one autograd node, whose gradients all become final together), as
base_train runs it on GPUs by default; there the reductions overlap only each other and the
optimizer math. With --regional-compile each block is its own node, so a block's reductions
start when its backward ends (docs/PERF.md: measured with `bench_model --hooks`).

Training loop contract (the loop never all-reduces anything itself):
    for micro_step in range(grad_accum_steps):
        optimizer.sync_grads = micro_step == grad_accum_steps - 1  # like nanoGPT's require_backward_grad_sync
        (model(x, y) / grad_accum_steps).backward()
    optimizer.set_schedule(lr_multiplier, momentum, muon_weight_decay)  # step() reads them fresh each time
    optimizer.step()
    model.zero_grad(set_to_none=True)
"""
import dataclasses
from types import SimpleNamespace

import torch
import torch.distributed as dist

from nanochat.common import compute_dtype

# Tensors with at least this many elements are sharded across ranks; smaller ones are all-reduced
# (sharding a vector of 12 layer scalars would save nothing and cost a collective each way).
SHARD_MIN_NUMEL = 1 << 20

# Polar Express (Amsel et al. 2025, arXiv:2505.16932): one (a, b, c) per iteration of
# X <- a X + b (X Xᵀ) X + c (X Xᵀ)² X. Each odd polynomial is the minimax-optimal one for the interval
# of singular values the previous steps left, tuned so that after 5 steps every singular value in
# [1e-3, 1] of the normalized input lands near 1. Unlike one fixed Newton-Schulz quintic, the early
# steps are aggressive (to lift tiny singular values) and the late ones gentle (to settle them).
POLAR_EXPRESS_COEFFS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


# The dtype of Muon's orthogonalization (MuonEq + Polar Express). None: the device's compute dtype,
# bf16 on GPUs (Muon's main cost, and the result needs little precision), fp32 on CPUs, where bf16
# matmuls are emulated (tens of times slower than fp32: docs/PERF.md). Tests pin it to compare runs.
ORTHO_DTYPE = None


def muon_eq(X):
    """MuonEq (row equilibration): rescale every row of X to the matrix's mean row norm, so no row
    dominates the orthogonalization; a row with a tiny gradient then gets a full-size direction too."""
    mean_row = X.norm(dim=(-2, -1), keepdim=True) / X.size(-2) ** 0.5
    return X * (mean_row / X.norm(dim=-1, keepdim=True).clamp_min(1e-6))


def polar_express(X, steps=5):
    """Approximately U Vᵀ (X = U S Vᵀ) for every matrix of a stack X (..., m, n), in X's dtype.
    Output singular values land in about [0.86, 1.14], not exactly 1: Muon doesn't need more."""
    assert steps <= len(POLAR_EXPRESS_COEFFS)
    tall = X.size(-2) > X.size(-1)
    if tall:  # work on the wide orientation, so the Gram matrix X Xᵀ is the small (min(m,n)²) one
        X = X.mT
    # Frobenius norm >= spectral norm, so this puts all singular values in [0, 1]; the 1% margin
    # keeps the largest one inside the range the coefficients were tuned for despite bf16 rounding.
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)
    for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    return X.mT if tall else X


def muon_plus(X):
    """Muon+: rescale to Frobenius norm √min(m, n), what an exactly orthogonal matrix has, so the
    step size no longer depends on where Polar Express's singular values happened to land."""
    return X * (min(X.size(-2), X.size(-1)) ** 0.5 / X.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10))


def normuon(U, second_moment, beta2):
    """NorMuon: give each row (or column) of the orthogonalized update U its own Adam-like step size,
    from an EMA of its mean square, then rescale so each matrix keeps the norm it had. Orthogonalization
    already gives every column of a tall matrix (row of a wide one) unit norm; what can still be unequal
    is the other way: so one value per row for tall/square matrices, one per column for wide ones."""
    dim = -1 if U.size(-2) >= U.size(-1) else -2  # average over the smaller dimension
    second_moment.lerp_(U.square().mean(dim, keepdim=True), 1 - beta2)
    V = U * second_moment.clamp_min(1e-10).rsqrt()
    # only the direction changes: Muon's step size stays set by lr, not by this normalization
    return V * (U.norm(dim=(-2, -1), keepdim=True) / V.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10))


def muon_update(p, grad, momentum_buffer, second_moment, lr, momentum, beta2, weight_decay, ns_steps, ortho_dtype):
    """One Muon step, in place, on a fp32 stack p (R, m, n) of same-shape matrices. lr, momentum and
    weight_decay are 0-D tensors: the schedules change them every step without a recompile."""
    # Nesterov momentum: the buffer averages gradients; step along the gradient pulled toward it
    momentum_buffer.lerp_(grad, 1 - momentum)
    U = grad.lerp(momentum_buffer, momentum)
    U = polar_express(muon_eq(U.to(ortho_dtype)), ns_steps).float()
    U = normuon(muon_plus(U), second_moment, beta2)
    # Under an orthogonal update, a tall (out > in) matrix maps inputs of RMS 1 to outputs of RMS
    # sqrt(in/out) < 1 only; sqrt(rows/cols) restores a full-size step there (e.g. the MLP's c_fc).
    lr = lr * max(1.0, p.size(-2) / p.size(-1)) ** 0.5
    # Cautious weight decay: decay only entries the update does not push away from zero (same sign
    # as the weight, or zero), so the decay never fights the gradient.
    mask = (U * p) >= 0
    p.sub_(lr * U + lr * weight_decay * p * mask)


def adamw_update(ps, grads, exp_avgs, exp_avg_sqs, step, lr, betas, eps, weight_decay):
    """One AdamW step, in place, on the tensors ps (any dtype) of one group: the math and the moments
    are fp32 (bf16 moments would lose small gradient contributions to rounding). step, lr and
    weight_decay are 0-D tensors (float64, as exact as Python floats): no recompile as they change."""
    beta1, beta2 = betas
    bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step  # bias corrections of the zero-started moments
    for p, grad, exp_avg, exp_avg_sq in zip(ps, grads, exp_avgs, exp_avg_sqs):
        g = grad.float()
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.lerp_(g.square(), 1 - beta2)
        p32 = p if p.dtype == torch.float32 else p.float()
        p32.mul_(1 - lr * weight_decay)  # decoupled: decay the weight, not the gradient
        p32.sub_(exp_avg / ((exp_avg_sq / bc2).sqrt() + eps) * (lr / bc1))
        if p32 is not p:
            p.copy_(p32)


def scalar(x, device, dtype=torch.float64):
    """x as a 0-D tensor on device, made by a fill (no host-to-GPU copy, no sync): what the compiled
    update functions take for the values the schedules change, so a new value never recompiles."""
    return torch.full((), x, dtype=dtype, device=device)


# -----------------------------------------------------------------------------
# The optimizer: the math above, applied per group, and the distributed bookkeeping around it

def ceil_div(a, b):
    return -(-a // b)


def pad_rows(t, world):
    """t with zero rows appended so dim 0 splits evenly into `world` blocks (t itself if it does)."""
    extra = -t.size(0) % world
    return t if extra == 0 else torch.cat([t, t.new_zeros(extra, *t.shape[1:])])


@dataclasses.dataclass(eq=False)
class Unit:
    """What is reduced across ranks as one: an AdamW parameter, or a round of up to W same-shape
    Muon matrices (rank r updates the r-th). grad: what this rank updates once the reduction lands
    (the whole gradient, its block of rows, or one matrix); work: that reduction, in flight."""
    group: int  # index into param_groups
    params: list
    sharded: bool
    n_ready: int = 0  # gradients of this step that are final
    grad: torch.Tensor = None
    work: object = None

    def reset(self):
        self.n_ready, self.grad, self.work = 0, None, None


HYPERPARAMETERS = {"muon": ("lr", "momentum", "beta2", "weight_decay", "ns_steps"),
                   "adamw": ("lr", "betas", "eps", "weight_decay")}


def torch_collectives():
    """torch.distributed's collectives under the names torch 2.13 gives them; earlier releases (a
    cluster's preinstalled torch, say) call two of them reduce_scatter_tensor and all_gather_into_tensor."""
    if hasattr(dist, "reduce_scatter_single"):
        return dist
    return SimpleNamespace(all_reduce=dist.all_reduce, reduce_scatter_single=dist.reduce_scatter_tensor,
                           all_gather_single=dist.all_gather_into_tensor)


class MuonAdamW(torch.optim.Optimizer):
    """param_groups: dicts with kind="muon" (params: 2-D matrices, all of one shape; lr, momentum,
    beta2, weight_decay, ns_steps) or kind="adamw" (params, lr, betas, eps, weight_decay), every
    value given: the recipe is their one source, the optimizer has no defaults of its own.
    Every group also gets initial_lr; step() reads lr, momentum, weight_decay from the group each
    time, so schedules just overwrite them. Every parameter must get a gradient every step.
    compile: torch.compile the two update functions (default: when the parameters are on CUDA, where
    eager mode launches hundreds of small kernels per step; one fused graph per group instead).
    comm: the collectives, torch.distributed's by default (torch_collectives); any object with all_reduce,
    reduce_scatter_single and all_gather_single and a rank and world stands in (bench_model
    --as-rank-of times one rank of a bigger run on one device that way)."""

    def __init__(self, param_groups, compile=None, comm=None):
        for g in param_groups:
            missing = [k for k in HYPERPARAMETERS[g["kind"]] if k not in g]
            assert not missing, f"a {g['kind']} group without {', '.join(missing)}"
        super().__init__(param_groups, {})
        for group in self.param_groups:
            group["initial_lr"] = group["lr"]
            if group["kind"] == "muon":
                shapes = {p.shape for p in group["params"]}
                assert len(shapes) == 1 and len(next(iter(shapes))) == 2, f"one matrix shape per muon group, got {shapes}"
        self.comm = comm or torch_collectives()
        many = dist.is_initialized() and dist.get_world_size() > 1
        self.rank, self.world = (comm.rank, comm.world) if comm else \
            (dist.get_rank(), dist.get_world_size()) if many else (0, 1)
        self.sync_grads = True  # False: backward only accumulates locally (earlier micro-steps)
        if compile is None:
            compile = self.param_groups[0]["params"][0].is_cuda
        # dynamic=False: one graph per group's shapes, compiled once (the step's scalars are 0-D tensors)
        self.muon_update, self.adamw_update = [torch.compile(f, dynamic=False) if compile else f
                                               for f in (muon_update, adamw_update)]

        # Communication units, in a fixed order that is the same on every rank. AdamW: one per param.
        # Muon: one per "round" of W consecutive matrices of a group, reduce-scattered as a (W, m, n)
        # stack, so rank r owns matrices r, r+W, r+2W, ... of its group (any count, any W: a short
        # last round is padded with zero matrices). A round starts as soon as its W gradients exist.
        self.units = []
        for gi, group in enumerate(self.param_groups):
            ps, W = group["params"], self.world
            if group["kind"] == "adamw":
                self.units += [Unit(gi, [p], sharded=W > 1 and p.numel() >= SHARD_MIN_NUMEL) for p in ps]
            else:
                self.units += [Unit(gi, ps[i:i + W], sharded=W > 1) for i in range(0, len(ps), W)]
        self.unit_of = {p: unit for unit in self.units for p in unit.params}
        # Post-accumulate hooks fire once p.grad holds this backward's full gradient. Every rank runs the
        # same graph, so hooks fire (and collectives launch) in the same order everywhere.
        if self.world > 1:
            self.hooks = [p.register_post_accumulate_grad_hook(self._grad_ready) for p in self.unit_of]

    def _grad_ready(self, p):
        if not self.sync_grads:  # an earlier micro-step: keep accumulating locally
            return
        unit = self.unit_of[p]
        if unit.grad is not None:
            raise RuntimeError("gradient reduced twice: set optimizer.sync_grads = False on all but the last micro-step")
        unit.n_ready += 1
        if unit.n_ready == len(unit.params):
            self._reduce(unit)

    def _reduce(self, unit):
        """Start averaging the unit's gradients over ranks. unit.grad becomes what this rank updates:
        the whole gradient (small tensors), its block of rows (large ones) or one matrix (a Muon round)."""
        ps, W = unit.params, self.world
        if self.param_groups[unit.group]["kind"] == "muon":
            grad = torch.stack([p.grad for p in ps] + [torch.zeros_like(ps[0].grad)] * (W - len(ps)))
        else:
            grad = pad_rows(ps[0].grad, W) if unit.sharded else ps[0].grad
        if W == 1:
            unit.grad = grad
        elif not unit.sharded:
            unit.grad, unit.work = grad, self.comm.all_reduce(grad, op=dist.ReduceOp.AVG, async_op=True)
        else:  # gloo supports reduce-scatter and AVG too, so CPU tests run the NCCL code path
            out = grad.new_empty(grad.size(0) // W, *grad.shape[1:])
            unit.grad, unit.work = out, self.comm.reduce_scatter_single(out, grad, op=dist.ReduceOp.AVG, async_op=True)

    def set_schedule(self, lr_multiplier, momentum, muon_weight_decay):
        """This step's scheduled values: every group's LR at lr_multiplier × its initial LR (AdamW's
        decoupled decay lr·wd follows), and Muon's momentum and weight decay."""
        for group in self.param_groups:
            group["lr"] = group["initial_lr"] * lr_multiplier
            if group["kind"] == "muon":
                group["momentum"], group["weight_decay"] = momentum, muon_weight_decay

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None, "closures are not supported"
        for unit in self.units:  # whatever no hook started (one process, sync_grads off, no hooks) starts now
            if unit.grad is None:
                self._reduce(unit)
        gathers = []  # (work, [(dst, src), ...]): copies to make once an all-gather has landed
        for gi, group in enumerate(self.param_groups):
            units = [u for u in self.units if u.group == gi]
            for unit in units:
                if unit.work is not None:
                    unit.work.wait()
            step_fn = self._muon_step if group["kind"] == "muon" else self._adamw_step
            gathers += step_fn(group, units)  # this group's all-gathers overlap the next group's math
        for work, copies in gathers:
            work.wait()
            for dst, src in copies:
                dst.copy_(src)
        for unit in self.units:
            unit.reset()

    def _adamw_step(self, group, units):
        mine = []  # (param, the rows of it this rank updates, their gradient)
        for unit in units:
            p, grad = unit.params[0], unit.grad
            own = p
            if unit.sharded:  # this rank's block of rows: fewer (or none) at the end of the tensor
                own = p[self.rank * grad.size(0):(self.rank + 1) * grad.size(0)]
                grad = grad[:own.size(0)]
            mine.append((p, own, grad))
            state = self.state[p]
            if not state:
                state.update(step=0, exp_avg=torch.zeros_like(own, dtype=torch.float32),
                             exp_avg_sq=torch.zeros_like(own, dtype=torch.float32))
            state["step"] += 1
        mine = [m for m in mine if m[1].numel() > 0]  # a rank may own no rows of a small sharded tensor
        if mine:  # one call per group
            states = [self.state[p] for p, _, _ in mine]  # one step count for all: every param steps every step
            device = mine[0][1].device
            self.adamw_update([own for _, own, _ in mine], [g for _, _, g in mine], [s["exp_avg"] for s in states],
                              [s["exp_avg_sq"] for s in states], scalar(states[0]["step"], device),
                              scalar(group["lr"], device), group["betas"], group["eps"],
                              scalar(group["weight_decay"], device))
        gathers = []
        for unit in units:
            if unit.sharded:  # in-place all-gather: our block is already in place in `full`
                p, k = unit.params[0], unit.grad.size(0)
                full = pad_rows(p, self.world)  # p itself unless rows had to be padded
                work = self.comm.all_gather_single(full, full[self.rank * k:(self.rank + 1) * k], async_op=True)
                gathers.append((work, [(p, full[:p.size(0)])] if full.size(0) != p.size(0) else []))
        return gathers

    def _muon_step(self, group, units):
        # this rank's matrices, one per round (None: a zero pad in the last round), and their gradients
        mine = [u.params[self.rank] if self.rank < len(u.params) else None for u in units]
        grad = torch.cat([u.grad for u in units]).float()  # (R, m, n)
        like = group["params"][0]
        p = torch.stack([q if q is not None else torch.zeros_like(like) for q in mine]).float()
        state = self.state[like]  # one state per group, stacked like p
        if not state:
            R, m, n = grad.shape  # NorMuon keeps one value per row (tall/square) or per column (wide)
            state.update(momentum_buffer=torch.zeros_like(grad),
                         second_moment=grad.new_zeros(R, m, 1) if m >= n else grad.new_zeros(R, 1, n))
        self.muon_update(p, grad, state["momentum_buffer"], state["second_moment"], scalar(group["lr"], p.device),
                         scalar(group["momentum"], p.device, torch.float32),  # fp32 like the buffers it lerps
                         group["beta2"], scalar(group["weight_decay"], p.device), group["ns_steps"],
                         ORTHO_DTYPE or compute_dtype(p.device.type))
        p = p.to(like.dtype)
        if self.world == 1:
            for q, new in zip(group["params"], p):
                q.copy_(new)
            return []
        gathers = []
        for j, unit in enumerate(units):  # round j: every rank contributes its matrix, all get all W
            full = p.new_empty(self.world, *p.shape[1:])
            work = self.comm.all_gather_single(full, p[j:j + 1], async_op=True)
            gathers.append((work, list(zip(unit.params, full.unbind(0)))))
        return gathers

    def load_state_dict(self, state_dict):
        # torch casts loaded state to each parameter's dtype; our moments are fp32 on purpose
        # (also for bf16 parameters), so put back the tensors exactly as saved.
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for i, saved in state_dict["state"].items():
            for key, value in saved.items():
                if torch.is_tensor(value):
                    self.state[params[i]][key] = value.to(params[i].device, copy=True)

    # World-size-independent checkpoints. state_dict() saves each rank's shards as they are, so it only
    # loads back under the same world size. These two convert to and from one full, unsharded state per
    # parameter (what a single process would hold), so a run can resume on any number of ranks.

    def _gather_rows(self, t, k):
        """On rank 0, every rank's block t (its first dim padded with zeros to k) concatenated in rank
        order; None elsewhere: the other ranks only send, so none of them ever holds a full tensor."""
        if t.size(0) < k:
            t = torch.cat([t, t.new_zeros(k - t.size(0), *t.shape[1:])])
        if self.world == 1:
            return t
        full = t.new_empty(self.world * k, *t.shape[1:]) if self.rank == 0 else None
        dist.gather(t.contiguous(), list(full.chunk(self.world)) if full is not None else None, dst=0)
        return full

    def _whole(self, t, rows):
        """The whole tensor from this rank's block t of a tensor sharded by rows (rows=None: t is not
        sharded, every rank holds it whole), dropping the padding rows: on CPU on rank 0, None elsewhere."""
        if rows is not None:
            t = self._gather_rows(t, ceil_div(rows, self.world))
            t = None if t is None else t[:rows]
        return t.to("cpu", copy=True) if self.rank == 0 else None

    @torch.no_grad()
    def full_state_dict(self):
        """Call on every rank (it gathers when world > 1); rank 0 gets the result, the other ranks None
        (gathering to every rank would cost each the whole state in host memory: 8.4 GB at d24).
        Layout as torch's state_dict: state[i] for the i-th parameter of param_groups, full fp32
        tensors on CPU. One tensor at a time, so rank 0's GPU holds one gathered tensor at most."""
        W, state, i, keep = self.world, {}, 0, self.rank == 0
        for group in self.param_groups:
            ps = group["params"]
            if group["kind"] == "adamw":
                for j, p in enumerate(ps):
                    if s := self.state.get(p):
                        rows = p.size(0) if self.unit_of[p].sharded else None
                        state[i + j] = dict(step=s["step"], exp_avg=self._whole(s["exp_avg"], rows),
                                            exp_avg_sq=self._whole(s["exp_avg_sq"], rows))
            elif self.state.get(ps[0]):  # one stacked state per group, under its first matrix
                s, R = self.state[ps[0]], ceil_div(len(ps), W)  # R rounds: this rank's stack has R matrices
                for key, v in s.items():
                    full = self._gather_rows(v, R)
                    for j in range(len(ps)) if keep else ():  # matrix j: round j // W of rank j % W; pads unread
                        state.setdefault(i + j, {})[key] = full[(j % W) * R + j // W].to("cpu", copy=True)
            i += len(ps)
        if not keep:
            return None
        index = {p: n for n, p in enumerate(p for g in self.param_groups for p in g["params"])}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[p] for p in g["params"]]}
                  for g in self.param_groups]
        return dict(state=state, param_groups=groups)

    @torch.no_grad()
    def load_full_state_dict(self, state_dict):
        """Inverse of full_state_dict() under any world size; call on every rank (no communication).
        Each rank keeps only what it owns now, laid out exactly as step() would have created it.
        Only the state (moments, step counts) is loaded: the hyperparameters stay as this optimizer
        was built (the recipe and the schedule set them; nothing to load only to overwrite)."""
        assert len(state_dict["param_groups"]) == len(self.param_groups)
        W, r, i = self.world, self.rank, 0
        self.state.clear()
        for group, saved_group in zip(self.param_groups, state_dict["param_groups"]):
            ps = group["params"]
            assert saved_group["kind"] == group["kind"] and len(saved_group["params"]) == len(ps)
            saved = [state_dict["state"].get(i + j) for j in range(len(ps))]
            fp32 = lambda t: t.to(ps[0].device, torch.float32, copy=True)  # moments stay fp32
            if group["kind"] == "adamw":
                for p, s in zip(ps, saved):
                    if s:  # sharded: this rank's block of rows (fewer or none at the end, like step())
                        k = ceil_div(p.size(0), W) if self.unit_of[p].sharded else None
                        own = lambda t: t if k is None else t[r * k:(r + 1) * k]
                        self.state[p] = dict(step=s["step"], exp_avg=fp32(own(s["exp_avg"])),
                                             exp_avg_sq=fp32(own(s["exp_avg_sq"])))
            elif saved[0]:  # this rank's matrices r, r+W, ... stacked; zero state for the last round's pads
                mine = range(r, ceil_div(len(ps), W) * W, W)
                self.state[ps[0]] = {k: fp32(torch.stack([saved[j][k] if j < len(ps) else torch.zeros_like(v)
                                                          for j in mine])) for k, v in saved[0].items()}
            i += len(ps)


# -----------------------------------------------------------------------------
# Built from the recipe

def build_optimizer(model, groups, compile=None, comm=None):
    """MuonAdamW over a model's parameters, grouped as the recipe says (nanochat.recipe: every LR,
    beta and decay, with its reason; model.param_groups() names the parameters). A Muon group is
    split by matrix shape: Muon orthogonalizes a stack of same-shape matrices at once.
    compile, comm: MuonAdamW's (default: compile the updates on CUDA; torch.distributed)."""
    params, out = model.param_groups(), []
    for g in groups:
        hyper = {k: v for k, v in dataclasses.asdict(g).items() if v is not None}
        if g.kind == "adamw":
            out.append(dict(hyper, params=params[g.name]))
            continue
        by_shape = {}
        for p in params[g.name]:
            by_shape.setdefault(p.shape, []).append(p)
        out += [dict(hyper, params=ps) for ps in by_shape.values()]
    assert sum(len(g["params"]) for g in out) == len(list(model.parameters())), "a parameter has no group"
    return MuonAdamW(out, compile=compile, comm=comm)
