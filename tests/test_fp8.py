"""fp8 Linear: conversion, the bf16 fallback, the quantizer, and the fp8 matmuls themselves.
torch._scaled_mm also runs on CPU in torch 2.13, so the autograd Function is checked here too;
the CUDA test repeats it on the real kernels when a GPU with fp8 is present."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat import fp8
from nanochat.cli import Unavailable


class Linear(nn.Linear):
    """Stand-in for gpt.Linear: bias-free, fp32 weight cast to the activations' dtype."""

    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype))


def toy_model():
    torch.manual_seed(0)
    return nn.ModuleDict({
        "blocks": nn.ModuleList([nn.ModuleDict({"big": Linear(256, 512), "wide": Linear(512, 256)}) for _ in range(2)]),
        "small": Linear(64, 256),     # in_features < min_features
        "odd": Linear(136, 256),      # 136 is not a multiple of 16
        "gate": Linear(12, 4),
        "plain": nn.Linear(256, 256, bias=False),  # not the requested class
    })


@pytest.fixture
def pretend_fp8_gpu(monkeypatch):
    monkeypatch.setattr(fp8, "fp8_supported", lambda: True)


def test_convert_swaps_only_eligible_layers_and_keeps_parameters(pretend_fp8_gpu):
    model = toy_model()
    params_before = {name: p for name, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert fp8.convert_to_float8(model, Linear, min_features=128) == 4
    for block in model["blocks"]:
        assert type(block["big"]) is fp8.Float8Linear and type(block["wide"]) is fp8.Float8Linear
        assert block["big"].weight.shape == (512, 256)
    for name in ("small", "odd", "gate"):
        assert type(model[name]) is Linear
    assert type(model["plain"]) is nn.Linear
    params_after = dict(model.named_parameters())
    assert params_after.keys() == params_before.keys()
    for name, p in params_after.items():
        assert p is params_before[name]  # the same objects: optimizer groups and init are unaffected
    assert all(p is q for p, q in zip(opt.param_groups[0]["params"], model.parameters()))
    assert fp8.convert_to_float8(model, Linear, min_features=128) == 0  # idempotent


def test_min_features_threshold(pretend_fp8_gpu):
    model = toy_model()
    assert fp8.convert_to_float8(model, Linear, min_features=64) == 5  # now "small" qualifies too
    assert type(model["small"]) is fp8.Float8Linear and type(model["odd"]) is Linear


def test_unsupported_device_names_the_flag(monkeypatch):
    monkeypatch.setattr(fp8, "fp8_supported", lambda: False)
    model = toy_model()
    with pytest.raises(RuntimeError, match="--fp8"):
        fp8.convert_to_float8(model, Linear)
    assert type(model["blocks"][0]["big"]) is Linear  # nothing was touched


@pytest.mark.parametrize("available,capability,expected", [
    (False, None, False), (True, (8, 0), False), (True, (8, 9), True), (True, (9, 0), True)])
def test_fp8_supported_needs_sm89(monkeypatch, available, capability, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    assert fp8.fp8_supported() is expected


def test_disabled_path_equals_plain_linear_exactly(pretend_fp8_gpu):
    model = toy_model()
    ref = Linear(256, 512)
    ref.weight = model["blocks"][0]["big"].weight
    fp8.convert_to_float8(model, Linear)
    layer = model["blocks"][0]["big"]
    x = torch.randn(2, 8, 256)
    with fp8.disable_fp8(model):
        assert not layer.fp8_enabled
        assert torch.equal(layer(x), ref(x))
        assert torch.equal(layer(x.bfloat16()), ref(x.bfloat16()))
    assert layer.fp8_enabled  # restored on exit
    assert not torch.equal(layer(x), ref(x))  # and the fp8 path really is a different computation


def test_row_counts_not_divisible_by_16_take_the_plain_path():
    layer = fp8.Float8Linear(256, 512)
    ref = Linear(256, 512)
    ref.weight = layer.weight
    x = torch.randn(3, 5, 256)  # 15 rows
    assert torch.equal(layer(x), ref(x))


@pytest.mark.parametrize("dtype,rel", [(fp8.E4M3, 2 ** -4), (fp8.E5M2, 2 ** -3)])
def test_quantize_round_trip(dtype, rel):
    torch.manual_seed(0)
    x = torch.randn(64, 128) * 3
    x8, inv = fp8.to_fp8(x, dtype)
    assert x8.dtype == dtype and x8.is_contiguous() and inv.dtype == torch.float32 and inv.dim() == 0
    assert x8.float().abs().max() == torch.finfo(dtype).max  # amax lands on the format's max
    back = x8.float() * inv
    # half an ulp relative in the normal range; half the smallest subnormal step (scaled back) below it
    step = {fp8.E4M3: 2 ** -9, fp8.E5M2: 2 ** -16}[dtype]
    assert ((back - x).abs() <= torch.maximum(rel * x.abs(), torch.full_like(x, step / 2 * inv.item()))).all()
    assert (back - x).abs().max() > 0  # it is lossy: the check above is not vacuous


def test_quantize_zero_tensor_stays_finite():
    x8, inv = fp8.to_fp8(torch.zeros(16, 16), fp8.E4M3)
    assert torch.isfinite(inv) and inv > 0 and (x8.float() == 0).all()


def test_fp8_matmuls_on_cpu():
    try:
        err_y, err_dx, err_dw = fp8.fp8_vs_reference("cpu")
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"torch._scaled_mm does not run on CPU here: {e}")
    assert err_y < fp8.TOL_Y and err_dx < fp8.TOL_GRAD and err_dw < fp8.TOL_GRAD
    assert err_y > fp8.MIN_ERR_Y  # really quantized, not a silent bf16 fallback


def test_zero_weight_layer_trains():
    """The output projections start at zero: outputs must be exactly zero, gradients finite."""
    layer = fp8.Float8Linear(256, 128)
    nn.init.zeros_(layer.weight)
    x = torch.randn(32, 256, dtype=torch.bfloat16, requires_grad=True)
    try:
        y = layer(x)
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"torch._scaled_mm does not run on CPU here: {e}")
    y.backward(torch.ones_like(y))
    assert (y == 0).all() and (x.grad == 0).all()
    assert torch.isfinite(layer.weight.grad).all() and layer.weight.grad.abs().sum() > 0


