"""
Chaos test for preemption safety: kill training with SIGKILL at random moments of its
checkpoint cycle, resume with --resume, repeat; then check that the final checkpoint equals
that of an uninterrupted run: weights, optimizer state and the data streams' state (bit for
bit on CPU, where every step is deterministic). Equal weights alone would also pass a resume
that ignored the checkpoints and started over, so every restart must also say it resumed from
the newest complete checkpoint and train on from the step after it. Exits non-zero if anything
differs or if it made fewer kills than asked. One chaos at a time per base dir.

    python -m scripts.chaos --kills 5                       # a tiny CPU model on the base dir's data
    python -m scripts.chaos --kills 3 -- --depth 4 --num-iterations 100 --save-every 5

Flags after `--` go to base_train, replacing the same-named flags of the tiny config and
keeping the rest. Each invocation starts from scratch: the runs `chaos` and `chaos-reference`
of the base dir are deleted first.
"""
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import torch

from nanochat.cli import ArgumentParser, check, run
from nanochat.common import die_with_parent
from nanochat.checkpoint import get_run_dir, list_steps, load_training_state, load_weights, own_run, step_dir

TINY = ["--depth", "1", "--head-dim", "16", "--max-seq-len", "32", "--device-batch-size", "4",
        "--total-batch-size", "128", "--num-iterations", "40", "--save-every", "2", "--eval-every", "0",
        "--core-every", "0", "--sample-every", "0", "--device-type", "cpu"]
TAGS = ("chaos-reference", "chaos")
TRAIN_CMD = [sys.executable, "-m", "scripts.base_train"]


def merge_flags(base, extra):
    """base with the flags of `extra` replacing same-named ones (`--flag value`, `--flag=value`
    or a bare `--switch`), the others kept in order."""
    def parse(args):
        flags, name = {}, None
        for a in args:
            if a.startswith("--"):
                name, _, value = a.partition("=")
                flags[name] = [value] if value else []
            elif name is None:
                raise SystemExit(f"error: base_train flags must start with a --flag, got {a!r}")
            else:
                flags[name].append(a)
        return flags
    merged = {**parse(base), **parse(extra)}
    return [tok for name, values in merged.items() for tok in (name, *values)]


def train(args, tag, rng=None):
    """(finished, what base_train printed): run it to completion (True), or, given rng, SIGKILL it
    at a random moment of its third checkpoint interval (False): a uniform fraction of the time
    between its first two new checkpoints after that second one. Every kill so lands in a run that
    is making progress, at any phase of the save cycle (mid-save included), however fast or slow
    the machine. The child runs in its own process group, killed however this function is left."""
    run_dir = get_run_dir(tag)
    cmd = [*TRAIN_CMD, *args, "--model-tag", tag, "--resume"]
    saves, kill_at = [], None  # times at which new checkpoints appeared
    with tempfile.TemporaryFile("w+") as err, tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True,
                                start_new_session=True, preexec_fn=die_with_parent)
        try:
            seen = list_steps(run_dir)[-1:]
            while proc.poll() is None:
                if rng is not None and kill_at is None and list_steps(run_dir)[-1:] != seen:
                    seen = list_steps(run_dir)[-1:]
                    saves.append(time.time())
                    if len(saves) == 2:
                        kill_at = saves[1] + rng.random() * (saves[1] - saves[0])
                if kill_at is not None and time.time() >= kill_at:
                    os.killpg(proc.pid, signal.SIGKILL)  # no handler, no cleanup: a power cut, an OOM kill
                    proc.wait()
                    break
                time.sleep(0.01)
        finally:
            if proc.poll() is None:  # left by an exception (Ctrl-C, SIGTERM): leave no orphan training
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        out.seek(0)
        if kill_at is not None and proc.returncode == -signal.SIGKILL:
            return False, out.read()
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"chaos: FAILED: {' '.join(cmd[1:])} exited with {proc.returncode}:\n{err.read()[-2000:]}")
        return True, out.read()


