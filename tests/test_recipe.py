"""
The derived recipe (nanochat/recipe.py): the d24 speedrun numbers, the auto-batch rule, the
optimizer group table and the schedule, pinned.
"""
import json

import pytest

from nanochat.recipe import derive

SPEEDRUN = dict(depth=24, processes=8, device_batch_size=16, sequence_len=2048, vocab_size=32768, ratio=8)


@pytest.fixture(scope="module")
def d24():
    return derive(**SPEEDRUN)


def test_d24_speedrun_plan(d24):
    assert d24.total_batch_size == 1_048_576
    assert d24.grad_accum_steps == 4
    assert d24.num_iterations == 5568  # floor(int(8 × 729,810,624) / 2^20) = floor(5568.01)
    assert d24.tokens == 5_838_471_168
    assert d24.flops_per_token == 4_775_225_616
    assert d24.horizon_params == 729_810_624
    assert d24.muon_weight_decay == pytest.approx(0.05974, abs=1e-4)


def test_d24_schedule(d24):
    steps, w = 5568, 3619  # w = round(0.65 × 5568)
    sched = d24.schedule
    assert sched(0).muon_weight_decay == pytest.approx(0.05974, abs=1e-4)
    assert sched(steps - 1).muon_weight_decay == pytest.approx(0, abs=1e-8)
    assert sched(steps // 2).muon_weight_decay == pytest.approx(d24.muon_weight_decay / 2)  # cosine
    assert sched(2000).lr_multiplier == pytest.approx(0.98661, abs=1e-5)
    for t in (steps - w + 1, 3500, 5000, steps - 1):
        assert sched(t).lr_multiplier == pytest.approx(0.05 + 0.95 * (steps - t) / w, rel=1e-12)
    assert sched(steps - w).lr_multiplier == 1.0  # the warmdown starts after step steps - w
    assert [sched(t).lr_multiplier for t in (0, 19, 39, 40)] == [1 / 40, 0.5, 1.0, 1.0]  # warmup (t+1)/40
    assert sched(0).momentum == pytest.approx(0.85)
    assert sched(200).momentum == pytest.approx(0.91)
    assert sched(400).momentum == pytest.approx(0.97)
    assert sched(steps - w).momentum == pytest.approx(0.97)
    assert sched(steps - 1).momentum == pytest.approx(0.90002, abs=1e-4)


def test_adamw_group_table(d24):
    s, b = (1536 / 768) ** -0.5, 2 ** 0.5  # width and batch (2^20 / 2^19) scalings
    table = {g.name: (g.kind, g.lr, g.betas, g.eps, g.weight_decay) for g in d24.param_groups}
    expected = {
        "lm_head": ("adamw", 0.008 * s * b, (0.8, 0.96), 1e-10, 0.01),
        "wte": ("adamw", 0.3 * s * b, (0.8, 0.995), 1e-10, 0.001),
        "value_embeds": ("adamw", 0.15 * s * b, (0.8, 0.995), 1e-10, 0.01),
        "resid_lambdas": ("adamw", 0.005 * b, (0.8, 0.95), 1e-10, 0.05),
        "x0_lambdas": ("adamw", 0.5 * b, (0.96, 0.95), 1e-10, 0.0),
        "smear_backout": ("adamw", 0.2, (0.8, 0.95), 1e-10, 0.0),  # not batch-scaled
        "matrices": ("muon", 0.02 * b, None, None, d24.muon_weight_decay),
    }
    assert table.keys() == expected.keys()
    for name, row in expected.items():
        assert table[name][0] == row[0] and table[name][2:] == row[2:], name
        assert table[name][1] == pytest.approx(row[1], rel=1e-12), name
    muon = next(g for g in d24.param_groups if g.kind == "muon")
    assert (muon.beta2, muon.ns_steps) == (0.9, 5)


@pytest.mark.parametrize("depth, batch", [(12, 2 ** 19), (20, 2 ** 20), (24, 2 ** 20), (26, 2 ** 20)])
@pytest.mark.parametrize("ratio", [8, 12, 20])
def test_auto_batch_follows_model_size_only(depth, batch, ratio):
    # D_ref is the d12 horizon at this run's own ratio, so B depends on P / P_d12 only
    assert derive(depth=depth, ratio=ratio).total_batch_size == batch


def test_muon_weight_decay_is_the_same_at_any_ratio():
    # λ = 0.28 √(B/2^19) P_d12/P: the reference horizon moves with the ratio (not fixed at ratio 12)
    wds = [derive(depth=24, ratio=r).muon_weight_decay for r in (8, 12, 20)]
    assert wds == pytest.approx([wds[0]] * 3)
    assert derive(depth=12).muon_weight_decay == pytest.approx(0.28)


def test_horizon_settings():
    given = derive(depth=4, vocab_size=64, sequence_len=32, device_batch_size=2, total_batch_size=256,
                   weight_decay=0.5, matrix_lr=0.01, num_iterations=3)
    assert (given.total_batch_size, given.grad_accum_steps, given.muon_weight_decay, given.num_iterations) == \
        (256, 4, 0.5, 3)
    assert given.param_groups[-1].lr == pytest.approx(0.01 * (256 / 2 ** 19) ** 0.5)
    with pytest.raises(ValueError, match="--total-batch-size 200 is not a multiple"):
        derive(depth=4, vocab_size=64, sequence_len=32, device_batch_size=2, total_batch_size=200)


def test_flops_budget_rounds_to_the_nearest_step_and_ratio_floors():
    # the record's rules: D / (FLOPs per token × B) to the nearest step for a FLOPs budget (4992.95 -> 4993),
    # floor(int(ratio × P) / B) for a ratio (5568.01 -> 5568)
    assert derive(depth=24, processes=8, target_flops=2.5e19).num_iterations == 4993
    assert derive(depth=12, target_flops=1e18).num_iterations == 2511  # 2510.6: floor would give 2510
    assert derive(depth=24, processes=8, ratio=8).num_iterations == 5568
    assert derive(depth=12, ratio=12.9).num_iterations == 2709  # int(12.9 × 110,100,912) / 2^19 = 2709.9


def test_a_total_batch_below_one_micro_step_is_refused():
    # raising it silently to one micro-step would raise every LR and the weight decay with it
    with pytest.raises(ValueError) as e:
        derive(depth=4, sequence_len=256, device_batch_size=16, processes=2, total_batch_size=4096)
    msg = str(e.value)
    assert "4,096 tokens is smaller than one micro-step" in msg and "16 × 256 × 2 = 8,192" in msg
    assert "--device-batch-size" in msg and "--total-batch-size" in msg and "\n" not in msg


def test_muon_momentum_when_the_warmdown_starts_before_the_ramp_ends():
    # a 300-step run: warmdown from step 105, but every step before 400 is on the warmup ramp
    short = derive(depth=12, num_iterations=300, total_batch_size=2 ** 19)
    assert [short.schedule(t).momentum for t in (0, 199, 299)] == pytest.approx([0.85, 0.909700, 0.939700], abs=1e-12)
    # a 1,000-step run: still on the ramp at 399, then the warmdown rule, and a jump between them
    run = derive(depth=12, num_iterations=1000, total_batch_size=2 ** 19)
    w = round(0.65 * 1000)
    assert run.schedule(399).momentum == pytest.approx(0.85 + 0.12 * 399 / 400, abs=1e-12)
    assert run.schedule(400).momentum == pytest.approx(0.97 - 0.07 * (400 - (1000 - w)) / w, abs=1e-12)
    assert run.schedule(400).momentum < run.schedule(399).momentum


def test_base_train_and_plan_take_the_same_run_flags_and_derive_the_same_run(capsys):
    from scripts import base_train, plan
    combos = [[], ["--depth", "12", "--num-iterations", "300"], ["--depth", "24", "--target-flops", "2.5e19"],
              ["--depth", "4", "--head-dim", "64", "--max-seq-len", "256", "--window-pattern", "L",
               "--total-batch-size", "8192", "--device-batch-size", "8", "--matrix-lr", "0.03", "--weight-decay", "0.1",
               "--warmup-steps", "5", "--warmdown-ratio", "0.5", "--final-lr-frac", "0.1", "--num-iterations", "50"],
              ["--depth", "8", "--target-param-data-ratio", "20"]]
    for flags in combos:
        plan.main(flags + ["--json", "--gpus", "2", "--vocab-size", "512", "--schedule-steps", "0,3,40"])
        planned = json.loads(capsys.readouterr().out)
        assert planned.pop("estimate")["hours"] > 0  # plan's addition: time and cost on --gpus x --gpu
        trained = base_train.recipe_from_flags(base_train.parse_args(flags), 512, 2).to_json([0, 3, 40])
        assert planned == json.loads(json.dumps(trained)), flags


def test_a_recipe_edit_reaches_base_train_and_plan(monkeypatch):
    # the flags default to None, "the recipe's choice": an edit of the choice changes what runs
    from nanochat import recipe
    from scripts import base_train, plan
    before = base_train.recipe_from_flags(base_train.parse_args([]), 32768, 1)
    monkeypatch.setattr(recipe, "MATRIX_LR", 0.04)
    monkeypatch.setattr(recipe, "DEPTH", 12)
    after = base_train.recipe_from_flags(base_train.parse_args([]), 32768, 1)
    assert before.config.n_layer == 20 and after.config.n_layer == 12
    assert after.param_groups[-1].lr == pytest.approx(0.04 * (after.total_batch_size / 2 ** 19) ** 0.5)
    assert plan.plan_recipe(plan.parse_args(["--gpus", "1"])).to_json() == after.to_json()


def test_plan_json(capsys):
    from scripts import plan
    plan.main(["--depth", "24", "--gpus", "8", "--target-param-data-ratio", "8", "--device-batch-size", "16",
               "--json"])
    out = json.loads(capsys.readouterr().out)
    for key in ("depth", "total_batch_size", "device_batch_size", "grad_accum_steps", "num_iterations", "tokens",
                "flops_per_token", "num_params", "muon_weight_decay", "param_groups", "schedule"):
        assert key in out, key
    assert (out["depth"], out["grad_accum_steps"], out["num_iterations"]) == (24, 4, 5568)
    assert out["num_params"]["lm_head"] == 32768 * 1536
    assert list(out["schedule"]) == ["0", "39", "400", "2000", "3500", "5000", "5567"]  # the default steps
    assert out["schedule"]["2000"]["lr_multiplier"] == pytest.approx(0.98661, abs=1e-5)
    assert out["schedule"]["5567"]["momentum"] == pytest.approx(0.90002, abs=1e-4)
    groups = {g["name"]: g for g in out["param_groups"]}
    assert groups["lm_head"]["betas"] == [0.8, 0.96] and groups["matrices"]["betas"] is None
    assert all({"name", "kind", "lr", "betas", "eps", "weight_decay"} <= g.keys() for g in out["param_groups"])
    assert groups["matrices"]["kind"] == "muon" and groups["matrices"]["lr"] == pytest.approx(0.02 * 2 ** 0.5)
