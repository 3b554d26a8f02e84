"""
fp8 matmuls for the big Linear layers (opt-in with --fp8; CUDA compute capability >= 8.9): every
matmul in the blocks and lm_head, the layers the record runs in fp8. The logits leave lm_head in
bf16; the model softcaps them and takes the loss in fp32, as it does without fp8.

Tensorwise scaling: each operand gets one fp32 scale that maps its largest magnitude onto
the largest finite value of its fp8 format; torch._scaled_mm multiplies the fp8 operands on
the tensor cores (twice the bf16 rate on H100) and multiplies the inverse scales back in.
  forward   y  = x @ W^T    x and W in e4m3: more mantissa, for activations and weights
  backward  dx = g @ W      g in e5m2: more exponent range, gradients span many decades
            dW = g^T @ x
The fp32 master weight and everything around the layer stay as they are; only the three
matmuls change. Evaluation runs in bf16 (disable_fp8), so reported numbers carry no fp8 noise.
"""
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.cli import Unavailable

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def fp8_supported():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def to_fp8(x, dtype):
    """Returns (x8, inv_scale) with x ≈ x8.float() * inv_scale; x8 is row-major.
    amax is clamped so an all-zero tensor (the zero-initialized projections) cannot divide by
    zero, and the product is clamped because fp8 casts do not saturate (e5m2 overflows to inf)."""
    fmax = torch.finfo(dtype).max
    amax = x.abs().max().float().clamp(min=1e-12)
    scale = fmax / amax
    x8 = (x.float() * scale).clamp(-fmax, fmax).to(dtype).contiguous()
    return x8, scale.reciprocal()


class _Fp8Matmul(torch.autograd.Function):
    """y = x @ w^T for 2-D x (M, K) and w (N, K), with all three matmuls in fp8.
    _scaled_mm wants its first operand row-major and its second column-major; the transpose
    (.t()) of a contiguous tensor is column-major, so that is how the second one is made."""

    @staticmethod
    def forward(ctx, x, w):
        x8, x_inv = to_fp8(x, E4M3)
        w8, w_inv = to_fp8(w, E4M3)
        ctx.save_for_backward(x8, x_inv, w8, w_inv)  # fp8 copies: half the memory of bf16 x
        ctx.w_dtype = w.dtype
        return torch._scaled_mm(x8, w8.t(), x_inv, w_inv, out_dtype=x.dtype, use_fast_accum=True)

    @staticmethod
    def backward(ctx, g):
        x8, x_inv, w8, w_inv = ctx.saved_tensors
        g8, g_inv = to_fp8(g, E5M2)
        # dx (M, K) = g (M, N) @ w (N, K): w column-major is the transpose of contiguous w^T
        dx = torch._scaled_mm(g8, w8.t().contiguous().t(), g_inv, w_inv, out_dtype=g.dtype)
        # dW (N, K) = g^T (N, M) @ x (M, K), accumulated straight into the master weight's dtype
        dw = torch._scaled_mm(g8.t().contiguous(), x8.t().contiguous().t(), g_inv, x_inv, out_dtype=ctx.w_dtype)
        return dx, dw


class Float8Linear(nn.Linear):
    """Bias-free Linear with an fp32 weight, like gpt.Linear, whose matmuls run in fp8."""

    def __init__(self, in_features, out_features, device=None):
        super().__init__(in_features, out_features, bias=False, device=device)
        self.fp8_enabled = True  # disable_fp8() turns this off for evaluation

    def forward(self, x):
        rows = x.numel() // x.size(-1)
        # _scaled_mm needs every dim divisible by 16; odd row counts (small eval or decode
        # batches) take the bf16 path, exactly like gpt.Linear
        if not self.fp8_enabled or rows % 16:
            return F.linear(x, self.weight.to(x.dtype))
        y = _Fp8Matmul.apply(x.reshape(rows, x.size(-1)), self.weight)
        return y.view(*x.shape[:-1], self.out_features)


def _eligible(m, linear_cls, min_features):
    return (isinstance(m, linear_cls) and not isinstance(m, Float8Linear) and m.bias is None
            and all(d >= min_features and d % 16 == 0 for d in (m.in_features, m.out_features)))


