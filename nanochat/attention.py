"""
Attention: one function, attention(q, k, v, window), causal, with a sliding window.

Tensors use flash-attn's layout, (B, T, H, D). Attention is always causal, with the queries
aligned to the END of the keys: query i sits at absolute position Tk - Tq + i. Training has
Tq == Tk; a KV-cache decode step has a few new queries against the whole cache, and the same
rule covers both. A sliding window lets the query at position t see key j iff
0 <= t - j <= window (flash-attn's window_size=(window, 0)); window >= Tk is plain causal.

sdpa_attention() right below is the reference: PyTorch's scaled_dot_product_attention with that
rule as a boolean mask, on any device. It is what attention computes, and what runs on a CPU.
The fast GPU kernels sit apart, further down, each tested against it (tests/test_attention.py,
scripts/gpu_check.py). One backend is chosen per process, the first that loads, best first;
NANOCHAT_ATTN=<name> forces one and fails loudly if it cannot run here:
  fa3   flash-attn 3, Hopper                          import flash_attn_interface (build from source)
  fa4   flash-attn 4 (CuTe DSL), Hopper and Blackwell  from flash_attn.cute import ... (pip: the
        `gpu` extra, a pure-Python wheel that compiles its kernels at first use; no source build)
  flex  FlexAttention, any CUDA GPU: block-sparse, so short windows skip whole tiles
  sdpa  the reference, anywhere; the default off CUDA
"""
import functools
import os

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from nanochat.cli import BadInput, Unavailable
from nanochat.common import print0


def attention(q, k, v, window):
    """Causal attention of q (B, Tq, H, D) over k, v (B, Tk, H, D), Tq <= Tk, queries aligned to
    the end of the keys, sliding window `window`. Returns (B, Tq, H, D) in q's dtype (possibly a
    non-contiguous view: use .reshape, or .contiguous() before .view)."""
    if _chosen is None:
        get_backend(q.device, q.dtype)
    return _chosen[1](q, k, v, window)


def window_mask(window, Tq, Tk, device):
    """(Tq, Tk) booleans, True where the query may see the key."""
    t = torch.arange(Tk - Tq, Tk, device=device)[:, None]  # absolute positions of the queries
    j = torch.arange(Tk, device=device)[None, :]
    return (j <= t) & (t - j <= window)


def sdpa_attention(q, k, v, window):
    """The reference. The mask is built on every call: it costs little next to the attention it
    masks, and since nothing is cached, a compiled graph reads no global state, so evaluation and
    sampling at other shapes can never make it recompile."""
    Tq, Tk = q.size(1), k.size(1)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # SDPA wants (B, H, T, D)
    if Tq == Tk and window >= Tk:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # lets SDPA pick flash
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=window_mask(window, Tq, Tk, q.device))
    return out.transpose(1, 2)


# =============================================================================
# The fast kernels: the same function, for speed on GPUs. Each takes and returns (B, T, H, D).

_flash_fn = None  # flash_attn_func of flash-attn 3 or 4, whichever loaded
_no_window = -1   # how that version spells "no window": -1 for flash-attn 3, None for 4
_flex_fn = None   # flex_attention, compiled on CUDA


def _flash(q, k, v, window):
    return _flash_with(_flash_fn, _no_window, q, k, v, window)


def _flash_with(flash_fn, no_window, q, k, v, window):
    # flash-attn aligns causality to the end of the keys by itself. "No window" picks the plain
    # causal kernel instead of the (slower) local one; flash-attn 4 reads a left window of -1 with
    # a right one of 0 as a local window, so it gets None.
    left = window if window < k.size(1) else no_window
    out = flash_fn(q, k, v, causal=True, window_size=(left, 0))
    return out[0] if isinstance(out, tuple) else out  # some versions also return the log-sum-exp


# FlexAttention needs a BlockMask per (window, shape), which is slow to build, so those of the
# training shapes are built once, before anything is compiled (build_model calls prepare_flex), and
# kept in _flex_masks. Compiled code reads that dict, and torch.compile guards on what it reads: a
# dict that changed after compiling would recompile the whole model. Nothing else ever writes it.
_flex_masks = {}  # (window, Tq, Tk, device) -> BlockMask


def _block_mask(window, Tq, Tk, device):
    """window_mask's rule as a FlexAttention BlockMask: tiles that are fully masked (everything
    farther back than the window) are never computed."""
    offset = Tk - Tq

    def causal_window(b, h, q_idx, kv_idx):
        t = q_idx + offset
        return (kv_idx <= t) & (t - kv_idx <= window)

    return create_block_mask(causal_window, None, None, Tq, Tk, device=device)


