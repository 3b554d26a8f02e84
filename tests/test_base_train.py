import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from scripts import base_train

TINY = ["--depth", "1", "--head-dim", "16", "--max-seq-len", "32", "--device-batch-size", "4",
        "--eval-every", "3", "--bpb-tokens", "256", "--final-bpb-tokens", "256", "--core-every", "0",
        "--sample-every", "0", "--device-type", "cpu"]


def train_records(base_dir, tag):
    with open(base_dir / "base_checkpoints" / tag / "metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if r["type"] == "train"]


def weights(base_dir, tag, step):
    return torch.load(base_dir / "base_checkpoints" / tag / f"step_{step:06d}" / "model.pt", weights_only=True)


def test_resume_is_exact(base_dir):
    args = TINY + ["--num-iterations", "6", "--total-batch-size", "256"]  # 2 micro-steps per step
    base_train.main(args + ["--model-tag", "straight"])
    base_train.main(args + ["--model-tag", "stopped", "--save-every", "3"])
    run = base_dir / "base_checkpoints" / "stopped"
    shutil.rmtree(run / "step_000006")  # as if the run had died between step 3 and the end
    base_train.main(args + ["--model-tag", "stopped", "--resume"])
    straight, resumed = train_records(base_dir, "straight"), train_records(base_dir, "stopped")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]  # the log was rewound to the checkpoint
    assert [r["raw_loss"] for r in resumed] == [r["raw_loss"] for r in straight]  # bit-identical losses
    a, b = weights(base_dir, "straight", 6), weights(base_dir, "stopped", 6)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_of_a_different_model_is_refused(base_dir):
    base_train.main(TINY + ["--num-iterations", "2", "--total-batch-size", "128", "--model-tag", "x"])
    with pytest.raises(ValueError, match="different model"):
        base_train.main(TINY[2:] + ["--depth", "2", "--num-iterations", "2", "--total-batch-size", "128",
                                    "--model-tag", "x", "--resume"])


