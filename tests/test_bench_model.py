import json

import pytest

from scripts import bench_model

TINY = ["--depth", "2", "--head-dim", "16", "--max-seq-len", "32", "--vocab-size", "64", "--device-batch-size", "2",
        "--steps", "3", "--warmup", "1", "--device-type", "cpu"]


def test_result_json_and_arithmetic(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_model, "get_peak_flops", lambda device: 1e12)  # pretend a known device
    path = tmp_path / "r.json"
    r = bench_model.main(TINY + ["--json", str(path)])
    assert json.loads(path.read_text()) == json.loads(json.dumps(r))
    assert r["tokens_per_sec"] == pytest.approx(2 * 32 / (r["step_ms_median"] / 1e3))
    assert r["mfu"] == pytest.approx(r["tokens_per_sec"] * r["flops_per_token"] / 1e12)
    assert r["step_ms_min"] <= r["step_ms_median"] <= r["step_ms_max"] and r["spread_pct"] >= 0
    out = capsys.readouterr().out
    assert "MFU" in out and f"{r['mfu']:.1%}" in out


def test_breakdown_adds_up(capsys):
    r = bench_model.main(TINY + ["--breakdown"])
    rows = {row["component"].split(" ")[0]: row for row in r["breakdown"]}
    assert sum(row["flops_per_token"] for row in r["breakdown"]) == r["flops_per_token"]  # estimate_flops, split
    assert rows["MLP"]["flops_per_token"] == 6 * 8 * 128 * 128 * 2
    assert all(row["seconds"] > 0 for name, row in rows.items() if name != "rest:")
    assert "component" in capsys.readouterr().out


def test_cpu_reports_no_mfu():
    assert bench_model.main(TINY + ["--no-optimizer"])["mfu"] is None


def test_grad_hooks_fire_during_eager_backward_but_after_compiled_backward():
    # The overlap question: the optimizer launches each reduce-scatter from a post-accumulate-grad
    # hook. Eager: the blocks' hooks fire while backward still runs. Compiled (one autograd node for
    # the whole model): every hook fires after the compiled backward has finished, so no reduction
    # overlaps backward. (aot_eager: the same autograd structure as inductor, without codegen.)
    import torch
    from nanochat.gpt import GPTConfig, build_model
    torch.manual_seed(0)
    # big enough that backward (~0.1 s) dwarfs the hooks' own Python time on a busy CPU
    model = build_model(GPTConfig(sequence_len=128, vocab_size=64, n_layer=4, n_head=2, n_embd=128), "cpu")
    x = torch.randint(0, 64, (4, 128))
    bench_model.grad_hook_times(model, model, x, x)  # warm up: time the second backward
    eager = bench_model.grad_hook_times(model, model, x, x)
    compiled_model = torch.compile(model, backend="aot_eager")
    bench_model.grad_hook_times(model, compiled_model, x, x)  # compile first: time the second backward
    compiled = bench_model.grad_hook_times(model, compiled_model, x, x)
    torch._dynamo.reset()
    n = len(list(model.parameters()))
    assert len(eager) == len(compiled) == n
    assert eager[0] < 0.5 and eager[n // 4] < 0.8  # spread through backward (measured: medians 0.45-0.84)
    assert compiled[0] > 0.9  # all at the end (measured: 0.99-1.00)


def test_profile_times_the_optimizer_and_lists_kernels(capsys):
    r = bench_model.main(TINY + ["--profile"])
    assert 0 < r["optimizer_ms_median"] < r["step_ms_max"] * 10
    kernels = r["profile"]
    assert kernels and all(k["ms"] >= 0 and k["calls"] >= 1 for k in kernels)
    assert [k["ms"] for k in kernels] == sorted((k["ms"] for k in kernels), reverse=True)
    assert sum(k["share"] for k in kernels) <= 1 + 1e-9
    assert not any(k["kernel"].startswith("Optimizer.step") for k in kernels)  # an annotation, not a kernel
    out = capsys.readouterr().out
    assert "top kernels" in out and "of the step" in out
