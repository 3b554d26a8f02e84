"""
Sweeps (scripts/sweep.py, nanochat/sweep.py): the fits recover planted numbers exactly, and a toy
isoFLOP grid runs end to end on the CPU, is killed mid-cell, and continues where it stopped.
"""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import error_line
from nanochat import sweep
from nanochat.checkpoint import list_steps, load_weights
from scripts import base_train
from scripts import sweep as sweep_cli
from test_core_eval import write_bundle


def rows_of(budgets_params_bpb, kind="flops"):
    """Results rows from (budget, params, val bpb); tokens from C = 6 N D."""
    return [{"cell": f"c{i}", "kind": kind, "budget": C, "depth": i, "params_horizon": N, "tokens": C / (6 * N),
             "flops": C, "val_bpb": bpb, "status": "done"} for i, (C, N, bpb) in enumerate(budgets_params_bpb)]


def planted_isoflop(exponent=0.5, shift=1.0):
    """A grid whose optimum is N* = 0.1 C^exponent exactly; bpb = 0.05 (ln N - ln N*)² + floor(C)."""
    points = []
    for C in (1e18, 1e19, 1e20):
        n_star = 0.1 * C ** exponent
        floor = 3.0 - 0.1 * math.log(C * shift)
        points += [(C, n_star * f, 0.05 * math.log(f) ** 2 + floor) for f in (0.25, 0.5, 1.5, 3.0)]
    return rows_of(points)


def test_the_parabola_minimum_and_the_power_laws_are_recovered():
    x = [1.0, 2.0, 4.0, 5.0]
    assert sweep.parabola_minimum(x, [2 * (v - 3) ** 2 + 1 for v in x]) == pytest.approx((3.0, 1.0))
    assert sweep.parabola_minimum(x, [-(v - 3) ** 2 for v in x]) is None  # a maximum is not an optimum
    assert sweep.power_law([1, 10, 100], [5 * c ** 0.7 for c in (1, 10, 100)]) == pytest.approx((0.7, 5.0))
    optima = sweep.isoflop_optima(planted_isoflop(exponent=0.5))
    for o in optima:
        assert o["params"] == pytest.approx(0.1 * o["budget"] ** 0.5, rel=1e-9) and o["warning"] is None
        assert o["tokens"] == pytest.approx(o["budget"] / (6 * o["params"]), rel=1e-9)
    fit = sweep.scaling(optima)
    assert fit["params_exponent"] == pytest.approx(0.5) and fit["tokens_exponent"] == pytest.approx(0.5)


def test_an_optimum_outside_the_sampled_depths_is_flagged():
    rows = [r for r in planted_isoflop() if r["params_horizon"] < 0.1 * r["budget"] ** 0.5]  # all below N*
    rows += [dict(rows[0], params_horizon=rows[0]["params_horizon"] * 0.9, val_bpb=rows[0]["val_bpb"] + 0.01)]
    assert any(o.get("warning") for o in sweep.isoflop_optima(rows))


def test_a_frontier_shifted_by_a_known_factor_gives_that_compute_multiplier():
    # the idea reaches at C what the baseline reaches at 2C, at every budget: a multiplier of 2, flat
    base, idea = planted_isoflop(shift=1.0), planted_isoflop(shift=2.0)
    result = sweep.compare(base, idea)
    assert [p["multiplier"] for p in result["points"]] == pytest.approx([2.0] * 3, rel=1e-9)
    assert result["trend_exponent"] == pytest.approx(0.0, abs=1e-9)
    assert "holds roughly constant" in sweep.trend_line(result)
    # a gain that grows with compute: shift 2 at 1e18 up to 8 at 1e20
    grow = rows_of([(r["budget"], r["params_horizon"], r["val_bpb"] - 0.1 * math.log(2 ** (1 + math.log10(
        r["budget"] / 1e18)))) for r in base])
    assert "grows with compute" in sweep.trend_line(sweep.compare(base, grow))