def test_two_processes_equal_one(base_dir):
    # same global batch (256 tokens): 1 process × 2 micro-steps vs 2 processes × 1 micro-step
    args = TINY + ["--num-iterations", "4", "--total-batch-size", "256"]
    base_train.main(args + ["--model-tag", "one"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "scripts.base_train", *args, "--model-tag", "two"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=os.getcwd(),
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    one, two = weights(base_dir, "one", 4), weights(base_dir, "two", 4)
    for k in one:  # fp32 on CPU; gradient averages are exact for two halves
        assert torch.allclose(one[k].float(), two[k].float(), rtol=1e-5, atol=1e-6), k


def test_wandb_offline(base_dir, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    base_train.main(TINY + ["--num-iterations", "2", "--total-batch-size", "128", "--run", "smoke",
                            "--model-tag", "w"])
    wandb_dir = base_dir / "base_checkpoints" / "w" / "wandb"
    runs = [d for d in os.listdir(wandb_dir) if d.startswith("offline-run-")]
    assert len(runs) == 1 and any(f.endswith(".wandb") for f in os.listdir(wandb_dir / runs[0]))


def test_sigterm_checkpoints_and_resume_matches(base_dir):
    import signal
    import time
    args = TINY + ["--num-iterations", "60", "--total-batch-size", "128", "--eval-every", "0"]
    base_train.main(args + ["--model-tag", "straight"])
    proc = subprocess.Popen([sys.executable, "-m", "scripts.base_train", *args, "--model-tag", "killed"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=os.getcwd())
    metrics = base_dir / "base_checkpoints" / "killed" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out[-2000:]  # 128 + SIGTERM, as shells report it: stopped, not finished
    assert "stopped by signal 15" in out
    from nanochat.checkpoint import list_steps
    steps = list_steps(base_dir / "base_checkpoints" / "killed")
    assert len(steps) == 1 and 0 < steps[0] < 60  # stopped mid-run, with a checkpoint
    base_train.main(args + ["--model-tag", "killed", "--resume"])
    a, b = weights(base_dir, "straight", 60), weights(base_dir, "killed", 60)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_loss_stops_naming_step_and_checkpoint(base_dir, monkeypatch):
    import signal
    from nanochat.gpt import GPT
    args = TINY + ["--total-batch-size", "128", "--model-tag", "nan", "--num-iterations", "8"]
    original, steps = GPT.forward, []

    def stop_after_two_steps(self, *a, **kw):
        if torch.is_grad_enabled():
            steps.append(1)
            if len(steps) == 2:
                os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *a, **kw)
    monkeypatch.setattr(GPT, "forward", stop_after_two_steps)
    with pytest.raises(SystemExit):
        base_train.main(args)  # stopped: a good checkpoint at step 2
    monkeypatch.setattr(GPT, "forward", original)
    # then an absurd learning rate: the weights overflow and the loss turns NaN a step later
    with pytest.raises(RuntimeError, match=r"not finite at step 4 .*Last good checkpoint: .*step_000002"):
        base_train.main(args + ["--resume", "--matrix-lr", "1e38", "--save-every", "1"])
    from nanochat.checkpoint import list_steps
    assert list_steps(base_dir / "base_checkpoints" / "nan")[-1] == 3  # saved before the NaN showed; 2 kept


def torchrun(args, nproc):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "scripts.base_train", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=os.getcwd(),
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.parametrize("before, after", [(1, 2), (2, 1)])
def test_resume_with_another_world_size(base_dir, before, after):
    # 256-token steps: 1 process × 2 micro-steps or 2 processes × 1 hold the same 2 data streams
    args = TINY + ["--total-batch-size", "256"]
    base_train.main(args + ["--num-iterations", "6", "--model-tag", "straight"])
    run = lambda n, nproc, extra: (base_train.main(args + ["--num-iterations", n, "--model-tag", "moved", *extra])  # noqa: E731
                                   if nproc == 1 else torchrun(args + ["--num-iterations", n, "--model-tag", "moved", *extra], nproc))
    run("6", before, ["--save-every", "3"])
    shutil.rmtree(base_dir / "base_checkpoints" / "moved" / "step_000006")  # keep the step-3 checkpoint only
    run("6", after, ["--resume"])
    a, b = weights(base_dir, "straight", 6), weights(base_dir, "moved", 6)
    for k in a:  # fp32 on CPU; averaging two gradients is exact in either order
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-5, atol=1e-6), k


def test_resume_with_other_data_streams_is_refused(base_dir):
    base_train.main(TINY + ["--num-iterations", "2", "--total-batch-size", "256", "--model-tag", "s"])
    with pytest.raises(ValueError, match="2 data streams.*--total-batch-size"):
        base_train.main(TINY + ["--num-iterations", "4", "--total-batch-size", "128", "--model-tag", "s", "--resume"])


def test_out_of_memory_names_the_flag_to_try(base_dir, monkeypatch):
    from nanochat.gpt import GPT

    def oom(self, *args, **kwargs):
        if torch.is_grad_enabled():  # training steps only, not the evaluation at step 0
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, *args, **kwargs)
    original = GPT.forward
    monkeypatch.setattr(GPT, "forward", oom)
    with pytest.raises(RuntimeError, match="--device-batch-size 4: try --device-batch-size 2"):
        base_train.main(TINY + ["--num-iterations", "2", "--total-batch-size", "128"])


@pytest.mark.parametrize("flags, message", [
    (["--device-batch-size", "lots"], "--device-batch-size lots: expected a positive integer or 'auto'"),
    (["--window-pattern", "SSXL"], "--window-pattern 'SSXL'"),
    (["--head-dim", "15"], "--head-dim 15"),
    (["--warmdown-ratio", "1.5"], "--warmdown-ratio 1.5"),
    (["--target-flops", "1e12"], "--num-iterations and --target-flops"),
    (["--model-tag", "../elsewhere"], "--model-tag '../elsewhere'"),
    (["--device-type", "gpu"], "argument --device-type: invalid choice: 'gpu'"),
    (["--eval-every", "-5"], "argument --eval-every: -5: expected N >= 1 steps, or 0 for off"),
    # values that used to mean "auto" (or crash) by accident: auto is leaving the flag out
    (["--num-iterations", "0"], "--num-iterations 0: must be >= 1 (leave the flag out for auto)"),
    (["--total-batch-size", "0"], "--total-batch-size 0: must be >= 1 tokens (leave the flag out for auto)"),
    (["--total-batch-size", "-512"], "--total-batch-size -512: must be >= 1 tokens"),
    (["--depth", "0"], "--depth 0: must be >= 1"),
    (["--depth", "-3"], "--depth -3: must be >= 1"),
    (["--weight-decay", "-1"], "--weight-decay -1.0: must be >= 0 (leave the flag out for auto)"),
    # batches the processes cannot split: found once the recipe is derived, still one line and exit 2
    (["--total-batch-size", "64"], "the total batch of 64 tokens is smaller than one micro-step: device batch × seq "
                                   "len × processes = 4 × 32 × 1 = 128: lower --device-batch-size or raise"),
    (["--save-every-minutes", "-1"], "--save-every-minutes -1.0: must be >= 0"),
])
def test_bad_flags_are_one_line_errors(base_dir, flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        base_train.main(TINY + ["--num-iterations", "2", *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1  # argparse's exit status, one line, no traceback
    assert err.startswith("python -m scripts.base_train: error: ") and message in err, err
    assert not (base_dir / "base_checkpoints").exists()  # nothing was written


def test_left_out_flags_mean_auto_or_the_recipes_choice():
    auto = base_train.parse_args([])
    assert (auto.num_iterations, auto.total_batch_size, auto.target_flops, auto.weight_decay, auto.compile) == \
        (None, None, None, None, None)
    assert (auto.depth, auto.max_seq_len, auto.matrix_lr, auto.device_batch_size) == (None, None, None, None)
    assert (auto.save_every, auto.bpb_tokens, auto.final_bpb_tokens, auto.core_max_per_task) == \
        (0, 10 * 2 ** 19, 80 * 2 ** 19, 500)
    off = base_train.parse_args(["--core-every", "0", "--sample-every", "0", "--eval-every", "0", "--save-every", "0",
                                 "--no-compile"])
    assert (off.core_every, off.sample_every, off.eval_every, off.save_every, off.compile) == (0, 0, 0, 0, False)


def test_seeds_change_the_init_and_the_data_order_and_a_seed_reproduces(base_dir):
    args = TINY + ["--num-iterations", "3", "--total-batch-size", "128", "--eval-every", "0"]
    runs = {name: (base_train.main(args + ["--model-tag", name] + extra), weights(base_dir, name, 3))
            for name, extra in [("default", []), ("s1", ["--seed", "1"]), ("s1-again", ["--seed", "1"]),
                                ("s2", ["--seed", "2"])]}
    same = lambda a, b: all(x.equal(y) for x, y in zip(runs[a][1].values(), runs[b][1].values()))  # noqa: E731
    assert same("s1", "s1-again")  # the same seed: bit-identical, as every run was before seeds
    assert not same("s1", "s2") and not same("default", "s1")
    # the data order alone differs too: the row groups a seed's first batches come from
    from nanochat.dataloader import DataLoader
    from nanochat.tokenizer import get_tokenizer
    orders = {seed: DataLoader(get_tokenizer(), 4, 32, "train", seed=seed)._stream_order(0) for seed in (None, 1, 2)}
    assert sorted(orders[1]) == sorted(orders[None]) and len({tuple(o) for o in orders.values()}) == 3
