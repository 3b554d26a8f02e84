"""base_train's evaluation rounds: CORE and samples skip step 0 of a fresh run; samples run on every
rank (none waits at a collective meanwhile); the process group's timeout is explicit."""
import argparse
import json
from contextlib import nullcontext
from types import SimpleNamespace

import torch.distributed as dist

from nanochat import common
from scripts import base_train
from test_base_train import TINY


def test_core_and_samples_skip_step_0_and_run_every_n(base_dir, tmp_path, monkeypatch):
    core_steps = []

    def fake_core(model, tokenizer, bundle, device, max_per_task, should_stop=None):
        core_steps.append(None)
        return {"core": 0.0, "core_label": "fake", "rules": "fake", "max_per_task": max_per_task, "tasks": {}}

    monkeypatch.setattr(base_train, "evaluate_core", fake_core)
    base_train.main(TINY + ["--num-iterations", "4", "--total-batch-size", "128", "--core-every", "2",
                            "--sample-every", "2", "--eval-bundle", str(tmp_path), "--model-tag", "ev"])
    with open(base_dir / "base_checkpoints" / "ev" / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    steps = lambda kind: [r["step"] for r in records if r["type"] == kind]  # noqa: E731
    assert steps("core") == [2, 4] and len(core_steps) == 2  # not at step 0: a random model scores chance
    assert steps("sample") == [2, 4]
    assert steps("val") == [0, 3, 4]  # val bpb still starts the curve at step 0 (--eval-every 3)


def test_every_rank_samples_only_rank_0_logs(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(base_train, "sample_texts", lambda *a, **k: calls.append(1) or ["text"])
    args = argparse.Namespace(eval_every=-1, core_every=-1, sample_every=2)
    for rank in (1, 0):
        run = SimpleNamespace(args=args, model=None, step=2, resume_step=0, resume_evaluated=False, elapsed=0.0, eval_mode=nullcontext, tokenizer=None,
                              rank=rank, run_dir=str(tmp_path), metrics_path=str(tmp_path / "metrics.jsonl"),
                              wandb_run=None, recipe=SimpleNamespace(total_batch_size=1, flops_per_token=1))
        base_train.evaluate(run, last=False, should_stop=lambda: False)
        assert len(calls) == 1 and (tmp_path / "metrics.jsonl").exists() == (rank == 0)
        calls.clear()


def test_process_group_timeout_is_explicit(monkeypatch):
    seen = {}
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: seen.update(kw))
    monkeypatch.setattr(dist, "barrier", lambda: None)
    common.compute_init("cpu")
    assert seen["backend"] == "gloo" and seen["timeout"] == common.PROCESS_GROUP_TIMEOUT
    assert common.PROCESS_GROUP_TIMEOUT.total_seconds() == 30 * 60  # > a full CORE on one rank (~17 min est.)
