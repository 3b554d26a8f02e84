"""report.py: a fake run directory in, a markdown report with valid PNG plots out."""
import json
import os
import time

import pytest

from nanochat import compare, report
from nanochat.cli import UserError
from scripts import report as report_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TASKS = {"arc_easy": (0.55, 0.40, 25.0, 2376), "piqa": (0.62, 0.24, 50.0, 1838), "lambada_openai": (0.30, 0.30, 0.0, 5153)}


def write_json(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f)


def make_config(run_dir):
    write_json(os.path.join(run_dir, "config.json"), {
        "args": {"depth": 4, "fp8": False, "target_param_data_ratio": 8},
        "model_config": {"sequence_len": 256, "vocab_size": 4096, "n_layer": 4, "n_head": 2, "n_embd": 256,
                         "window_pattern": "SSSL"},
        "num_params": {"wte": 1048576, "value_embeds": 2097152, "lm_head": 1048576, "transformer_matrices": 3145728,
                       "scalars": 40, "total": 7340072},
        "flops_per_token": 2.5e7, "total_batch_size": 8192, "num_iterations": 20,
        "device_name": "cpu", "world_size": 1, "dtype": "float32"})


def make_full_run(base):
    run_dir = os.path.join(base, "base_checkpoints", "d4")
    make_config(run_dir)
    lines = []
    for step in range(20):
        lines.append({"type": "train", "step": step, "loss": 8.0 - 0.2 * step, "lr_mult": 1.0, "dt": 0.5,
                      "tok_per_sec": 16000.0, "mfu": None, "elapsed": 0.5 * step, "tokens": 8192 * step,
                      "flops": 2.5e7 * 8192 * step})
    for step in (0, 10, 20):
        lines.append({"type": "val", "step": step, "val_bpb": 3.0 - 0.05 * step, "elapsed": 0.5 * step,
                      "tokens": 8192 * step, "flops": 2.5e7 * 8192 * step})
    lines.append({"type": "core", "step": 20, "core": 0.0312, "core_label": "CORE over 3/22 tasks",
                  "tasks": {k: v[1] for k, v in TASKS.items()}, "elapsed": 10.0, "flops": 4e12})
    lines.append({"type": "sample", "step": 20, "samples": ["The capital of France is Paris"]})
    lines.append({"type": "final", "step": 20, "val_bpb": 2.1234, "elapsed": 10.5, "total_tokens": 41943040,
                  "total_flops": 4.1e12})
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in lines))
        f.write('{"type": "train", "step": 21, "lo')  # a torn last line from a killed run
    write_json(os.path.join(run_dir, "base_eval.json"), {
        "step": 20, "core": 0.1900, "core_label": "CORE over 3/22 tasks", "n_tasks": 3, "n_total": 22,
        "rules": report.RULES, "max_per_task": None,
        "tasks": {k: {"accuracy": a, "centered": c, "random_baseline": b, "n_items": n} for k, (a, c, b, n) in TASKS.items()},
        "skipped": ["hellaswag_zeroshot", "squad"], "bpb": {"train": 2.11, "val": 2.1234},
        "samples": ["Once upon a time there was a tokenizer"]})
    write_json(os.path.join(base, "tokenizer", "tok_train.json"),
               {"vocab_size": 4096, "train_time": 3.2, "chars": 1000000, "doc_cap": 10000})
    write_json(os.path.join(base, "tokenizer", "tok_eval.json"),
               {"bytes": {"train": 4000, "val": 3000}, "tokens": {"ours": {"train": 1000, "val": 800},
                                                                 "gpt2": {"train": 900, "val": 700}},
                "vocab": {"ours": 4096, "gpt2": 50257}})
    return run_dir