def convert_to_float8(model, linear_cls=nn.Linear, min_features=128):
    """Swap, in place, every `linear_cls` module whose in and out features are both
    >= min_features and divisible by 16 for a Float8Linear holding the SAME Parameter object,
    so optimizer groups, init and checkpoints cannot tell the difference. Small layers stay in
    bf16: the scaling overhead outweighs the faster matmul. Returns the number swapped."""
    if torch.version.hip:
        raise Unavailable(f"--fp8 is not known to work with ROCm builds of torch (torch {torch.__version__}, "
                          f"HIP {torch.version.hip}): drop --fp8 to train in bf16")
    if not fp8_supported():
        if not torch.cuda.is_available():  # not the GPU's fault: torch cannot use CUDA
            from nanochat.common import cuda_unusable_reason
            raise Unavailable(f"--fp8 needs CUDA, and {cuda_unusable_reason()}")
        major, minor = torch.cuda.get_device_capability()
        raise Unavailable(f"--fp8 needs a CUDA GPU of compute capability >= 8.9 (H100, L40, RTX 4090), this "
                          f"{torch.cuda.get_device_name()} is {major}.{minor}; drop --fp8 to train in bf16")
    return swap_to_float8(model, linear_cls, min_features)


def swap_to_float8(model, linear_cls=nn.Linear, min_features=128):
    """convert_to_float8 without asking whether fp8 runs fast here (CPU checks of the layouts)."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not _eligible(child, linear_cls, min_features):
                continue
            fp8_layer = Float8Linear(child.in_features, child.out_features, device="meta")  # no allocation
            fp8_layer.weight = child.weight
            fp8_layer.train(child.training)
            setattr(parent, name, fp8_layer)
            count += 1
    return count


@contextmanager
def disable_fp8(model):
    """Run the model's Float8Linear layers through the plain bf16 path inside the block."""
    layers = [m for m in model.modules() if isinstance(m, Float8Linear)]
    before = [m.fp8_enabled for m in layers]
    for m in layers:
        m.fp8_enabled = False
    try:
        yield model
    finally:
        for m, enabled in zip(layers, before):
            m.fp8_enabled = enabled


# -----------------------------------------------------------------------------
# Accuracy against an fp32 reference, shared by tests/test_fp8.py and scripts/gpu_check.py.
# e4m3 keeps 3 mantissa bits (~3.6 % rms error per element), e5m2 keeps 2 (~7 %); summed over
# hundreds of products the errors partly average out. Stated tolerances, relative Frobenius norm:
TOL_Y, TOL_GRAD = 0.06, 0.10
MIN_ERR_Y = 1e-3  # below this the output was not really quantized: a silent bf16 fallback


def _rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def fp8_vs_reference(device, shape=(4, 16, 256), out_features=128):
    """Float8Linear (fp8 path) on bf16 inputs of `shape` vs an fp32 reference of the same layer,
    forward and backward. Returns the relative errors of (y, dx, dW). Raises where
    torch._scaled_mm cannot run (RuntimeError or NotImplementedError)."""
    torch.manual_seed(0)
    in_features = shape[-1]
    layer = Float8Linear(in_features, out_features, device=device)
    nn.init.normal_(layer.weight, std=in_features ** -0.5)
    x = torch.randn(*shape, device=device, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(*shape[:-1], out_features, device=device, dtype=torch.bfloat16)
    y = layer(x)
    y.backward(g)
    xr, wr = x.detach().float().requires_grad_(), layer.weight.detach().clone().requires_grad_()
    yr = xr @ wr.t()
    yr.backward(g.float())
    assert y.shape == (*shape[:-1], out_features) and y.dtype == torch.bfloat16
    assert x.grad.dtype == torch.bfloat16 and layer.weight.grad.dtype == torch.float32
    return _rel_err(y, yr), _rel_err(x.grad, xr.grad), _rel_err(layer.weight.grad, wr.grad)


def logits_vs_bf16(model, idx):
    """Relative error of a converted model's logits against its own with fp8 off (the bf16 path):
    what --fp8 changes in what the loss sees, lm_head's quantization included."""
    with torch.no_grad():
        logits = model(idx)
        with disable_fp8(model):
            reference = model(idx)
    return _rel_err(logits, reference)
