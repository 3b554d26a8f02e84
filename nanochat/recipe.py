"""
The training recipe, derived from a handful of plain choices, in one place.

    recipe = derive(depth=24, processes=8, device_batch_size=16, ratio=8)   # the speedrun
    recipe.total_batch_size, recipe.num_iterations, recipe.param_groups, recipe.schedule(2000)

Read it top to bottom: every number below is either a choice (tuned once at d12 with 2^19 tokens
per step) or follows from one by a stated rule. base_train, plan and bench_model all build their
run from `derive`, so what plan prints is what base_train runs.

The rules, in derivation order:
  1. the model: width = 64 per layer, rounded up to whole heads (GPTConfig.from_depth)
  2. P, the parameters that set the horizon: the block matrices + lm_head (embedding lookups cost
     almost no compute, so they do not count)
  3. total batch B: from P/P_d12 by Power Lines' B ∝ D^0.383, a power of two
  4. horizon: D = ratio × P tokens (or given steps or FLOPs); steps = floor(D / B)
  5. learning rates: tuned at d12 and 2^19, scaled by width (s) and batch (b)
  6. weight decay: Muon's ∝ √(B/2^19) × P_d12/P; AdamW's per group, constant
  7. the schedule: LR warmup / constant / warmdown, Muon momentum, Muon weight decay (cosine)
"""
import math
from dataclasses import asdict, dataclass

import torch

from nanochat.gpt import GPT, GPTConfig

# --- the choices (tuned at the reference: d12, 2^19 tokens per step) --------------------------

REF_DEPTH = 12
REF_BATCH = 2 ** 19
DEFAULT_RATIO = 12  # tokens per horizon parameter; compute-optimal measured at ~10.5, a little past it
BATCH_EXPONENT = 0.383  # Power Lines (Bergsma et al. 2025): the optimal batch grows as B ∝ D^0.383
MATRIX_LR = 0.02  # Muon, for every matrix inside the blocks
MUON_WEIGHT_DECAY = 0.28  # at the reference
NORMUON_BETA2 = 0.9  # NorMuon's second-moment EMA
NS_STEPS = 5  # Polar Express iterations
ADAMW_EPS = 1e-10  # tiny: the embeddings' rare rows get gradients of ~1e-8 and must still move
WARMUP_STEPS = 40
WARMDOWN_RATIO = 0.65  # the last 65% of the steps anneal the LR
FINAL_LR_FRAC = 0.05  # ...down to 5% of the peak (not 0: the last steps still learn)


@dataclass(frozen=True)
class Group:
    """One optimizer group. lr is the value at LR multiplier 1.0 (for Muon, before the per-matrix
    √max(1, rows/cols) factor); betas and eps are None for Muon; weight_decay is AdamW's constant
    decoupled decay (applied as lr·wd, so it follows the schedule) or Muon's λ at step 0."""
    name: str  # GPT.param_groups() key
    kind: str  # "adamw" | "muon"
    lr: float
    betas: tuple = None
    eps: float = None
    weight_decay: float = 0.0
    momentum: float = None  # Muon only: the starting momentum (the schedule sets it every step)
    beta2: float = None  # Muon only: NorMuon's second-moment EMA
    ns_steps: int = None  # Muon only: Polar Express iterations


@dataclass(frozen=True)
class Schedule:
    lr_multiplier: float
    momentum: float
    muon_weight_decay: float


@dataclass(frozen=True)
class Recipe:
    config: GPTConfig
    processes: int
    device_batch_size: int
    total_batch_size: int
    grad_accum_steps: int
    num_iterations: int
    tokens: int  # num_iterations × total_batch_size: what is actually trained on
    flops_per_token: int
    num_params: dict  # by group, as GPT.num_params()
    horizon_params: int  # P: block matrices + lm_head
    muon_weight_decay: float
    param_groups: tuple  # of Group
    warmup_steps: int = WARMUP_STEPS
    warmdown_ratio: float = WARMDOWN_RATIO
    final_lr_frac: float = FINAL_LR_FRAC

    def schedule(self, step):
        """LR multiplier, Muon momentum and Muon weight decay for the update step -> step + 1."""
        steps = self.num_iterations
        warmdown = round(self.warmdown_ratio * steps)
        # p: 1 -> 0 across the warmdown (the last `warmdown` steps), 1 before it
        p = (steps - step) / warmdown if step > steps - warmdown else 1.0
        # LR: linear warmup from 1/40 (Adam's early moments are noisy), flat, then linear down to 5%
        lrm = (step + 1) / self.warmup_steps if step < self.warmup_steps else p + (1 - p) * self.final_lr_frac
        # momentum 0.85 -> 0.97 over the first 400 steps (early gradients are noisy and change
        # fast, later ones are worth remembering), then 0.97 -> 0.90 across the warmdown (a shorter
        # memory lets the annealing settle)
        momentum = 0.85 + 0.12 * min(1.0, step / 400) - 0.07 * (1 - p)
        # Muon weight decay: cosine to 0, so the last steps are not pulled toward zero
        wd = self.muon_weight_decay * 0.5 * (1 + math.cos(math.pi * step / steps))
        return Schedule(lrm, momentum, wd)

    def to_json(self, schedule_steps=(0, 39, 400, 2000, 3500, 5000)):
        steps = sorted({s for s in schedule_steps if s < self.num_iterations} | {self.num_iterations - 1})
        return {
            "depth": self.config.n_layer, "model_config": asdict(self.config), "processes": self.processes,
            "total_batch_size": self.total_batch_size, "device_batch_size": self.device_batch_size,
            "grad_accum_steps": self.grad_accum_steps, "num_iterations": self.num_iterations,
            "tokens": self.tokens, "flops_per_token": self.flops_per_token, "num_params": self.num_params,
            "horizon_params": self.horizon_params, "muon_weight_decay": self.muon_weight_decay,
            "param_groups": [{k: list(v) if k == "betas" and v else v for k, v in asdict(g).items()
                              if v is not None or k in ("betas", "eps")} for g in self.param_groups],
            "schedule": {str(s): asdict(self.schedule(s)) for s in steps},
        }


