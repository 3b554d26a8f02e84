"""What a user's mistake or a stop request may not cost: a finished run, another run's
checkpoints, a clean log, a prompt stop (issue: horizon, tags, Ctrl-C, periodic saves)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from nanochat.checkpoint import list_steps, load_meta, load_model, save_checkpoint
from nanochat.gpt import GPT, GPTConfig, build_model
from nanochat.run import save_every_minutes
from scripts import base_train

TINY = ["--depth", "1", "--head-dim", "16", "--max-seq-len", "32", "--device-batch-size", "4",
        "--total-batch-size", "128", "--eval-every", "0", "--bpb-tokens", "256", "--final-bpb-tokens", "256",
        "--core-every", "0", "--sample-every", "0", "--device-type", "cpu"]


def run_dir(base_dir, tag):
    return base_dir / "base_checkpoints" / tag


def records(base_dir, tag):
    with open(run_dir(base_dir, tag) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_resume_with_another_horizon_is_refused_and_keeps_the_checkpoints(base_dir):
    base_train.main(TINY + ["--num-iterations", "42", "--save-every", "20", "--model-tag", "h"])
    assert list_steps(run_dir(base_dir, "h")) == [40, 42]
    with pytest.raises(ValueError, match=r"run of 42 steps, these flags give 30: resume with the run's flags, "
                                         r"or start a new run under another --model-tag") as e:
        base_train.main(TINY + ["--num-iterations", "30", "--model-tag", "h", "--resume"])
    assert "\n" not in str(e.value)
    assert list_steps(run_dir(base_dir, "h")) == [40, 42]  # the finished run is untouched


def test_rotation_never_deletes_a_newer_checkpoint(tmp_path):
    model = build_model(GPTConfig.from_depth(1, vocab_size=32, sequence_len=8, head_dim=16), "cpu")
    for step in (10, 20, 40, 50):
        os.makedirs(tmp_path / f"step_{step:06d}")
    save_checkpoint(str(tmp_path), 30, model, None, {}, [], keep=2)
    assert list_steps(tmp_path) == [20, 30, 40, 50]  # 30 and the one before it; 40 and 50 are not ours
    save_checkpoint(str(tmp_path), 60, model, None, {}, [], keep=3)
    assert list_steps(tmp_path) == [40, 50, 60]


def test_a_tag_that_holds_a_run_is_refused_without_resume_and_overwrite_moves_it_aside(base_dir, capsys):
    base_train.main(TINY + ["--num-iterations", "2", "--model-tag", "t"])
    with pytest.raises(ValueError, match=r"holds another run: continue it with --resume, start this one under "
                                         r"another --model-tag, or move the old one aside with --overwrite"):
        base_train.main(TINY + ["--num-iterations", "4", "--model-tag", "t"])
    assert list_steps(run_dir(base_dir, "t")) == [2] and [r["step"] for r in records(base_dir, "t")] == [1, 2, 2]
    base_train.main(TINY + ["--num-iterations", "4", "--model-tag", "t", "--overwrite"])
    old = [d for d in os.listdir(base_dir / "base_checkpoints") if d.startswith("t.old-")]
    assert len(old) == 1 and list_steps(base_dir / "base_checkpoints" / old[0]) == [2]  # moved, not deleted
    assert list_steps(run_dir(base_dir, "t")) == [3, 4] or list_steps(run_dir(base_dir, "t")) == [4]
    assert [r["step"] for r in records(base_dir, "t") if r["type"] == "train"] == [1, 2, 3, 4]
    with pytest.raises(SystemExit) as e:  # a flag conflict: argparse's one-line error, exit 2
        base_train.main(TINY + ["--num-iterations", "4", "--model-tag", "t", "--overwrite", "--resume"])
    assert e.value.code == 2 and "--overwrite and --resume" in capsys.readouterr().err
    base_train.main(TINY + ["--num-iterations", "2", "--model-tag", "new", "--resume"])  # nothing to resume: starts
    assert list_steps(run_dir(base_dir, "new")) == [2]


def start(base_dir, args, lines=3):
    """base_train in a subprocess, returned once metrics.jsonl has `lines` lines."""
    proc = subprocess.Popen([sys.executable, "-m", "scripts.base_train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=os.getcwd())
    metrics = run_dir(base_dir, args[args.index("--model-tag") + 1]) / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= lines) and time.time() < deadline:
        time.sleep(0.05)
    return proc


def test_ctrl_c_saves_and_exits_130(base_dir):
    proc = start(base_dir, TINY + ["--num-iterations", "2000", "--model-tag", "c"])
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-2000:]
    steps = list_steps(run_dir(base_dir, "c"))
    assert len(steps) == 1 and 0 < steps[0] < 2000 and f"stopped by signal 2 at step {steps[0]}" in out


def test_sigterm_during_a_long_evaluation_stops_within_a_batch(base_dir, monkeypatch):
    # every eval batch takes 1 s; at step 2 the first eval batch raises SIGTERM (a preemption notice)
    calls, stop = {"train": 0, "eval_after_signal": 0}, {}
    original = GPT.forward

    def forward(self, idx, targets=None, **kwargs):
        if torch.is_grad_enabled():
            calls["train"] += 1
        elif calls["train"] >= 2:
            if not stop:
                stop["t"] = time.time()
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                calls["eval_after_signal"] += 1
            time.sleep(1.0)
        return original(self, idx, targets, **kwargs)
    monkeypatch.setattr(GPT, "forward", forward)
    args = TINY + ["--num-iterations", "6", "--eval-every", "2", "--bpb-tokens", "1536", "--model-tag", "e"]
    with pytest.raises(SystemExit) as e:
        base_train.main(args)
    assert e.value.code == 143 and time.time() - stop["t"] < 3  # the val split holds ~12 batches: ~12 s
    assert calls["eval_after_signal"] == 0
    assert list_steps(run_dir(base_dir, "e")) == [2]  # saved at the step it had reached
    assert load_meta(run_dir(base_dir, "e"))["loop"]["evaluated"] is False
    assert [r["step"] for r in records(base_dir, "e") if r["type"] == "val"] == [0]  # the cut eval is not logged
    monkeypatch.setattr(GPT, "forward", original)
    base_train.main(args + ["--resume"])  # the evaluation of step 2 runs again, once
    assert [r["step"] for r in records(base_dir, "e") if r["type"] == "val"] == [0, 2, 4, 6]


def test_kill_before_the_first_checkpoint_then_resume_logs_each_step_once(base_dir):
    proc = start(base_dir, TINY + ["--num-iterations", "2000", "--eval-every", "3", "--model-tag", "k"], lines=6)
    proc.kill()
    proc.wait()
    assert list_steps(run_dir(base_dir, "k")) == [] and len(records(base_dir, "k")) >= 6
    base_train.main(TINY + ["--num-iterations", "6", "--eval-every", "3", "--model-tag", "k", "--resume"])
    steps = [(r["type"], r["step"]) for r in records(base_dir, "k")]
    assert [s for t, s in steps if t == "train"] == [1, 2, 3, 4, 5, 6]
    assert [s for t, s in steps if t == "val"] == [0, 3, 6]


def test_periodic_checkpoints_are_on_by_default_on_every_device():
    minutes = base_train.parse_args([]).save_every_minutes
    assert save_every_minutes(minutes, torch.device("cpu")) == 10
    assert save_every_minutes(minutes, torch.device("cuda")) == 30
    assert save_every_minutes(base_train.parse_args(["--save-every-minutes", "0"]).save_every_minutes,
                              torch.device("cpu")) == 0


def test_a_step_without_checkpoint_lists_the_steps_there_are(base_dir):
    base_train.main(TINY + ["--num-iterations", "4", "--save-every", "2", "--model-tag", "s"])
    with pytest.raises(FileNotFoundError, match=r"has no checkpoint at step 150; it has step\(s\) 2, 4 "
                                                r"\(leave out --step for the newest\)$"):
        load_model(str(run_dir(base_dir, "s")), "cpu", step=150)


def test_sigterm_to_torchrun_saves_and_fails(base_dir):
    # torchrun forwards SIGTERM to the workers, which save and exit 143, but then exits 1 itself with
    # a SignalException traceback, whatever they returned: documented in docs/RELIABILITY.md
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "scripts.base_train", *TINY, "--total-batch-size", "256", "--num-iterations", "2000", "--model-tag", "tr"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=os.getcwd(),
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = run_dir(base_dir, "tr") / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    steps = list_steps(run_dir(base_dir, "tr"))
    assert proc.returncode == 1 and "SignalException" in out, out[-3000:]
    assert len(steps) == 1 and f"stopped by signal 15 at step {steps[0]}" in out