@pytest.fixture
def base(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    return str(tmp_path)


def test_full_report(base):
    make_full_run(base)
    path = report.write_report(start_time=time.time() - 1800)
    assert path == os.path.join(base, "report.md")
    md = open(path).read()
    assert "d4" in md
    assert "2.1234" in md  # final val bpb
    assert "CORE over 3/22 tasks" in md
    for label, (acc, centered, _, n) in TASKS.items():
        row = next(line for line in md.splitlines() if line.startswith(f"| {label} |"))
        assert f"{acc:.4f}" in row and f"{centered:.4f}" in row and f"{n:,}" in row
    for name, score in report.GPT2_CORE:
        assert f"| {name} | {score:.4f} |" in md
    assert "beats GPT-2 355M" in md  # 0.19 lies between 355M (0.1849) and 774M (0.2146)
    assert "approximate" in md  # 3 of 22 tasks: the comparison is flagged
    assert "hellaswag_zeroshot" in md
    assert "Once upon a time there was a tokenizer" in md
    assert "| ours | 4,096 | 4.00 | 3.75 |" in md  # bytes/token = bytes / tokens
    assert "tokens:params 10.00" in md  # 41943040 / (3145728 + 1048576)
    assert "0.50 h" in md
    assert "not run" not in md and "None" not in md and "INCOMPLETE" not in md
    assert "- run: d4 (complete)" in md
    assert "- training command: `python -m scripts.base_train --depth 4 --target-param-data-ratio 8`" in md
    assert "- val bpb during training: 2.1234 at step 20" in md
    assert "- val bpb by base_eval (step 20): train 2.1100, val 2.1234" in md
    assert "- CORE from base_eval at step 20" in md
    assert "CORE rules: leaderboard, rev 1; items: all items of each task." in md and "do not compare" not in md
    assert "train loss (smoothed" in md
    for png in ("train_loss.png", "val_bpb.png", "core_tasks.png"):
        assert f"(report/{png})" in md
        with open(os.path.join(base, "report", png), "rb") as f:
            assert f.read(8) == PNG_MAGIC


def test_a_score_under_other_rules_is_not_set_beside_gpt2_as_comparable(base):
    run_dir = make_full_run(base)
    with open(os.path.join(run_dir, "base_eval.json")) as f:
        ev = json.load(f)
    write_json(os.path.join(run_dir, "base_eval.json"), {**ev, "rules": "DCLM v1 semantics, rev 2"})
    md = open(report.write_report()).read()
    assert "CORE rules: DCLM v1 semantics, rev 2;" in md
    assert "These are not the rules GPT-2's scores were measured with (leaderboard, rev 1)" in md


def test_core_from_training_metrics_when_no_eval(base):
    run_dir = make_full_run(base)
    os.remove(os.path.join(run_dir, "base_eval.json"))
    md = open(report.write_report()).read()
    assert "0.0312" in md and "below GPT-2 124M" in md  # the training-time CORE record stands in
    assert "The capital of France is Paris" in md  # samples from metrics.jsonl


def test_config_only_says_not_run(base, monkeypatch):
    make_config(os.path.join(base, "base_checkpoints", "d4"))
    monkeypatch.setattr(report.torch.cuda, "is_available", lambda: False)
    md = open(report.write_report()).read()
    assert "depth 4, width 256" in md
    assert "- val bpb during training: not run" in md
    assert "- CORE: not run" in md
    assert "- train loss: not run" in md
    assert "CPU run: no GPU cost" in md
    assert "total wall time: unknown" in md
    assert not os.listdir(os.path.join(base, "report"))  # nothing to plot


def test_stopped_run_is_marked_incomplete_at_the_top(base):
    run_dir = make_full_run(base)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        lines = [line for line in f if '"final"' not in line]
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.writelines(lines)
    md = open(report.write_report()).read()
    assert md.splitlines()[2] == ("**INCOMPLETE: training stopped at step 20 of 20; the numbers below are those of "
                                  "a partly trained model. Re-run the same command (or speedrun.sh) to resume.**")


def test_wall_time_sums_the_stages_that_ran_over_reruns(base):
    make_full_run(base)
    t = 1_000_000.0
    marks = [("start", t), ("data", t + 60), ("train", t + 120), ("eval", t + 3720), ("end", t + 3780),
             # a re-run a day later: every stage finds its output and is skipped within seconds
             ("start", t + 86400), ("data", t + 86401), ("train", t + 86402), ("eval", t + 86404), ("end", t + 86405)]
    with open(os.path.join(base, "speedrun_stages.tsv"), "w") as f:
        f.writelines(f"{name}\t{when}\n" for name, when in marks)
    md = open(report.write_report()).read()
    assert "- total wall time: 1.05 h (stages that ran, summed over re-runs)" in md  # 3780 + 5 s
    assert "- stages: setup 1.0 min, data 1.0 min, train 60.0 min, eval 1.0 min" in md
    assert "- started: " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) in md  # the first start
    assert "- training time: 0.00 h" in md  # 10.5 s of optimizer steps in the fake run


