import json
import pytest
import torch

from nanochat import estimate
from nanochat.gpt import GPT, GPTConfig
from scripts import plan

D24 = ["--depth", "24", "--gpus", "8", "--gpu", "h100", "--target-param-data-ratio", "8", "--device-batch-size", "auto"]


@pytest.fixture(scope="module")
def d24():
    return plan.main(D24)


def test_d24_speedrun_horizon(d24):
    assert d24["num_iterations"] == 5568
    assert d24["total_batch_size"] == 2 ** 20
    assert round(d24["tokens"] / 1e9, 2) == 5.84
    assert round(d24["flops_per_token"] / 1e9, 2) == 4.78
    assert d24["total_flops"] == d24["tokens"] * d24["flops_per_token"]
    assert d24["grad_accum_steps"] * d24["device_batch_size"] * 2048 * 8 == 2 ** 20


def test_param_groups_match_model(d24):
    with torch.device("meta"):
        counts = GPT(GPTConfig.from_depth(24)).num_params()
    assert d24["num_params"] == counts
    assert d24["horizon_params"] == counts["transformer_matrices"] + counts["lm_head"]


def test_d24_h100_device_batch_fits(d24):
    b = d24["device_batch_size"]
    assert b >= 8 and b & (b - 1) == 0
    by_batch = d24["memory_by_batch"]
    assert d24["memory"]["total"] == by_batch[b] <= 80e9 * 0.9
    assert b == 64 or by_batch[2 * b] > 80e9 * 0.9
    assert all(by_batch[2 * k] > by_batch[k] for k in (1, 2, 4, 8, 16, 32))


def test_smaller_gpu_smaller_batch(d24):
    l4 = plan.main(D24[:4] + ["--gpu", "l4", "--target-param-data-ratio", "8", "--device-batch-size", "auto"])
    assert l4["device_batch_size"] < d24["device_batch_size"]


def test_explicit_device_batch_is_used():
    out = plan.main(D24 + ["--device-batch-size", "4"])
    assert out["device_batch_size"] == 4 and out["grad_accum_steps"] == 2 ** 20 // (4 * 2048 * 8)


def test_time_scales_with_gpus_and_mfu(d24):
    assert d24["mfu"] == 0.45 and d24["mfu_source"] == "assumed, not measured"
    half_gpus = plan.main(["--depth", "24", "--gpus", "4", "--gpu", "h100", "--target-param-data-ratio", "8",
                           "--device-batch-size", str(d24["device_batch_size"])])
    assert half_gpus["total_flops"] == d24["total_flops"]
    assert half_gpus["hours"] == pytest.approx(2 * d24["hours"])
    faster = plan.main(D24 + ["--mfu", "0.9"])
    assert faster["hours"] == pytest.approx(d24["hours"] / 2)
    assert faster["cost"] == pytest.approx(faster["hours"] * 8 * 3.0)


def test_a_measured_mfu_is_used_where_there_is_one(monkeypatch):
    monkeypatch.setattr(estimate, "MEASURED_MFU", {("H100", 24, True): 0.525, ("H100", 24, False): 0.44})
    fp8 = plan.main(D24 + ["--fp8"])
    assert fp8["mfu"] == pytest.approx(0.525) and fp8["mfu_source"] == "measured, docs/PERF.md"
    assert plan.main(D24)["mfu"] == pytest.approx(0.44)
    assert plan.main(D24[:1] + ["12"] + D24[2:])["mfu_source"] == "assumed, not measured"  # not d24's figure


def test_measured_mfus_are_the_ones_in_perf_md():
    import os
    perf = open(os.path.join(os.path.dirname(__file__), "..", "docs", "PERF.md")).read()
    for (gpu, depth, fp8), mfu in estimate.MEASURED_MFU.items():
        assert any(f"| NVIDIA {gpu} | d{depth}" in line and ("fp8" in line) == fp8 and f"MFU {100 * mfu:.1f}%" in line
                   for line in perf.splitlines()), (gpu, depth, fp8)


