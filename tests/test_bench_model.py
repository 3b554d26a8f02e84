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
    from nanochat.gpt import GPTConfig, build_model, compile_model
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

    # regional compilation (one graph per block): each block is its own autograd node again, so its
    # gradients are final, and their reductions can start, while backward goes on below it
    real_compile = torch.compile
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "compile", lambda m: real_compile(m, backend="aot_eager"))
        regional_model = compile_model(model, regional=True)
    assert model.blocks[0] is regional_model.blocks[0]._orig_mod and regional_model.lm_head is model.lm_head
    bench_model.grad_hook_times(model, regional_model, x, x)
    regional = bench_model.grad_hook_times(model, regional_model, x, x)
    torch._dynamo.reset()
    assert len(regional) == n and regional[0] < 0.5 and regional[n // 4] < 0.8  # spread again, as eager


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


# -----------------------------------------------------------------------------
# --as-rank-of: one rank's share of the optimizer, without the other ranks

def share_model():
    """Big enough that wte and lm_head (8192 × 128: 1M elements) are sharded, not all-reduced."""
    import torch
    from nanochat.gpt import build_model
    from nanochat.recipe import derive
    recipe = derive(depth=2, vocab_size=8192, sequence_len=16, head_dim=128, window_pattern="L", device_batch_size=2,
                    total_batch_size=32, num_iterations=1)
    torch.manual_seed(0)
    return build_model(recipe.config, "cpu"), recipe


def one_step_share(comm=None):
    import torch
    from nanochat.optim import build_optimizer
    model, recipe = share_model()
    optimizer = build_optimizer(model, recipe.param_groups, comm=comm)
    x = torch.randint(0, 8192, (2, 16), generator=torch.Generator().manual_seed(1))
    model(x, x).backward()
    optimizer.step()
    return bench_model.rank_share(optimizer)


def _share_worker(rank, world, rdzv, out_dir):
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=world)
    torch.save(one_step_share(), f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_as_rank_of_updates_the_share_a_real_rank_updates(tmp_path):
    import sys
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from optim_toy import spawn_gloo
    real = spawn_gloo(_share_worker, 3, tmp_path)  # 3 gloo processes: uneven splits, padded rounds
    one = one_step_share()
    for rank in range(3):
        simulated = one_step_share(bench_model.CopyComm(rank, 3))
        assert simulated == real[rank], rank  # the same parameters, the same element counts
        assert sum(simulated.values()) < sum(one.values())
    # lm_head, wte and a value embedding (8192 rows each) are sharded by rows: 2731, 2731 and 2730 rows of
    # their two AdamW moments
    big = [k for k in one if one[k] == 2 * 8192 * 128]
    assert len(big) == 3 and all([real[r][k] for r in range(3)] == [2 * 2731 * 128, 2 * 2731 * 128, 2 * 2730 * 128]
                                 for k in big)


def test_as_rank_of_prints_both_rows(capsys):
    r = bench_model.main(TINY + ["--as-rank-of", "8"])
    a = r["as_rank_of"]
    assert a["world"] == 8 and a["tokens_per_sec"] == pytest.approx(2 * 32 / (a["step_ms_median"] / 1e3))
    out = capsys.readouterr().out
    assert "tokens/s" in out and "as 1 of 8" in out and "a lower bound" in out