def test_empty_base_dir(base):
    md = open(report.write_report()).read()
    assert "not run (no base_checkpoints/)" in md
    assert "- config: not run" in md and "- training: not run" in md


def test_newest_run_is_default_and_the_given_start_time(base):
    make_config(os.path.join(base, "base_checkpoints", "old"))
    new = os.path.join(base, "base_checkpoints", "new")
    make_config(new)
    os.utime(os.path.join(base, "base_checkpoints", "old"), (1, 1))
    md = open(report.write_report(start_time=time.time() - 2 * 3600)).read()
    assert "- run: new" in md
    assert "total wall time: 2.00 h" in md


def test_main_atomic_no_temp_files(base, capsys):
    make_full_run(base)
    report_cli.main(["--model-tag", "d4", "--gpu-hour-cost", "2.5"])
    assert capsys.readouterr().out.strip() == os.path.join(base, "report.md")
    leftovers = [f for d in (base, os.path.join(base, "report")) for f in os.listdir(d) if ".tmp" in f]
    assert leftovers == []
    assert os.path.getsize(os.path.join(base, "report.md")) > 0


def test_failed_write_keeps_previous_report(base, monkeypatch):
    make_full_run(base)
    path = report.write_report()
    before = open(path).read()

    def torn_open(file, mode="r", *args, **kwargs):  # the disk fills up halfway through writing report.md
        f = open(file, mode, *args, **kwargs)
        if "w" in mode:
            def write(text):
                f.file_write(text[: len(text) // 2])
                raise OSError("No space left on device")
            f.file_write, f.write = f.write, write
        return f
    monkeypatch.setattr(report, "open", torn_open, raising=False)
    with pytest.raises(OSError, match="No space"):
        report.write_report()
    assert open(path).read() == before
    assert not [f for f in os.listdir(base) if ".tmp" in f]


# --- --compare: runs side by side ---

def make_run(base, tag, val_bpbs, core, label="CORE over 3/22 tasks", elapsed=100.0, vocab=4096, rules=report.RULES,
             horizon=None, core_step=None):
    """A run of len(val_bpbs) val records 10 steps apart; it ends at its horizon unless one is given."""
    last = 10 * (len(val_bpbs) - 1)
    run_dir = os.path.join(base, "base_checkpoints", tag)
    write_json(os.path.join(run_dir, "config.json"), {"model_config": {"vocab_size": vocab},
                                                      "num_iterations": horizon or last})
    recs = [{"type": "val", "step": 10 * i, "val_bpb": v, "tokens": 8192 * 10 * i, "flops": 1e9 * i,
             "elapsed": 5.0 * i} for i, v in enumerate(val_bpbs)]
    if horizon in (None, last):
        recs.append({"type": "final", "step": last, "val_bpb": val_bpbs[-1], "elapsed": elapsed})
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in recs))
    write_json(os.path.join(run_dir, "base_eval.json"), {"core": core, "core_label": label, "rules": rules,
                                                         "step": last if core_step is None else core_step})