def prepare_flex(windows, T, device):
    """Build flex's block masks for the training shape (sequence length T, these per-layer windows)
    before torch.compile traces the model, so that it finds them instead of recompiling once to
    pick them up. They also mark the shapes that the compiled flex kernel runs (see _flex). A no-op
    unless flex is the backend. Returns how many masks were built."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # q.device always carries the index
        device = torch.device("cuda", torch.cuda.current_device())
    if get_backend(device) != "flex":
        return 0
    needed = [(w, T, T, device) for w in sorted(set(windows)) if (w, T, T, device) not in _flex_masks]
    for key in needed:
        _flex_masks[key] = _block_mask(*key)
    return len(needed)


def _flex_block_mask(window, Tq, Tk, device):
    key = (window, Tq, Tk, device)
    if key in _flex_masks:
        return _flex_masks[key]
    mask = _block_mask(*key)
    if torch.compiler.is_compiling():  # a training shape nobody prepared: kept; one recompile picks it up
        _flex_masks[key] = mask
    return mask


def _flex(q, k, v, window):
    # The compiled flex kernel specializes on every new shape. Uncompiled callers at shapes other
    # than training's (CORE's variable lengths, every KV-cache decode step) would recompile it per
    # call until dynamo's limit of 8, after which flex runs unfused and materializes every score
    # (an in-training CORE took seconds per item: docs/PERF.md). The reference takes any shape
    # without compiling and applies the same rule, so those calls go there.
    if not torch.compiler.is_compiling() and (window, q.size(1), k.size(1), q.device) not in _flex_masks:
        return sdpa_attention(q, k, v, window)
    return _flex_kernel(q, k, v, window)


def _flex_kernel(q, k, v, window):
    return _flex_with(_flex_fn, q, k, v, window)


def _flex_with(flex_fn, q, k, v, window):
    block_mask = _flex_block_mask(window, q.size(1), k.size(1), q.device)
    out = flex_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask)
    return out.transpose(1, 2)

# -----------------------------------------------------------------------------
# Loaders: return the kernel if it can run on (device, dtype), raise saying why not otherwise.


def _need_gpu(device, dtype, majors):
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] not in majors:
        raise RuntimeError(f"needs a CUDA GPU of compute capability {' or '.join(f'{m}.x' for m in majors)}")
    if dtype not in (torch.bfloat16, torch.float16):
        raise RuntimeError(f"needs bf16 or fp16 inputs, got {dtype}")


def _load_fa3(device, dtype):
    global _flash_fn, _no_window
    _need_gpu(device, dtype, (9,))
    from flash_attn_interface import flash_attn_func
    _flash_fn, _no_window = flash_attn_func, -1
    return _flash


def _load_fa4(device, dtype):
    global _flash_fn, _no_window
    _need_gpu(device, dtype, (9, 10))
    from flash_attn.cute import flash_attn_func
    # FA4 is not a torch custom op (yet): dynamo cannot trace into its CuTe launcher, so run it
    # outside the graph. That costs a graph break per layer under torch.compile.
    _flash_fn, _no_window = torch.compiler.disable(flash_attn_func), None
    return _flash


def _load_flex(device, dtype):
    global _flex_fn
    # Uncompiled, flex materializes the full score matrix: fine for tests on CPU, not for training.
    _flex_fn = torch.compile(flex_attention) if device.type == "cuda" else flex_attention
    return _flex


def _load_sdpa(device, dtype):
    return sdpa_attention


BACKENDS = {  # name -> (what it is, loader), in auto-selection order
    "fa3": ("flash-attn 3", _load_fa3),
    "fa4": ("flash-attn 4", _load_fa4),
    "flex": ("FlexAttention", _load_flex),
    "sdpa": ("PyTorch SDPA", _load_sdpa),
}


def load_kernel(name, device, dtype):
    """The kernel of one backend, for checking it against others (tests, gpu_check), without
    touching the process's choice: the globals the loader sets are restored, and the returned
    kernel carries its own flash-attn / flex function. For flex it is the kernel itself, not the
    router that sends untrained shapes to SDPA. Raises like the loader if it cannot run here."""
    global _flash_fn, _no_window, _flex_fn
    saved = _flash_fn, _no_window, _flex_fn
    try:
        kernel = BACKENDS[name][1](device, dtype)  # looked up on each call: tests swap in broken loaders
        flash_fn, no_window, flex_fn = _flash_fn, _no_window, _flex_fn
    finally:
        _flash_fn, _no_window, _flex_fn = saved
    if kernel is _flash:
        return functools.partial(_flash_with, flash_fn, no_window)
    if kernel is _flex:
        return functools.partial(_flex_with, flex_fn)
    return kernel


_chosen = None  # (name, kernel) once picked
trial_failures = {}  # fast kernels that loaded but failed their trial run: name -> why (gpu_check shows it)

# torch==2.13.0 from PyPI is a CUDA 13 build, hence flash-attn-4's cu13 extra
FAST_KERNEL_INSTALL = "pip install -e '.[gpu]'   (flash-attn-4[cu13], a wheel: no compilation)"


def _auto_choose(device, dtype, head_dim, windows, names=None):
    """The first backend that loads and passes its trial run, and why each faster one did not."""
    why_not = {}
    # flash-attn and flex target NVIDIA GPUs; a ROCm build of torch (torch.version.hip) uses SDPA
    names = names or (list(BACKENDS) if device.type == "cuda" and not torch.version.hip else ["sdpa"])
    for name in names:
        try:
            kernel = BACKENDS[name][1](device, dtype)
        except Exception as e:  # not installed, or not this GPU: try the next one
            why_not[name] = f"{type(e).__name__}: {e}"
            continue
        try:
            if name in ("fa3", "fa4"):
                _trial(kernel, device, dtype, head_dim, windows)
            return (name, kernel), why_not
        except Exception as e:  # loads, but cannot run this model: a paid run must not die on it
            why_not[name] = f"imports, but failed a trial run ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    raise AssertionError("sdpa always loads")


def _trial(kernel, device, dtype, head_dim, windows):
    """Forward and backward once, one row of one head, at the model's head dim and each of its
    windows over the longest one: a flash-attn release that imports but lacks a window size, a head
    dim or a backward fails here, at selection, instead of in the first training step."""
    T = max(windows)
    q, k, v = (torch.randn(1, T, 1, head_dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    for window in sorted(set(windows)):
        kernel(q, k, v, window).float().sum().backward()


def is_slow_fallback(device, name):
    """True where backend `name` stands in for flash-attn on the GPUs flash-attn targets (Hopper,
    Blackwell): FlexAttention there costs roughly 5-10 % of the step time."""
    if device.type != "cuda" or torch.version.hip or name in ("fa3", "fa4"):  # flash-attn is not built for ROCm
        return False
    return torch.cuda.get_device_capability(device)[0] in (9, 10)


def _warn_if_slow(device, name, why_not):
    """Say so, in one line nobody can miss, when a fast kernel did not load or failed its trial."""
    failed = {n: why for n, why in why_not.items() if why.startswith("imports, but")}
    if failed:
        print0(f"WARNING: attention falls back to {name}: " + "; ".join(f"{n} {why}" for n, why in failed.items()))
    elif is_slow_fallback(device, name):
        print0(f"WARNING: attention falls back to {name} on this {torch.cuda.get_device_name(device)} "
               f"because flash-attn 4 did not load ({why_not.get('fa4')}); install it: {FAST_KERNEL_INSTALL}")
    return failed


def get_backend(device=None, dtype=None, head_dim=128, windows=(512, 2048)):
    """Pick the backend once per process and return its name. Call it before torch.compile
    (the import and the print are not traceable); attention() calls it on first use otherwise.
    head_dim, windows: the model's, for the fast kernels' trial run (default: the speedrun's)."""
    global _chosen
    if _chosen is not None:
        return _chosen[0]
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    forced = os.environ.get("NANOCHAT_ATTN")
    if forced:
        if forced not in BACKENDS:
            raise BadInput(f"NANOCHAT_ATTN={forced!r}: expected one of {', '.join(BACKENDS)}")
        if forced == "flex" and device.type != "cuda":  # uncompiled flex fails in its first backward
            raise Unavailable(f"NANOCHAT_ATTN='flex' trains on CUDA only (on {device.type} its backward fails): "
                              f"unset it, or NANOCHAT_ATTN=sdpa")
        try:
            _chosen = forced, BACKENDS[forced][1](device, dtype)
        except Exception as e:  # ImportError, wrong GPU, wrong dtype: never fall back silently
            raise Unavailable(f"NANOCHAT_ATTN={forced!r} cannot run on {device} ({dtype}): {e}: unset it for the "
                              f"fastest backend that loads") from e
    else:
        _chosen, why_not = _auto_choose(device, dtype, head_dim, windows)
        trial_failures.update(_warn_if_slow(device, _chosen[0], why_not))
    print0(f"attention backend: {describe_backend()}")
    return _chosen[0]


def describe_backend():
    """The chosen backend for logs and the report, e.g. "fa4 (flash-attn 4)"; None before one is chosen."""
    return None if _chosen is None else f"{_chosen[0]} ({BACKENDS[_chosen[0]][0]})"