def check_resumed(output, newest):
    """A restart must continue from the newest complete checkpoint (newest: its step, None if there
    was none) and train on from the step after it. Equal final weights alone cannot show that: a
    deterministic run that ignored its checkpoints and started over would end the same."""
    started = re.search(r"^step (\d+)/", output, re.M)
    first = int(started.group(1)) if started else None
    said = f"resumed from {step_dir(get_run_dir('chaos'), newest)}" if newest is not None else "starting from scratch"
    # (a kill after the final checkpoint leaves no step to train: the restart only evaluates)
    if said not in output or first not in ((newest or 0) + 1, None):
        raise SystemExit(f"chaos: FAILED: after a kill with the newest complete checkpoint at step {newest}, the restart "
                         f"did not resume from it: it trained step {first} first"
                         + ("" if said in output else f" and never said \"{said}\""))


def tensors_equal(a, b):
    """Exact equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(tensors_equal(x, y) for x, y in zip(a, b))
    return a == b


def compare(step):
    """{what: equal?} for the two runs' checkpoints at `step`."""
    ref, run = (get_run_dir(tag) for tag in TAGS)
    (opt_a, streams_a), (opt_b, streams_b) = load_training_state(ref, step), load_training_state(run, step)
    return {"weights": tensors_equal(load_weights(ref, step, "cpu"), load_weights(run, step, "cpu")),
            "optimizer state": tensors_equal(opt_a, opt_b),
            "data streams": streams_a == streams_b}


def kill_and_resume(train_args, kills, rng):
    """The reference run, then the chaos run killed `kills` times and resumed after each kill (each
    restart checked to resume from the newest checkpoint), then finished. Returns the kills made."""
    for tag in TAGS:  # an earlier invocation's runs would make this one resume instead of test
        shutil.rmtree(get_run_dir(tag), ignore_errors=True)
    t0 = time.time()
    train(train_args, "chaos-reference")
    print(f"reference run: {time.time() - t0:.0f}s", flush=True)
    killed, finished, newest = 0, False, None
    while not finished:
        finished, output = train(train_args, "chaos", rng if killed < kills else None)
        if killed:
            check_resumed(output, newest)
        if not finished:
            killed += 1
            newest = (list_steps(get_run_dir("chaos")) or [None])[-1]
            print(f"kill {killed}: SIGKILL; newest complete checkpoint: step {newest if newest is not None else '-'}",
                  flush=True)
    return killed


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ours, extra = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = ArgumentParser("python -m scripts.chaos", __doc__)
    parser.add_argument("--kills", type=int, default=5, help="SIGKILLs to make (each needs ~3 checkpoints of progress)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    args = parser.parse_args(ours)
    check(parser, [(args.kills < 1, f"--kills {args.kills}: must be >= 1")])
    session = own_run(os.path.join(os.path.dirname(get_run_dir("chaos")), "chaos-session"))  # one chaos per base dir
    try:
        killed = kill_and_resume(merge_flags(TINY, extra), args.kills, random.Random(args.seed))
    finally:
        session.close()

    last = list_steps(get_run_dir("chaos-reference"))[-1]
    equal = compare(last)
    print(f"{killed} kills; at step {last}, "
          + ", ".join(f"{what} {'EQUAL' if ok else 'DIFFER'}" for what, ok in equal.items())
          + " to the uninterrupted run")
    if not all(equal.values()):
        raise SystemExit(f"chaos: FAILED: the resumed run's {', '.join(k for k, ok in equal.items() if not ok)} "
                         f"differ from the uninterrupted run's at step {last}")
    if killed < args.kills:
        raise SystemExit(f"chaos: FAILED: made {killed} of {args.kills} kills: the run finished too early: give "
                         f"it more steps (-- --num-iterations N) or save more often (-- --save-every N)")
    return {"kills": killed, "step": last, **equal}


if __name__ == "__main__":
    got = [signal.SIGINT]

    def stop(signum, frame):
        got[0] = signum
        raise KeyboardInterrupt  # so that train()'s finally kills the child's process group
    signal.signal(signal.SIGTERM, stop)
    try:
        sys.exit(run(main))
    except KeyboardInterrupt:
        raise SystemExit(128 + got[0]) from None  # 143 / 130, as shells report a stop by signal