def test_compare_table_deltas_and_plot(base, capsys):
    make_run(base, "baseline", [3.0, 2.5, 2.2], 0.10)
    make_run(base, "my-idea", [3.0, 2.4, 2.1], 0.12, elapsed=90.0)
    report_cli.main(["--compare", "baseline", "my-idea"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| my-idea") or line.startswith("| baseline")]
    assert rows[0].startswith("| baseline | 2.2000 | 0.1000 (CORE over 3/22 tasks) | 100 | +0.0000 | +0.0000 | +0 |")
    assert rows[1].startswith("| my-idea | 2.1000 | 0.1200 (CORE over 3/22 tasks) | 90 | -0.1000 | +0.0200 | -10 |")
    assert "WARNING" not in out
    with open(os.path.join(base, "report", "compare_baseline_vs_my-idea.png"), "rb") as f:
        assert f.read(8) == PNG_MAGIC


def test_compare_warns_when_not_comparable(base, capsys):
    make_run(base, "a", [3.0, 2.0], 0.1, label="CORE over 22/22 tasks")
    make_run(base, "b", [3.0, 2.0], 0.1, label="CORE over 22/22 tasks, subset: 50 items per task", vocab=8192,
             rules="DCLM v1 semantics, rev 2")
    lines = compare.compare_runs(["a", "b"], base_dir=str(base))
    warnings = [line for line in lines if line.startswith("WARNING")]
    assert len(warnings) == 3
    assert "different tokenizer: a: 4096, b: 8192" in warnings[0] and "different CORE subset" in warnings[1]
    assert "different CORE rules: a: leaderboard, rev 1, b: DCLM v1 semantics, rev 2" in warnings[2]


def test_compare_marks_an_unfinished_run_and_an_early_core(base):
    make_run(base, "baseline", [3.0, 2.5, 2.2], 0.10, core_step=10)
    make_run(base, "stopped", [3.0, 2.4], 0.12, horizon=20)
    rows = {line.split(" |")[0]: line for line in compare.compare_runs(["baseline", "stopped"], base_dir=str(base))
            if line.startswith("| ")}
    assert "| baseline" in rows and "at step 10)" in rows["| baseline"]  # CORE measured before its last step (20)
    assert "| stopped (UNFINISHED: step 10 of 20)" in rows and "at step" not in rows["| stopped (UNFINISHED: step 10 of 20)"]


def test_compare_unknown_tag_names_the_runs_there(base):
    make_run(base, "baseline", [3.0], 0.1)
    with pytest.raises(UserError, match="no run 'nope' .*there: baseline"):
        compare.compare_runs(["baseline", "nope"], base_dir=str(base))


def test_skipped_core_tasks_say_why(base):
    run_dir = make_full_run(base)
    ev_path = os.path.join(run_dir, "base_eval.json")
    ev = json.load(open(ev_path))
    ev["skipped_why"] = {"squad": "corrupt (JSONDecodeError)"}  # hellaswag_zeroshot: no reason recorded
    write_json(ev_path, ev)
    md = open(report.write_report()).read()
    assert "Skipped: hellaswag_zeroshot: data missing; squad: corrupt (JSONDecodeError)" in md


def test_report_for_a_named_run_that_does_not_exist(base):
    make_full_run(base)
    md = open(report.write_report(model_tag="nope")).read()  # the report tolerates it; --compare refuses
    assert "- run: nope" in md and "- config: not run" in md and "- CORE: not run" in md


# -----------------------------------------------------------------------------
# Groups of seeds: is a difference real?

def test_welch_interval_and_seeds_needed_by_hand():
    diff, half = compare.welch([1, 2, 3], [2, 3, 4])
    # se = sqrt(1/3 + 1/3); Welch's df = (2/3)^2 / (2 × (1/3)^2 / 2) = 4, t(4) = 2.776
    assert diff == 1 and half == pytest.approx(2.776 * (2 / 3) ** 0.5)
    assert compare.t975(2) == 4.303 and compare.t975(2.5) == pytest.approx((4.303 + 3.182) / 2)
    assert 1.96 < compare.t975(200) < 2.042
    # spread 1, difference 1: the 95% interval first excludes 0 at 9 seeds (t(16) · sqrt(2/9) = 0.999)
    assert compare.seeds_needed([1, 2, 3], [2, 3, 4]) == 9


def test_a_planted_gain_is_found_and_a_planted_null_is_noise(base, capsys):
    planted = {"base": [2.200, 2.210, 2.190], "gain": [2.150, 2.160, 2.140], "null": [2.205, 2.185, 2.215]}
    for group, bpbs in planted.items():
        for seed, bpb in enumerate(bpbs):
            make_run(base, f"{group}-s{seed}", [3.0, bpb], 0.1 + 0.001 * seed)
    make_run(base, "base-s0.old-20261201-120000", [3.0, 9.0], 0.9)  # moved aside by --overwrite: not in the glob
    for seed in range(3):  # CORE measured during training only (no base_eval): that is the one compared
        run_dir = os.path.join(base, "base_checkpoints", f"null-s{seed}")
        os.remove(os.path.join(run_dir, "base_eval.json"))
        with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"type": "core", "step": 10, "core": 0.1 + 0.001 * seed, "core_label": "CORE over 3/22 tasks",
                                "rules": report.RULES, "tasks": {"piqa": 0.2 + 0.01 * seed, "copa": 0.3}}) + "\n")
    lines = compare.compare_runs(["base-s*", "gain-s0,gain-s1,gain-s2", "null-s*"], base_dir=str(base))
    text = "\n".join(lines)
    assert "| base-s* | 3 | 2.2000 ± 0.0100 | 0.1010 ± 0.0010 |" in text
    assert "| null-s* | 3 | 2.2017 ± 0.0153 | 0.1010 ± 0.0010 |" in text
    gain = text[text.index("gain-s0,gain-s1,gain-s2 against"):text.index("null-s* against")]
    null = text[text.index("null-s* against"):]
    assert "val bpb -0.0500 ± " in gain and "(95%, Welch's t): a real gain" in gain
    assert "val bpb +0.0017 ± " in null and "within noise" in null and "seeds per group to resolve it" in null
    with open(os.path.join(base, "report", "compare_base-sx_vs_gain-s0+gain-s1+gain-s2_vs_null-sx.png"), "rb") as f:
        assert f.read(4) == PNG_MAGIC[:4]
    single = "\n".join(compare.compare_runs(["base-s0", "gain-s0"], base_dir=str(base)))
    assert "One run per group: no noise estimate is possible" in single


