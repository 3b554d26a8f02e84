import os
import re
import signal
import subprocess
import sys
import time

import pytest

from scripts import chaos


def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(base_dir, capsys):
    # each kill needs ~3 checkpoints (6 steps) of progress: 24 steps leave room for 2
    result = chaos.main(["--kills", "2", "--", "--num-iterations", "24"])
    assert result == {"kills": 2, "step": 24, "weights": True, "optimizer state": True, "data streams": True}
    out = capsys.readouterr().out
    assert "2 kills; at step 24, weights EQUAL, optimizer state EQUAL, data streams EQUAL" in out


def test_fewer_kills_than_asked_fails_and_each_invocation_starts_from_scratch(base_dir):
    # 4 steps leave no room for a kill: nothing was tested, and chaos must say so. Leftovers of an
    # earlier invocation (here a marker file) must go: a finished run would just be resumed.
    runs = [base_dir / "base_checkpoints" / tag for tag in chaos.TAGS]
    for run in runs:
        run.mkdir(parents=True)
        (run / "left-over").write_text("")
    with pytest.raises(SystemExit) as exc:
        chaos.main(["--kills", "2", "--", "--num-iterations", "4"])
    # (a kill can land after the final checkpoint, before the process exits: 0 or 1 kill)
    assert re.fullmatch(r"chaos: FAILED: made [01] of 2 kills: the run finished too early: give it more steps "
                        r"\(-- --num-iterations N\) or save more often \(-- --save-every N\)", str(exc.value))
    expected = ["config.json", "metrics.jsonl", "step_000002", "step_000004"]  # no left-over
    assert [sorted(os.listdir(run)) for run in runs] == [expected, expected]


def test_extra_flags_replace_same_named_ones_and_keep_the_rest():
    merged = chaos.merge_flags(chaos.TINY, ["--depth", "4", "--num-iterations=100", "--fp8"])
    assert merged[:2] == ["--depth", "4"] and "--fp8" in merged
    assert merged[merged.index("--num-iterations") + 1] == "100" and merged.count("--num-iterations") == 1
    assert merged[merged.index("--max-seq-len") + 1] == "32" and merged[merged.index("--device-type") + 1] == "cpu"
    assert len(merged) == len(chaos.TINY) + 1


def test_compare_sees_optimizer_and_stream_differences(base_dir, monkeypatch):
    # two checkpoints that differ only in the optimizer state, then only in the data streams
    import torch
    from nanochat import checkpoint
    for tag, (opt, streams) in zip(chaos.TAGS, [({"m": torch.zeros(3)}, [{"cursor": [0, 0, 0, 5]}]),
                                                ({"m": torch.tensor([0., 0., 1e-30])}, [{"cursor": [0, 0, 0, 6]}])]):
        d = checkpoint.step_dir(checkpoint.get_run_dir(tag), 3)
        os.makedirs(d)
        torch.save({"w": torch.ones(2)}, os.path.join(d, "model.pt"))
        torch.save(opt, os.path.join(d, "optimizer.pt"))
        with open(os.path.join(d, "loaders.json"), "w") as f:
            f.write(__import__("json").dumps(streams))
    assert chaos.compare(3) == {"weights": True, "optimizer state": False, "data streams": False}


def test_killing_chaos_kills_its_base_train_child(base_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, "-m", "scripts.chaos", "--kills", "1", "--", "--num-iterations", "2000"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    run = base_dir / "base_checkpoints" / "chaos-reference"
    deadline = time.time() + 60
    while not (run.exists() and os.listdir(run)) and time.time() < deadline:  # the child is training
        time.sleep(0.2)
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert children, "no base_train child found"
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    time.sleep(1)
    alive = [pid for pid in children if os.path.exists(f"/proc/{pid}") and
             open(f"/proc/{pid}/stat").read().split()[2] != "Z"]
    for pid in alive:  # don't leave it training after a failure
        os.kill(int(pid), signal.SIGKILL)
    assert not alive, f"base_train child {alive} outlived chaos"
    assert proc.returncode == 143  # 128 + SIGTERM, as shells report a stop by signal