def test_unknown_gpu_is_a_flag_error(capsys):
    with pytest.raises(SystemExit) as e:
        plan.main(["--depth", "12", "--gpu", "v100"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--gpu" in err and "h100" in err


def test_measured_activations_extrapolate_to_another_model():
    # the estimate (from depth 2 and 4 at width 256 and two vocab sizes) against a direct measurement
    # of a model of another depth, width and vocab: within 2 %
    cfg = GPTConfig(sequence_len=80, vocab_size=768, n_layer=6, n_head=3, n_embd=384)
    per_layer, outside, per_vocab, per_weight = estimate.measure_saved_bytes(cfg.head_dim, cfg.window_pattern)
    direct, copies = estimate.saved_for_backward(cfg)
    predicted = cfg.n_embd * (per_layer * cfg.n_layer + outside) + per_vocab * cfg.vocab_size
    assert predicted == pytest.approx(direct, rel=0.02), (predicted, direct)
    with torch.device("meta"):
        matmul = sum(m.weight.numel() for m in GPT(cfg).modules() if isinstance(m, torch.nn.Linear))
    assert per_weight * matmul == pytest.approx(copies, rel=0.02)
    # what it measured, pinned (bf16, compiled): ~19.6 n_embd elements per layer; the lm_head output
    # in bf16 is all the head saves (the softcap and the fp32 logits are recomputed in backward)
    assert 36 < per_layer < 43 and 1.9 < per_vocab < 2.2 and per_weight == pytest.approx(2.0, rel=0.05)
    # plan uses a recorded copy of this measurement at these defaults: it must still be what torch measures
    recorded = estimate.RECORDED_SAVED_BYTES[(cfg.head_dim, cfg.window_pattern)]
    assert recorded == pytest.approx((per_layer, outside, per_vocab, per_weight), rel=1e-6)


def test_the_eager_fp32_record_predicts_a_cpu_run():
    # base_train's memory check on a CPU: the recorded eager fp32 bytes against a direct measurement
    # of another depth, width and vocab, within 2 %
    cfg = GPTConfig(sequence_len=80, vocab_size=768, n_layer=6, n_head=3, n_embd=384)
    per_layer, outside, per_vocab, _ = estimate.EAGER_FP32_SAVED_BYTES
    direct, _ = estimate.saved_for_backward(cfg, compiled=False)
    assert cfg.n_embd * (per_layer * cfg.n_layer + outside) + per_vocab * cfg.vocab_size == pytest.approx(direct, rel=0.02)


def test_d24_batch_16_memory_is_the_measured_one(d24):
    m = plan.main(D24 + ["--fp8", "--device-batch-size", "16"])["memory"]
    assert 45e9 < m["activations"] < 55e9  # the hand count of saved activations said 58.4 GB (67.9 GB in all)
    assert 60e9 < m["total"] < 70e9


def test_readme_plan_example_is_the_speedruns_and_its_numbers_are_what_plan_prints(monkeypatch):
    import os
    import re
    import shlex
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    readme = open(os.path.join(root, "README.md"), encoding="utf-8").read()
    command = re.search(r"^python -m scripts\.plan (--depth 24 .*)$", readme, re.M).group(1)
    argv = shlex.split(command)
    # the speedrun's own flags on an 8×H100 node (speedrun.sh: TRAIN_ARGS with BATCH=16 and --fp8)
    assert argv == ["--depth", "24", "--target-param-data-ratio", "8", "--device-batch-size", "16", "--fp8",
                    "--gpus", "8", "--gpu", "h100"]
    monkeypatch.setattr(estimate, "MEASURED_MFU", {})  # the README quotes the assumed MFU
    out = plan.main(argv)
    shown = readme[readme.index(command):][:400]
    assert f"steps {out['num_iterations']:,};" in shown
    assert f"training time {out['hours']:.2f} h" in shown and f"cost ${out['cost']:,.2f}" in shown
    assert f"{out['hours']:.2f} h and ${out['cost']:,.2f}" in readme  # the headline paragraph


# -----------------------------------------------------------------------------
# --hours: the deepest model whose training fits a time budget

def test_hours_picks_the_deepest_depth_that_fits_by_hand_numbers(capsys):
    # one H100, the default 12 tokens per parameter, bf16, the assumed 45 % MFU. By hand from plan's
    # FLOPs: d16 is 2,818,572,288 tokens × 1.5855e9 FLOPs = 4.469e18 FLOPs, / (989e12 × 0.45) = 2.79 h;
    # d17 is as wide as d18 (width rounds up to whole 128-wide heads), 7.69e18 FLOPs = 4.80 h
    out = plan.main(["--hours", "4", "--gpus", "1", "--gpu", "h100"])
    assert out["config"].n_layer == 16 and out["sized"]["depth"] == 16
    options = out["sized"]["options"]
    assert options[16]["total_flops"] == pytest.approx(4.469e18, rel=1e-3)
    assert options[16]["hours"] == pytest.approx(4.469e18 / (989e12 * 0.45) / 3600, rel=1e-3)
    assert round(options[16]["hours"], 2) == 2.79 and round(options[17]["hours"], 2) == 4.80
    assert out["hours"] == options[16]["hours"] and out["cost"] == pytest.approx(2.79 * 3.0, abs=0.01)
    printed = capsys.readouterr().out
    assert "d16" in printed and "<- chosen" in printed and "over budget" in printed
    assert "   d15 " in printed and "   d17 " in printed  # one step down and up

    # the record's hardware and recipe (8 H100s, 8 tokens per parameter, fp8): d24 is 2.18 h, so 3 h
    # buys it and 2 h do not (d23 is 2.01 h: d22, 1.34 h)
    record = ["--gpus", "8", "--gpu", "h100", "--target-param-data-ratio", "8", "--fp8", "--json"]
    assert plan.main(["--hours", "3"] + record)["sized"]["depth"] == 24
    two = plan.main(["--hours", "2"] + record)["sized"]
    assert two["depth"] == 22 and round(two["options"][23]["hours"], 2) == 2.01
    # a slower card (an RTX 4090: 165.2 TFLOP/s) buys a smaller model in the same 4 hours
    assert plan.main(["--hours", "4", "--gpus", "1", "--gpu", "4090", "--json"])["sized"]["depth"] == 12
    capsys.readouterr()


def test_hours_json_is_the_chosen_recipe_with_its_estimate(capsys):
    plan.main(["--hours", "4", "--gpus", "1", "--gpu", "h100", "--json"])
    captured = capsys.readouterr()
    out = json.loads(captured.out)  # stdout is JSON only (speedrun reads the depth); the choice is on stderr
    assert out["depth"] == 16 and out["estimate"]["hours"] == pytest.approx(2.79, abs=0.005)
    assert "<- chosen" in captured.err


@pytest.mark.parametrize("argv, message", [
    (["--hours", "0"], "--hours 0.0: must be > 0"),
    (["--hours", "4", "--depth", "12"], "--hours picks the depth: leave --depth out"),
    (["--hours", "4", "--num-iterations", "10"], "leave out --num-iterations and --target-flops"),
    (["--hours", "0.0001", "--gpus", "1", "--gpu", "l4"], "--hours 0.0001: even d1 needs"),
    (["--depth", "12", "--peak-tflops", "-1"], "--peak-tflops -1.0: must be > 0"),
])
def test_hours_bad_input_is_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        plan.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m scripts.plan: error: ") and message in err[0], err


def test_peak_tflops_overrides_the_table(monkeypatch):
    base = plan.main(["--depth", "12", "--gpus", "1", "--gpu", "h100", "--json"])
    doubled = plan.main(["--depth", "12", "--gpus", "1", "--gpu", "h100", "--json", "--peak-tflops", "1978"])
    assert doubled["hours"] == pytest.approx(base["hours"] / 2)
    monkeypatch.setenv("NANOCHAT_PEAK_TFLOPS", "494.5")
    assert plan.main(["--depth", "12", "--gpus", "1", "--gpu", "h100", "--json"])["hours"] == pytest.approx(2 * base["hours"])


def test_readme_hours_example_is_what_plan_prints(capsys):
    import os
    import re
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    readme = open(os.path.join(root, "README.md"), encoding="utf-8").read()
    match = re.search(r"^python -m scripts\.plan (--hours [^#\n]*?) +#.*\n((?:# .*\n)+)", readme, re.M)
    plan.main(match.group(1).split())
    shown = [line[2:] for line in match.group(2).splitlines()]
    assert capsys.readouterr().out.splitlines()[:len(shown)] == shown