# -----------------------------------------------------------------------------
# A toy grid on the CPU: depths 2-4 at two budgets, killed mid-cell and continued

TOY = ["--head-dim", "16", "--max-seq-len", "32", "--device-batch-size", "4", "--total-batch-size", "128",
       "--final-bpb-tokens", "256", "--save-every", "2", "--core-max-per-task", "2", "--device-type", "cpu"]
GRID = ["--name", "toy", "--flops", "5e9", "1e10", "--depths", "2", "3", "4"]


@pytest.fixture
def bundle(tmp_path):
    lm = [{"context": "the cat", "continuation": "sat"}, {"context": "the dog", "continuation": "ran"}]
    mc = [{"query": "the", "choices": ["cat", "dog"], "gold": 0}] * 3
    write_bundle(tmp_path / "bundle", [("lm", "language_modeling", "a/lm.jsonl", 0, 0, lm),
                                       ("mc", "multiple_choice", "b/mc.jsonl", 0, 50, mc)], present={"lm", "mc"})
    return str(tmp_path / "bundle")


def test_a_toy_sweep_runs_is_killed_mid_cell_and_continues(base_dir, bundle, capsys):
    toy = TOY + ["--eval-bundle", bundle]
    root = base_dir / "sweeps" / "toy"
    killed = root / "runs" / "f1e+10-d3"  # the fifth cell: 9 steps, a checkpoint every 2
    proc = subprocess.Popen([sys.executable, "-m", "scripts.sweep", *GRID, "--", *toy],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not list_steps(str(killed)) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # the sweep and, through PDEATHSIG, its training cell
    proc.wait()
    time.sleep(0.5)
    resumed_from = list_steps(str(killed))
    assert resumed_from and resumed_from[-1] < 9, "the cell finished before it was killed"
    # the same command again: 4 cells skipped, the killed one resumed, the rest run
    rows = sweep_cli.main([*GRID, "--", *toy])
    out = capsys.readouterr().out
    assert out.count("done before, skipped") == 4 and "f1e+10-d3: done" in out
    assert "resumed from" in (killed / "train.log").read_text()
    assert [r["status"] for r in rows] == ["done"] * 6 and all(r["val_bpb"] > 0 for r in rows)
    assert {r["core_rules"] for r in rows} == {"leaderboard, rev 1"} and rows[0]["params_total"] > rows[0]["params_horizon"]
    # the killed cell ends as an uninterrupted run of it does
    argv = json.loads((killed / "cell.json").read_text())["argv"]
    alone = str(base_dir / "alone")
    reference = base_train.main([*argv[:argv.index("--run-dir")], "--run-dir", alone, *argv[argv.index("--run-dir") + 2:]])
    assert rows[4]["val_bpb"] == reference["val_bpb"]
    for a, b in zip(load_weights(str(killed), 9, "cpu").values(), load_weights(alone, 9, "cpu").values()):
        assert a.equal(b)
    # what it wrote
    assert len(json.loads((root / "results.json").read_text())) == 6 and (root / "results.csv").exists()
    md = (root / "sweep.md").read_text()
    assert "## Compute-optimal size per budget" in md and (root / "isoflop.png").read_bytes()[:4] == b"\x89PNG"
    # a cell whose settings changed is refused
    msg = error_line(sweep_cli.main, [*GRID, "--", *toy, "--matrix-lr", "0.03"], capsys)
    assert "cell f5e+09-d2" in msg and "ran with other settings (differing: --matrix-lr 0.03)" in msg


def test_dry_run_prints_the_cells_and_their_cost(base_dir, capsys):
    cells = sweep_cli.main(["--name", "plan", "--flops", "1e18", "1e19", "--depths", "10", "12", "--dry-run"])
    out = capsys.readouterr().out
    assert len(cells) == 4 and "f1e+18-d10" in out and "GPU-hours" in out and "$" in out
    assert not (base_dir / "sweeps" / "plan").exists()
