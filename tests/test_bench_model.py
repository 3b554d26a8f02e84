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
