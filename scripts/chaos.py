"""
Chaos test for preemption safety: kill training with SIGKILL at random moments, resume with
--resume, repeat; then check that the final weights equal those of an uninterrupted run
(bit for bit on CPU, where every step is deterministic).

    python -m scripts.chaos --kills 5                       # a tiny CPU model on the base dir's data
    python -m scripts.chaos --kills 3 -- --depth 4 --num-iterations 100 --save-every 5
"""
import argparse
import random
import signal
import subprocess
import sys
import time

import torch

from nanochat.checkpoint import get_run_dir, list_steps, load_weights

TINY = ["--depth", "1", "--head-dim", "16", "--max-seq-len", "32", "--device-batch-size", "4",
        "--total-batch-size", "128", "--num-iterations", "40", "--save-every", "2", "--eval-every", "-1",
        "--core-every", "-1", "--sample-every", "-1", "--device-type", "cpu"]


def train(args, tag, kill_after=None):
    """Run base_train to completion, or SIGKILL it after kill_after seconds. True if it finished."""
    proc = subprocess.Popen([sys.executable, "-m", "scripts.base_train", *args, "--model-tag", tag, "--resume"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)  # no handler, no cleanup: like a power cut or an OOM kill
        proc.wait()
        return False
    if proc.returncode != 0:
        raise RuntimeError(f"base_train failed (exit {proc.returncode}):\n{err[-2000:]}")
    return True


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ours, train_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--min-seconds", type=float, default=4.0, help="earliest kill after a start")
    parser.add_argument("--max-seconds", type=float, default=12.0, help="latest kill after a start")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(ours)
    train_args = train_args or TINY
    rng = random.Random(args.seed)

    t0 = time.time()
    train(train_args, "chaos-reference")
    print(f"reference run: {time.time() - t0:.0f}s")
    killed = 0
    while killed < args.kills:
        delay = rng.uniform(args.min_seconds, args.max_seconds)
        if train(train_args, "chaos", kill_after=delay):
            break  # it finished before the kill: nothing left to interrupt
        killed += 1
        steps = list_steps(get_run_dir("chaos"))
        print(f"kill {killed}: SIGKILL after {delay:.1f}s; newest complete checkpoint: step {steps[-1] if steps else '-'}")
    train(train_args, "chaos")

    last = list_steps(get_run_dir("chaos-reference"))[-1]
    a, b = (load_weights(get_run_dir(tag), last, "cpu") for tag in ("chaos-reference", "chaos"))
    equal = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    print(f"{killed} kills; final weights at step {last} {'EQUAL' if equal else 'DIFFER'} to the uninterrupted run")
    return equal, killed


if __name__ == "__main__":
    sys.exit(0 if main()[0] else 1)
