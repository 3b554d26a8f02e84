"""Attention backends on CPU: every kernel that runs here against a float64 reference,
plus causality, windows, decode alignment, backend selection and torch.compile tracing."""
import pytest
import torch

from nanochat import attention as attn
from nanochat.cli import UserError

CPU = torch.device("cpu")
# Uncompiled flex warns that it materializes the scores; that is the point of running it here.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def load(name, device=CPU, dtype=torch.float32):
    """The kernel of one backend (flex's own, not its router), bypassing the once-per-process choice."""
    try:
        return attn.load_kernel(name, device, dtype)
    except Exception as e:
        pytest.skip(f"{name} cannot load on {device}: {e}")


BACKENDS_HERE = ["sdpa", "flex"]


def reference(q, k, v, window):
    """Explicit scores + mask + softmax in float64, one query position at a time."""
    B, Tq, H, D = q.shape
    Tk = k.shape[1]
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros(B, Tq, H, D, dtype=torch.float64)
    for i in range(Tq):
        t = Tk - Tq + i  # absolute position of query i
        visible = [j for j in range(Tk) if 0 <= t - j <= window]
        scores = torch.einsum("bhd,bjhd->bhj", q[:, i], k[:, visible]) / D ** 0.5
        out[:, i] = torch.einsum("bhj,bjhd->bhd", scores.softmax(-1), v[:, visible])
    return out


def qkv(B=2, Tq=16, Tk=16, H=3, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Tq, H, D, generator=g), torch.randn(B, Tk, H, D, generator=g),
            torch.randn(B, Tk, H, D, generator=g))


CASES = [  # (Tq, Tk, window)
    (16, 16, 100),  # plain causal
    (16, 16, 16),   # window == Tk: still plain causal
    (16, 16, 15),   # window just covers position 0 from the last query
    (16, 16, 4),    # short window
    (16, 16, 0),    # each query sees only itself
    (5, 16, 4),     # a chunk of queries against a longer cache
    (1, 16, 3),     # one decode step
    (1, 16, 100),
    (3, 130, 40),   # more than one 128-key block for flex
]


@pytest.mark.parametrize("name", BACKENDS_HERE)
@pytest.mark.parametrize("Tq,Tk,window", CASES)
def test_matches_reference(name, Tq, Tk, window):
    kernel = load(name)
    q, k, v = qkv(Tq=Tq, Tk=Tk)
    out = kernel(q, k, v, window)
    assert out.shape == q.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference(q, k, v, window), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("name", BACKENDS_HERE)
