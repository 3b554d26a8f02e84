"""
The training recipe, derived from a handful of plain choices, in one place.

    recipe = derive(depth=24, processes=8, device_batch_size=16, ratio=8)   # the speedrun
    recipe.total_batch_size, recipe.num_iterations, recipe.param_groups, recipe.schedule(2000)

Read it top to bottom: every number below is either a choice (tuned once at d12 with 2^19 tokens
per step) or follows from one by a stated rule. base_train, plan and bench_model all build their
run from `derive`, and base_train and plan take the same flags (add_flags), so what plan prints
is what base_train runs; a flag left out means the choice written here.

The rules, in derivation order:
  1. the model: width = 64 per layer, rounded up to whole heads (GPTConfig.from_depth)
  2. P, the parameters that set the horizon: the block matrices + lm_head (embedding lookups cost
     almost no compute, so they do not count)
  3. total batch B: from P/P_d12 by Power Lines' B ∝ D^0.383, a power of two
  4. horizon: D = ratio × P tokens, steps = floor(D / B); or FLOPs, steps = round(D / B); or steps
  5. learning rates: tuned at d12 and 2^19, scaled by width (s) and batch (b)
  6. weight decay: Muon's ∝ √(B/2^19) × P_d12/P; AdamW's per group, constant
  7. the schedule: LR warmup / constant / warmdown, Muon momentum, Muon weight decay (cosine)
"""
import math
from dataclasses import asdict, dataclass

import torch

from nanochat.cli import BadInput
from nanochat.gpt import GPT, GPTConfig

# --- the choices (tuned at the reference: d12, 2^19 tokens per step) --------------------------

DEPTH = 20  # layers: the one dial
SEQUENCE_LEN = 2048
HEAD_DIM = 128
WINDOW_PATTERN = "SSSL"  # three short-window layers, then a long one (the last is always long)
VOCAB_SIZE = 32768
DEVICE_BATCH_SIZE = 16  # rows per process per micro-step: what fits an 80 GB GPU at d24 with fp8
REF_DEPTH = 12
REF_BATCH = 2 ** 19
DEFAULT_RATIO = 12  # tokens per horizon parameter; compute-optimal measured at ~10.5, a little past it
BATCH_EXPONENT = 0.383  # Power Lines (Bergsma et al. 2025): the optimal batch grows as B ∝ D^0.383
MATRIX_LR = 0.02  # Muon, for every matrix inside the blocks
MUON_WEIGHT_DECAY = 0.28  # at the reference
# Muon momentum: low while early gradients are noisy and change fast, high once they are worth
# remembering, lower again across the warmdown so the annealing settles
MOMENTUM_START, MOMENTUM_PEAK, MOMENTUM_END = 0.85, 0.97, 0.90
MOMENTUM_WARMUP_STEPS = 400
# AdamW, per group: the LR at the reference, whether it scales with width (s) and with batch (b),
# the betas and the (decoupled) weight decay. Rule 5 below gives s and b.
#                  lr     × s    × b    betas          decay
ADAMW_GROUPS = {
    # the output head: a small LR, β2 0.96 (its gradients shift with the data mix), light decay
    "lm_head":       (0.008, True,  True,  (0.8, 0.96),  0.01),
    # embeddings see sparse rows: a long second-moment memory (0.995) keeps rare tokens' steps sane;
    # the token embedding's decay is tiny (rare rows would otherwise shrink between their updates)
    "wte":           (0.3,   True,  True,  (0.8, 0.995), 0.001),
    "value_embeds":  (0.15,  True,  True,  (0.8, 0.995), 0.01),
    # per-layer scalars: resid_lambdas decay toward 0 (pull the stream scale down), x0_lambdas are
    # slow-moving (β1 0.96) and free
    "resid_lambdas": (0.005, False, True,  (0.8, 0.95),  0.05),
    "x0_lambdas":    (0.5,   False, True,  (0.96, 0.95), 0.0),
    # smear gate and λs: tiny scalars, one fixed LR (not batch-scaled: their gradient is not noisy)
    "smear_backout": (0.2,   False, False, (0.8, 0.95),  0.0),
}
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
        # momentum: the ramp MOMENTUM_START -> PEAK for every step before MOMENTUM_WARMUP_STEPS, then
        # PEAK -> END across the warmdown. A warmdown that starts earlier (a run of up to ~1,100 steps)
        # waits for the ramp to end, and the momentum jumps there: the record's rule, kept exactly.
        if step < MOMENTUM_WARMUP_STEPS:
            momentum = MOMENTUM_START + (MOMENTUM_PEAK - MOMENTUM_START) * step / MOMENTUM_WARMUP_STEPS
        else:
            momentum = MOMENTUM_PEAK - (MOMENTUM_PEAK - MOMENTUM_END) * (1 - p)
        # Muon weight decay: cosine to 0, so the last steps are not pulled toward zero
        wd = self.muon_weight_decay * 0.5 * (1 + math.cos(math.pi * step / steps))
        return Schedule(lrm, momentum, wd)

    def to_json(self, schedule_steps=None):
        """The recipe as plain JSON; the schedule at the given steps, or at a few telling ones."""
        steps = schedule_steps or sorted({s for s in (0, 39, 400, 2000, 3500, 5000) if s < self.num_iterations}
                                         | {self.num_iterations - 1})
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