@pytest.mark.skipif(not fp8.fp8_supported(), reason="needs a CUDA GPU with compute capability >= 8.9")
def test_fp8_matmuls_on_cuda():
    err_y, err_dx, err_dw = fp8.fp8_vs_reference("cuda")
    assert err_y < fp8.TOL_Y and err_dx < fp8.TOL_GRAD and err_dw < fp8.TOL_GRAD


def test_unusable_cuda_is_not_blamed_on_the_gpu(monkeypatch):
    """A driver too old for torch's CUDA makes is_available() False on an H100: the message must
    say that, not that the H100 lacks compute capability 8.9."""
    from nanochat import common
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(common, "cuda_unusable_reason", lambda: "NVIDIA driver 550.54.15 is too old")
    with pytest.raises(RuntimeError) as exc:
        fp8.convert_to_float8(toy_model(), Linear)
    assert "driver 550.54.15 is too old" in str(exc.value) and "compute capability" not in str(exc.value)


def test_old_gpu_names_its_capability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(RuntimeError, match="compute capability >= 8.9.*A100-SXM4-80GB is 8.0"):
        fp8.convert_to_float8(toy_model(), Linear)


def test_rocm_refuses_fp8_in_one_line(pretend_fp8_gpu, monkeypatch):
    monkeypatch.setattr(torch.version, "hip", "6.4.43482")
    model = nn.ModuleDict({"big": Linear(256, 256)})
    with pytest.raises(Unavailable, match=r"--fp8 is not known to work with ROCm builds of torch .*drop --fp8"):
        fp8.convert_to_float8(model, Linear)
    assert type(model["big"]) is Linear  # nothing converted


def test_lm_head_is_fp8_too_and_softcap_and_loss_stay_fp32(pretend_fp8_gpu):
    # the record's fp8 layers: every matmul in the blocks and lm_head (on CPU, _scaled_mm's emulation)
    from nanochat.gpt import GPTConfig, build_model
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=32, vocab_size=512, n_layer=2, n_head=2, n_embd=128)
    model = build_model(config, "cpu")
    nn.init.normal_(model.lm_head.weight, std=128 ** -0.5)  # full-scale logits: the softcap matters
    idx = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        plain = model(idx)
    assert fp8.convert_to_float8(model) == 6 * 2 + 1  # q, k, v, proj, fc, mlp proj per block; lm_head
    assert type(model.lm_head) is fp8.Float8Linear
    with fp8.disable_fp8(model), torch.no_grad():
        assert torch.equal(model(idx), plain)  # fp8 off is exactly the plain model (evaluation)
    logits = model(idx)
    assert logits.dtype == torch.float32 and logits.abs().max() <= 15  # softcapped, in fp32
    assert fp8.MIN_ERR_Y < fp8.logits_vs_bf16(model, idx) < fp8.TOL_Y  # quantized, within tolerance
    loss = model(idx, idx)
    assert loss.dtype == torch.float32
    loss.backward()
    grad = model.lm_head.weight.grad
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all() and grad.abs().sum() > 0