def test_gradients_match_reference(name):
    if name == "flex":
        pytest.skip("FlexAttention has no backward on CPU in torch 2.13")
    kernel = load(name)
    q, k, v = (x.requires_grad_() for x in qkv(Tq=6, Tk=12))
    qr, kr, vr = (x.detach().double().requires_grad_() for x in (q, k, v))
    w = torch.randn(2, 6, 3, 8)
    (kernel(q, k, v, 3) * w).sum().backward()
    (reference(qr, kr, vr, 3) * w.double()).sum().backward()
    for got, want in [(q.grad, qr.grad), (k.grad, kr.grad), (v.grad, vr.grad)]:
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", BACKENDS_HERE)
def test_backends_agree(name):
    q, k, v = qkv(Tq=7, Tk=20)
    for window in (2, 9, 50):
        torch.testing.assert_close(load(name)(q, k, v, window), load("sdpa")(q, k, v, window),
                                   atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("name", BACKENDS_HERE)
@pytest.mark.parametrize("window", [100, 5])
def test_future_never_leaks(name, window):
    kernel = load(name)
    q, k, v = qkv()
    p = 9  # perturb the key and value at position p
    k2, v2 = k.clone(), v.clone()
    k2[:, p] += 3.0
    v2[:, p] += 3.0
    a, b = kernel(q, k, v, window), kernel(q, k2, v2, window)
    torch.testing.assert_close(a[:, :p], b[:, :p], atol=0, rtol=0)  # masked exactly, not approximately
    assert (a[:, p] - b[:, p]).abs().max() > 1e-3  # and the position itself does see it


@pytest.mark.parametrize("name", BACKENDS_HERE)
def test_window_boundary(name):
    kernel = load(name)
    q, k, v = qkv()
    t, window = 12, 4

    def output_at_t_after_changing(j):
        k2, v2 = k.clone(), v.clone()
        k2[:, j] += 3.0
        v2[:, j] += 3.0
        return kernel(q, k2, v2, window)[:, t]

    base = kernel(q, k, v, window)[:, t]
    torch.testing.assert_close(output_at_t_after_changing(t - window - 1), base, atol=0, rtol=0)
    assert (output_at_t_after_changing(t - window) - base).abs().max() > 1e-3  # oldest visible key
    assert (output_at_t_after_changing(t) - base).abs().max() > 1e-3  # itself


@pytest.mark.parametrize("name", BACKENDS_HERE)
@pytest.mark.parametrize("window", [100, 6])
def test_decode_equals_last_rows_of_full(name, window):
    kernel = load(name)
    q, k, v = qkv(Tq=20, Tk=20)
    full = kernel(q, k, v, window)
    for n in (1, 3):
        torch.testing.assert_close(kernel(q[:, -n:], k, v, window), full[:, -n:], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("name", BACKENDS_HERE)
def test_traces_without_graph_breaks(name, monkeypatch):
    """fullgraph=True raises on any graph break; masks are cached outside the hot path, so the
    second window shape costs one recompile at most, not one per call."""
    import torch._dynamo
    import torch._dynamo.testing
    monkeypatch.setattr(attn, "_chosen", (name, load(name)))
    monkeypatch.setattr(attn, "_flex_masks", {})
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    f = torch.compile(lambda q, k, v: attn.attention(q, k, v, 4) + attn.attention(q, k, v, 100),
                      backend=counter, fullgraph=True)
    q, k, v = qkv()
    for _ in range(4):
        out = f(q, k, v)
    torch.testing.assert_close(out.double(), reference(q, k, v, 4) + reference(q, k, v, 100), atol=4e-6, rtol=1e-5)
    assert counter.frame_count <= 2
    torch._dynamo.reset()


def test_window_mask_rule():
    a = attn.window_mask(4, 16, 16, CPU)
    assert a.sum() == sum(min(t, 4) + 1 for t in range(16))  # each query sees itself and 4 back
    assert attn.window_mask(4, 3, 16, CPU).tolist() == a[-3:].tolist()  # queries aligned to the end


# -----------------------------------------------------------------------------
# choosing the backend


@pytest.fixture
def fresh_choice(monkeypatch):
    monkeypatch.setattr(attn, "_chosen", None)
    return monkeypatch


def test_cpu_default_is_sdpa(fresh_choice, capsys):
    fresh_choice.delenv("NANOCHAT_ATTN", raising=False)
    q, k, v = qkv()
    out = attn.attention(q, k, v, 4)
    assert attn.get_backend() == "sdpa"
    assert "attention backend: sdpa" in capsys.readouterr().out
    torch.testing.assert_close(out.double(), reference(q, k, v, 4), atol=2e-6, rtol=1e-5)
    attn.get_backend()
    assert capsys.readouterr().out == ""  # printed once, chosen once


def test_forced_backend_is_used(fresh_choice, capsys):
    fresh_choice.setenv("NANOCHAT_ATTN", "sdpa")
    assert attn.get_backend(CPU, torch.float32) == "sdpa"
    assert "attention backend: sdpa (PyTorch SDPA)" in capsys.readouterr().out
    assert attn._chosen[1] is attn.sdpa_attention


def test_forced_flex_on_cpu_is_refused_at_start(fresh_choice):
    # uncompiled flex would only fail at the first backward, after the model and data are built
    fresh_choice.setenv("NANOCHAT_ATTN", "flex")
    with pytest.raises(UserError, match="NANOCHAT_ATTN='flex' trains on CUDA only .*NANOCHAT_ATTN=sdpa"):
        attn.get_backend(CPU, torch.float32)
    assert attn._chosen is None


def test_unknown_backend_names_the_variable(fresh_choice):
    fresh_choice.setenv("NANOCHAT_ATTN", "fa9")
    with pytest.raises(ValueError, match="NANOCHAT_ATTN='fa9'"):
        attn.get_backend(CPU, torch.float32)


@pytest.mark.parametrize("name", ["fa3", "fa4"])
def test_unavailable_backend_raises_instead_of_falling_back(fresh_choice, name):
    fresh_choice.setenv("NANOCHAT_ATTN", name)
    q, k, v = qkv()
    with pytest.raises(RuntimeError, match=f"NANOCHAT_ATTN='{name}'"):
        attn.attention(q, k, v, 4)
    assert attn._chosen is None


# -----------------------------------------------------------------------------
# on a GPU (skipped on CPU machines): every backend that loads there, in bf16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(attn.BACKENDS))
@pytest.mark.parametrize("Tq,Tk,window", [(256, 256, 4096), (256, 256, 64), (64, 256, 64), (1, 300, 128)])
def test_cuda_backend_matches_reference(name, Tq, Tk, window):
    device = torch.device("cuda")
    kernel = load(name, device, torch.bfloat16)
    q, k, v = (x.to(device, torch.bfloat16).requires_grad_() for x in qkv(Tq=Tq, Tk=Tk, H=4, D=128))
    out = kernel(q, k, v, window)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    torch.testing.assert_close(out.double().cpu(), reference(q.cpu(), k.cpu(), v.cpu(), window), atol=2e-2, rtol=2e-2)
    out.float().square().sum().backward()  # gradients agree with SDPA's
    grads = [x.grad for x in (q, k, v)]
    q2, k2, v2 = (x.detach().clone().requires_grad_() for x in (q, k, v))
    attn.sdpa_attention(q2, k2, v2, window).float().square().sum().backward()
    for got, want in zip(grads, (q2.grad, k2.grad, v2.grad)):
        torch.testing.assert_close(got.float(), want.float(), atol=5e-2, rtol=5e-2)


# -----------------------------------------------------------------------------
# torch.compile and the mask cache: evaluation and sampling at other shapes must not recompile
# the training graph (dynamo gives up after 8 recompiles and the run goes eager for good)


def test_eval_and_sampling_rounds_never_recompile_the_training_graph(monkeypatch):
    # a plain torch.compile(model), with no call to remember beforehand
    import torch._dynamo
    import torch._dynamo.testing
    from nanochat.engine import Engine
    from nanochat.gpt import GPTConfig, build_model
    monkeypatch.setattr(attn, "_chosen", ("sdpa", attn.sdpa_attention))
    torch._dynamo.reset()
    # T = 256 gives the short layers a 128-token window, so training needs a real mask
    config = GPTConfig(sequence_len=256, vocab_size=64, n_layer=2, n_head=2, n_embd=64)
    assert config.window_sizes() == [128, 256]
    torch.manual_seed(0)
    model = build_model(config, CPU)
    counter = torch._dynamo.testing.CompileCounter()
    step_model = torch.compile(model, backend=counter)
    x = torch.randint(0, 64, (1, 256))

    def train_and_val():
        step_model(x, x).backward()  # a training step's forward and backward
        with torch.no_grad():
            step_model(x, x)          # the compiled validation loss, as base_train runs it

    for _ in range(2):
        train_and_val()
    compiled = counter.frame_count
    assert compiled == 2  # one graph with gradients, one without: nothing they read changed after tracing
    for round in range(10):  # more rounds than dynamo's recompile limit (8)
        with torch.no_grad():
            model(x[:, :100 + round])  # uncompiled evaluation at a new length (CORE-like)
        Engine(model).generate_batch([1, 2, 3], max_tokens=4 + round, temperature=0)  # KV-cache decode
        train_and_val()
    assert counter.frame_count == compiled
    torch._dynamo.reset()


def test_prepared_flex_masks_save_the_first_recompile(monkeypatch):
    import torch._dynamo
    import torch._dynamo.testing
    kernel = load("flex")
    for prepared in (False, True):
        monkeypatch.setattr(attn, "_flex_masks", {})
        monkeypatch.setattr(attn, "_chosen", ("flex", lambda *a: kernel(*a)))
        torch._dynamo.reset()
        if prepared:
            assert attn.prepare_flex([4, 16, 4], 16, "cpu") == 2  # one per distinct window
        counter = torch._dynamo.testing.CompileCounter()
        f = torch.compile(lambda q, k, v: attn.attention(q, k, v, 4), backend=counter)
        q, k, v = qkv()
        for _ in range(3):
            out = f(q, k, v)
        torch.testing.assert_close(out.double(), reference(q, k, v, 4), atol=4e-6, rtol=1e-5)
        assert counter.frame_count == (1 if prepared else 2), prepared
    torch._dynamo.reset()


# -----------------------------------------------------------------------------
# flash-attn: how each version is called, and a loud warning when the fast kernel is missing


@pytest.mark.parametrize("no_window", [-1, None])  # flash-attn 3, flash-attn 4
def test_flash_passes_each_versions_no_window_sentinel(monkeypatch, no_window):
    calls = []
    monkeypatch.setattr(attn, "_flash_fn", lambda q, k, v, causal, window_size: calls.append(window_size) or (q, None))
    monkeypatch.setattr(attn, "_no_window", no_window)
    q, k, v = qkv(Tq=4, Tk=16)
    assert attn._flash(q, k, v, 100) is q and attn._flash(q, k, v, 16) is q  # (out, lse) -> out
    attn._flash(q, k, v, 5)
    assert calls == [(no_window, 0), (no_window, 0), (5, 0)]


def test_missing_fast_kernel_on_hopper_is_loud(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    cuda = torch.device("cuda", 0)
    attn._warn_if_slow(cuda, "flex", {"fa4": "ModuleNotFoundError: No module named 'flash_attn'"})
    out = capsys.readouterr().out
    assert out.startswith("WARNING: attention falls back to flex on this NVIDIA H100")
    assert "No module named 'flash_attn'" in out and "pip install -e '.[gpu]'" in out
    attn._warn_if_slow(cuda, "fa4", {})  # the fast kernel loaded: nothing to say
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    attn._warn_if_slow(cuda, "flex", {})  # an A100: flash-attn 3/4 do not target it
    attn._warn_if_slow(CPU, "sdpa", {})
    assert capsys.readouterr().out == ""


def test_rocm_uses_sdpa_and_does_not_ask_for_flash_attn(fresh_choice, capsys):
    # a ROCm build of torch reports its GPUs as "cuda" devices; flash-attn and flex target NVIDIA's
    fresh_choice.setattr(torch.version, "hip", "6.4.43482")
    fresh_choice.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 4))  # an MI300X
    loaded = []
    for name, (label, loader) in list(attn.BACKENDS.items()):
        fresh_choice.setitem(attn.BACKENDS, name, (label, lambda d, t, n=name, f=loader: loaded.append(n) or f(d, t)))
    (name, kernel), why_not = attn._auto_choose(torch.device("cuda", 0), torch.bfloat16, 128, [512, 2048])
    assert name == "sdpa" and kernel is attn.sdpa_attention and loaded == ["sdpa"] and why_not == {}
    assert not attn.is_slow_fallback(torch.device("cuda", 0), "sdpa")  # no "install flash-attn" warning


def test_describe_backend(fresh_choice):
    assert attn.describe_backend() is None
    fresh_choice.delenv("NANOCHAT_ATTN", raising=False)
    attn.get_backend(CPU, torch.float32)
    assert attn.describe_backend() == "sdpa (PyTorch SDPA)"


def test_flex_runs_training_shapes_and_sends_other_uncompiled_shapes_to_sdpa(monkeypatch):
    # Compiled flex specializes on every shape: CORE's variable lengths and each decode step would
    # recompile it until dynamo's limit, after which it runs unfused. Only training shapes use it.
    flex_calls = []
    kernel = load("flex")
    monkeypatch.setattr(attn, "_flex_kernel", lambda *a: flex_calls.append(a[0].shape) or kernel(*a))
    monkeypatch.setattr(attn, "_flex_masks", {})
    monkeypatch.setattr(attn, "_chosen", ("flex", attn._flex))
    assert attn.prepare_flex([4, 16], 16, "cpu") == 2
    for Tq, Tk, window in [(16, 16, 4), (16, 16, 16), (12, 12, 4), (1, 16, 4), (5, 16, 16)]:
        q, k, v = qkv(Tq=Tq, Tk=Tk)
        torch.testing.assert_close(attn.attention(q, k, v, window).double(), reference(q, k, v, window),
                                   atol=4e-6, rtol=1e-5)
    assert flex_calls == [(2, 16, 3, 8), (2, 16, 3, 8)]  # the two training shapes only


def test_a_fast_kernel_that_loads_but_fails_its_trial_is_skipped_loudly(fresh_choice, capsys):
    # flash-attn that imports but raises on its first real call (a window or head dim its release
    # lacks): selection tries it once on the model's shapes and moves on, instead of training dying
    calls = []

    def broken(q, k, v, window):
        calls.append((q.shape, window))
        raise RuntimeError("window_size (8, 0) is not supported\nmore detail")

    def no_fa3(device, dtype):
        raise ImportError("No module named 'flash_attn_interface'")

    fresh_choice.setitem(attn.BACKENDS, "fa3", ("flash-attn 3", no_fa3))
    fresh_choice.setitem(attn.BACKENDS, "fa4", ("flash-attn 4", lambda device, dtype: broken))
    fresh_choice.setitem(attn.BACKENDS, "flex", ("FlexAttention", lambda device, dtype: attn.sdpa_attention))
    (name, kernel), why_not = attn._auto_choose(CPU, torch.float32, 16, [8, 8, 32], names=list(attn.BACKENDS))
    assert name == "flex" and kernel is attn.sdpa_attention
    assert calls == [((1, 32, 1, 16), 8)]  # the model's head dim, its short window over its longest
    assert why_not["fa3"] == "ImportError: No module named 'flash_attn_interface'"
    assert why_not["fa4"] == "imports, but failed a trial run (RuntimeError: window_size (8, 0) is not supported)"
    failed = attn._warn_if_slow(CPU, name, why_not)
    assert failed == {"fa4": why_not["fa4"]}
    assert capsys.readouterr().out == ("WARNING: attention falls back to flex: fa4 imports, but failed a trial run "
                                       "(RuntimeError: window_size (8, 0) is not supported)\n")