def param_groups(s, b, matrix_lr, muon_wd):
    """The optimizer groups at LR multiplier 1, for width scale s and batch scale b (rule 5): the
    AdamW groups of ADAMW_GROUPS, then every matrix inside the blocks (value-embedding gates
    included) under Muon."""
    adamw = tuple(Group(name, "adamw", lr * (s if by_width else 1) * (b if by_batch else 1), betas, ADAMW_EPS, wd)
                  for name, (lr, by_width, by_batch, betas, wd) in ADAMW_GROUPS.items())
    return adamw + (Group("matrices", "muon", matrix_lr * b, None, None, muon_wd, momentum=MOMENTUM_START,
                          beta2=NORMUON_BETA2, ns_steps=NS_STEPS),)


def derive(depth=None, vocab_size=None, sequence_len=None, head_dim=None, window_pattern=None, processes=1,
           device_batch_size=None, ratio=None, num_iterations=None, target_flops=None, total_batch_size=None,
           matrix_lr=None, weight_decay=None, warmup_steps=None, warmdown_ratio=None, final_lr_frac=None):
    """The whole run from plain values; None (a flag left out) means the choice at the top of this
    file. Horizon: num_iterations, else target_flops, else ratio. Raises ValueError for a batch
    that the processes cannot split."""
    pick = lambda value, choice: choice if value is None else value  # noqa: E731
    # 1. the model (the one place a GPTConfig is made from settings)
    config = GPTConfig.from_depth(pick(depth, DEPTH), vocab_size=pick(vocab_size, VOCAB_SIZE),
                                  sequence_len=pick(sequence_len, SEQUENCE_LEN), head_dim=pick(head_dim, HEAD_DIM),
                                  window_pattern=pick(window_pattern, WINDOW_PATTERN))
    counts, flops_per_token = model_sizes(config)
    # 2. P for this model and for the reference (same vocab), which the hyperparameters were tuned on
    P = horizon_params(counts)
    P_ref = horizon_params(model_sizes(GPTConfig.from_depth(REF_DEPTH, vocab_size=config.vocab_size))[0])

    # 3. total batch. A longer horizon D wants a bigger batch, B ∝ D^0.383 (Power Lines). The
    # reference horizon is taken at THIS run's tokens-per-parameter ratio, D_ref = ratio × P_ref, so
    # D / D_ref = P / P_ref: the batch follows the model size (d12: 2^19; d20, d24, d26: 2^20).
    B = total_batch_size or 2 ** round(math.log2(REF_BATCH * (P / P_ref) ** BATCH_EXPONENT))
    device_batch_size = pick(device_batch_size, DEVICE_BATCH_SIZE)
    micro = device_batch_size * config.sequence_len * processes  # tokens per micro-step, all processes
    # Refused rather than raised to one micro-step: the LRs and the weight decay scale with B, so a
    # silently larger batch would change them too.
    if B < micro:
        raise BadInput(f"the total batch of {B:,} tokens is smaller than one micro-step: device batch × seq len × "
                       f"processes = {device_batch_size} × {config.sequence_len} × {processes} = {micro:,}: lower "
                       f"--device-batch-size or raise --total-batch-size")
    if B % micro:
        raise BadInput(f"--total-batch-size {B} is not a multiple of device batch × seq len × processes = "
                       f"{micro}: change --total-batch-size or --device-batch-size")

    # 4. horizon. For a tokens-per-parameter ratio, steps = floor(D / B): never more tokens than asked.
    # For a FLOPs budget the nearest whole step, as the record does (an isoFLOP grid compares runs at
    # equal compute, and rounding misses it by at most half a step either way).
    if num_iterations:
        steps = num_iterations
    elif target_flops:
        steps = max(1, round(target_flops / (flops_per_token * B)))
    else:
        steps = max(1, int(int(pick(ratio, DEFAULT_RATIO) * P) // B))

    # 5. learning rates. s: wider layers take smaller AdamW steps (∝ 1/√width, μP-like); b: a
    # batch k× bigger averages away k× the gradient noise, so the step can grow by √k.
    s = (config.n_embd / 768) ** -0.5
    b = (B / REF_BATCH) ** 0.5
    # 6. Muon weight decay. What matters is the EMA timescale of the weights, 1/(lr·λ) steps, as a
    # fraction of the run (the "T_epoch" argument: Wang & Aitchison 2024, "How to set AdamW's weight
    # decay as you scale model and dataset size"). Tuned as 0.28 at the reference; with lr ∝ √b and
    # steps ∝ D/B this keeps the timescale fixed for λ ∝ √(B/2^19) × D_ref/D = √(B/2^19) × P_ref/P.
    muon_wd = pick(weight_decay, MUON_WEIGHT_DECAY * b * P_ref / P)

    groups = param_groups(s, b, pick(matrix_lr, MATRIX_LR), muon_wd)
    return Recipe(config=config, processes=processes, device_batch_size=device_batch_size, total_batch_size=B,
                  grad_accum_steps=B // micro, num_iterations=steps, tokens=steps * B,
                  flops_per_token=flops_per_token, num_params=counts, horizon_params=P, muon_weight_decay=muon_wd,
                  param_groups=groups, warmup_steps=pick(warmup_steps, WARMUP_STEPS),
                  warmdown_ratio=pick(warmdown_ratio, WARMDOWN_RATIO), final_lr_frac=pick(final_lr_frac, FINAL_LR_FRAC))


# --- the flags that shape a run: base_train and plan take exactly these ------------------------

def add_flags(parser):
    """The flags that shape a run. Each left out is the choice at the top of this file (--help
    shows it), so an edit there changes what every script runs, and plan given base_train's flags
    derives base_train's run."""
    p = parser.add_argument_group("the run (every value follows from --depth unless given)")
    p.add_argument("--depth", type=int, help=f"layers: the one dial (default: {DEPTH})")
    p.add_argument("--head-dim", type=int, help=f"channels per attention head, even (default: {HEAD_DIM})")
    p.add_argument("--max-seq-len", type=int, help="context length: tokens per training row, the most the model "
                   f"ever attends to (default: {SEQUENCE_LEN})")
    p.add_argument("--window-pattern", help="S = short window (a quarter of the context), L = long; tiled over the "
                   f"layers, the last layer always long (default: {WINDOW_PATTERN})")
    p.add_argument("--fp8", action="store_true", help="fp8 matmuls in the blocks (CUDA, compute capability 8.9+)")
    p.add_argument("--num-iterations", type=int,
                   help="optimizer steps (default: auto, from --target-flops or --target-param-data-ratio)")
    p.add_argument("--target-flops", type=float, help="training FLOPs; steps = round(FLOPs / (FLOPs per token × "
                   "total batch)) (default: auto, from --target-param-data-ratio)")
    p.add_argument("--target-param-data-ratio", type=float, help="training tokens per (matrix + lm_head) "
                   f"parameter; steps = floor(tokens / total batch) (default: {DEFAULT_RATIO})")
    p.add_argument("--device-batch-size", help="rows per process per micro-step, or 'auto': the largest power of "
                   f"two that fits (base_train probes the GPU, plan estimates) (default: {DEVICE_BATCH_SIZE})")
    p.add_argument("--total-batch-size", type=int, help="tokens per optimizer step, all processes; the rest is "
                   "gradient accumulation (default: auto, from the depth)")
    p.add_argument("--matrix-lr", type=float, help="Muon LR at 2^19 tokens per step; every LR but the smear's "
                   f"is scaled by sqrt(total batch / 2^19) (default: {MATRIX_LR})")
    p.add_argument("--weight-decay", type=float, help="Muon weight decay (default: auto, from the batch and the depth)")
    p.add_argument("--warmup-steps", type=int, help=f"steps of linear LR warmup (default: {WARMUP_STEPS})")
    p.add_argument("--warmdown-ratio", type=float,
                   help=f"fraction of the steps over which the LR decays at the end (default: {WARMDOWN_RATIO})")
    p.add_argument("--final-lr-frac", type=float,
                   help=f"the LR at the last step, as a fraction of the peak (default: {FINAL_LR_FRAC})")


def flag_problems(args):
    """(bad, message) pairs for impossible values of add_flags' flags (cli.check takes them)."""
    given = lambda name: getattr(args, name) is not None  # noqa: E731
    auto = "leave the flag out for auto"
    dbs = args.device_batch_size
    return [
        (given("depth") and args.depth < 1, f"--depth {args.depth}: must be >= 1 (the number of layers)"),
        (given("head_dim") and (args.head_dim < 2 or args.head_dim % 2),
         f"--head-dim {args.head_dim}: must be even (rotary rotates pairs)"),
        (given("max_seq_len") and args.max_seq_len < 1, f"--max-seq-len {args.max_seq_len}: must be positive"),
        (given("window_pattern") and (not args.window_pattern or set(args.window_pattern) - set("SL")),
         f"--window-pattern {args.window_pattern!r}: use the letters S (short window) and L (long), e.g. SSSL"),
        (given("num_iterations") and args.num_iterations < 1,
         f"--num-iterations {args.num_iterations}: must be >= 1 ({auto})"),
        (given("target_flops") and not args.target_flops > 0,
         f"--target-flops {args.target_flops}: must be > 0 ({auto})"),
        (given("num_iterations") and given("target_flops"),
         "--num-iterations and --target-flops are both set: give one training horizon"),
        (given("target_param_data_ratio") and not args.target_param_data_ratio > 0,
         f"--target-param-data-ratio {args.target_param_data_ratio}: must be > 0"),
        (dbs is not None and dbs != "auto" and not (dbs.isdigit() and int(dbs) > 0),
         f"--device-batch-size {dbs}: expected a positive integer or 'auto'"),
        (given("total_batch_size") and args.total_batch_size < 1,
         f"--total-batch-size {args.total_batch_size}: must be >= 1 tokens ({auto})"),
        (given("matrix_lr") and not args.matrix_lr > 0, f"--matrix-lr {args.matrix_lr}: must be > 0"),
        (given("weight_decay") and args.weight_decay < 0, f"--weight-decay {args.weight_decay}: must be >= 0 ({auto})"),
        (given("warmup_steps") and args.warmup_steps < 0, f"--warmup-steps {args.warmup_steps}: must be >= 0"),
        (given("warmdown_ratio") and not 0 <= args.warmdown_ratio <= 1,
         f"--warmdown-ratio {args.warmdown_ratio}: must be in [0, 1]"),
        (given("final_lr_frac") and not 0 <= args.final_lr_frac <= 1,
         f"--final-lr-frac {args.final_lr_frac}: must be in [0, 1]"),
    ]


def from_flags(args, vocab_size, processes, device_batch_size=None):
    """The recipe of add_flags' flags. device_batch_size: the batch 'auto' settled on (else the flag's)."""
    if device_batch_size is None and args.device_batch_size not in (None, "auto"):
        device_batch_size = int(args.device_batch_size)
    return derive(depth=args.depth, vocab_size=vocab_size, sequence_len=args.max_seq_len, head_dim=args.head_dim,
                  window_pattern=args.window_pattern, processes=processes, device_batch_size=device_batch_size,
                  ratio=args.target_param_data_ratio, num_iterations=args.num_iterations,
                  target_flops=args.target_flops, total_batch_size=args.total_batch_size, matrix_lr=args.matrix_lr,
                  weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
                  warmdown_ratio=args.warmdown_ratio, final_lr_frac=args.final_lr_frac)