def test_core_tasks_get_one_table_row_each(base):
    assert compare.difference([0.3, 0.3], [0.3, 0.3], "copa") == ("copa: the same in every run", "")
    assert compare.difference([0.1], [0.2, 0.3], "CORE") == ("CORE: one run in a group: no noise estimate", "")
    assert compare.difference([1, 2, 3], [2, 3, 4], "val bpb")[1] == "9"
    for group, piqa in (("a", [0.20, 0.21, 0.22]), ("b", [0.30, 0.31, 0.32])):
        for seed, score in enumerate(piqa):
            make_run(base, f"{group}-s{seed}", [3.0, 2.2], 0.1)
            path = os.path.join(base, "base_checkpoints", f"{group}-s{seed}", "base_eval.json")
            ev = json.load(open(path))
            write_json(path, {**ev, "tasks": {"piqa": {"centered": score, "accuracy": 0.5}, "copa": {"centered": 0.3}}})
    text = "\n".join(compare.compare_runs(["a-s*", "b-s*"], base_dir=str(base)))
    assert "| CORE task (centered) | a-s* | b-s* | difference |" in text
    assert "| piqa | 0.2100 ± 0.0100 | 0.3100 ± 0.0100 | +0.1000 ± " in text and "a real gain |" in text
    assert "| copa | 0.3000 ± 0.0000 | 0.3000 ± 0.0000 | the same in every run |" in text
    assert "- CORE: the same in every run" in text and "- val bpb: the same in every run" in text