def model_sizes(config):
    """(params by group, FLOPs per token) of a config, without allocating anything."""
    with torch.device("meta"):
        model = GPT(config)
    return model.num_params(), model.estimate_flops()


def horizon_params(counts):
    return counts["transformer_matrices"] + counts["lm_head"]


def derive(depth=20, vocab_size=32768, sequence_len=2048, head_dim=128, window_pattern="SSSL",
           processes=1, device_batch_size=16, ratio=DEFAULT_RATIO, num_iterations=None, target_flops=None,
           total_batch_size=None, matrix_lr=MATRIX_LR, weight_decay=None, warmup_steps=WARMUP_STEPS,
           warmdown_ratio=WARMDOWN_RATIO, final_lr_frac=FINAL_LR_FRAC):
    """The whole run from plain values. Horizon: num_iterations, else target_flops, else ratio.
    total_batch_size / weight_decay: None derives them (the usual case)."""
    # 1. the model (the one place a GPTConfig is made from settings)
    config = GPTConfig.from_depth(depth, vocab_size=vocab_size, sequence_len=sequence_len, head_dim=head_dim,
                                  window_pattern=window_pattern)
    counts, flops_per_token = model_sizes(config)
    # 2. P for this model and for the reference (same vocab), which the hyperparameters were tuned on
    P = horizon_params(counts)
    P_ref = horizon_params(model_sizes(GPTConfig.from_depth(REF_DEPTH, vocab_size=vocab_size))[0])

    # 3. total batch. A longer horizon D wants a bigger batch, B ∝ D^0.383 (Power Lines). The
    # reference horizon is taken at THIS run's tokens-per-parameter ratio, D_ref = ratio × P_ref, so
    # D / D_ref = P / P_ref: the batch follows the model size (d12: 2^19; d20, d24, d26: 2^20).
    B = total_batch_size or 2 ** round(math.log2(REF_BATCH * (P / P_ref) ** BATCH_EXPONENT))
    micro = device_batch_size * sequence_len * processes  # tokens per micro-step, all processes
    B = max(B, micro)
    if B % micro:
        raise ValueError(f"--total-batch-size {B} is not a multiple of device batch × seq len × processes = "
                         f"{micro}: change --total-batch-size or --device-batch-size")

    # 4. horizon: tokens D, steps = floor(D / B) (never more tokens than asked for)
    if num_iterations:
        steps = num_iterations
    else:
        D = target_flops / flops_per_token if target_flops else int(ratio * P)
        steps = max(1, int(D // B))

    # 5. learning rates. s: wider layers take smaller AdamW steps (∝ 1/√width, μP-like); b: a
    # batch k× bigger averages away k× the gradient noise, so the step can grow by √k.
    s = (config.n_embd / 768) ** -0.5
    b = (B / REF_BATCH) ** 0.5
    # 6. Muon weight decay. What matters is the EMA timescale of the weights, 1/(lr·λ) steps, as a
    # fraction of the run (the "T_epoch" argument: Wang & Aitchison 2024, "How to set AdamW's weight
    # decay as you scale model and dataset size"). Tuned as 0.28 at the reference; with lr ∝ √b and
    # steps ∝ D/B this keeps the timescale fixed for λ ∝ √(B/2^19) × D_ref/D = √(B/2^19) × P_ref/P.
    muon_wd = weight_decay if weight_decay is not None else MUON_WEIGHT_DECAY * b * P_ref / P

    adamw = lambda name, lr, betas, wd: Group(name, "adamw", lr, betas, ADAMW_EPS, wd)  # noqa: E731
    groups = (
        # the output head: small LR, β2 0.96 (its gradients shift with the data mix), light decay
        adamw("lm_head", 0.008 * s * b, (0.8, 0.96), 0.01),
        # embeddings see sparse rows: a long second-moment memory (0.995) keeps rare tokens' steps sane;
        # the token embedding's decay is tiny (rare rows would otherwise shrink between their updates)
        adamw("wte", 0.3 * s * b, (0.8, 0.995), 0.001),
        adamw("value_embeds", 0.15 * s * b, (0.8, 0.995), 0.01),
        # per-layer scalars: resid_lambdas decay toward 0 (pull the stream scale down), x0_lambdas
        # are slow-moving (β1 0.96) and free
        adamw("resid_lambdas", 0.005 * b, (0.8, 0.95), 0.05),
        adamw("x0_lambdas", 0.5 * b, (0.96, 0.95), 0.0),
        # smear gate and λs: tiny scalars, one fixed LR (not batch-scaled: their gradient is not noisy)
        adamw("smear_backout", 0.2, (0.8, 0.95), 0.0),
        # every matrix inside the blocks (value-embedding gates included): Muon
        Group("matrices", "muon", matrix_lr * b, None, None, muon_wd, momentum=0.85, beta2=NORMUON_BETA2,
              ns_steps=NS_STEPS),
    )
    return Recipe(config=config, processes=processes, device_batch_size=device_batch_size, total_batch_size=B,
                  grad_accum_steps=B // micro, num_iterations=steps, tokens=steps * B,
                  flops_per_token=flops_per_token, num_params=counts, horizon_params=P, muon_weight_decay=muon_wd,
                  param_groups=groups, warmup_steps=warmup_steps, warmdown_ratio=warmdown_ratio,
                  final_lr_frac=final_lr_frac)
