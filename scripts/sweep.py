"""
Does an idea scale? Run a grid of training runs over depth and compute, fit it, and compare two
sweeps (a baseline and an idea) by effective compute.

    python -m scripts.sweep --name base --flops 1e18 2.15e18 4.64e18 1e19 --depths 10 12 14 16 18 20  # isoFLOP
    python -m scripts.sweep --name base-mini --ratio 8 --depths 12 14 16 18 20 22 24 26              # miniseries
    python -m scripts.sweep --name base --flops 1e18 1e19 --depths 10 14 18 --dry-run                # plan only
    python -m scripts.sweep --compare base idea        # idea's compute multiplier over base's frontier

Every cell is an ordinary base_train run (under torchrun on all the GPUs there are), in
$NANOCHAT_BASE_DIR/sweeps/NAME/runs/<cell>, evaluated once at its end (val bpb over the final
token count, CORE), never in between. Flags after `--` go to every cell's base_train: the idea's
own flags (--matrix-lr 0.03), or a small toy (--head-dim 16 --max-seq-len 32 ...). The device batch
is base_train's auto unless given there.

Re-running the same command continues the sweep: finished cells are skipped, a killed cell resumes
from its checkpoint, a cell whose settings changed is refused. A failing cell (an out-of-memory,
say) is recorded with its reason, and the sweep goes on. Results go to results.csv / results.json,
the fits and plots to sweep.md and *.png, all beside the runs.
"""
import argparse
import json
import os
import signal
import subprocess
import sys

import torch

from nanochat import sweep
from nanochat.cli import ArgumentParser, BadInput, Missing, check, run
from nanochat.common import atomic_write, die_with_parent, get_base_dir
from nanochat.estimate import GPUS, time_and_cost
from nanochat.recipe import VOCAB_SIZE, add_flags, from_flags
from nanochat.report import git, read_json


def parse_args(argv):
    argv = sys.argv[1:] if argv is None else argv
    ours, extra = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = ArgumentParser("python -m scripts.sweep", __doc__)
    p.add_argument("--name", help="the sweep: everything goes under $NANOCHAT_BASE_DIR/sweeps/NAME/")
    grid = p.add_mutually_exclusive_group()
    grid.add_argument("--flops", type=float, nargs="+", metavar="C",
                      help="compute budgets: an isoFLOP grid (default: none; give this or --ratio)")
    grid.add_argument("--ratio", type=float,
                      help="tokens per (matrix + lm_head) parameter: a miniseries (default: none; or --flops)")
    p.add_argument("--depths", type=int, nargs="+", metavar="D", help="the model depths of every budget (default: none)")
    p.add_argument("--dry-run", action="store_true", help="print the cells and their estimated cost, run nothing")
    p.add_argument("--compare", nargs=2, metavar=("BASELINE", "IDEA"), help="compare two finished sweeps")
    p.add_argument("--params", choices=sweep.PARAMS, default="horizon",
                   help="the parameter count the fits use: horizon (block matrices + lm_head) or total")
    p.add_argument("--gpus", type=int, default=None,
                   help="GPUs to plan for (default: the ones here, each cell on all of them; 1 on a CPU machine)")
    p.add_argument("--gpu", type=str.lower, default="h100", choices=list(GPUS), help="GPU kind, for the cost estimate")
    p.add_argument("--gpu-hour-cost", type=float, default=3.0, help="dollars per GPU-hour")
    args = p.parse_args(ours)
    args.extra = extra
    check(p, [(not args.compare and not args.name, "give --name NAME (or --compare BASELINE IDEA)"),
              (args.name is not None and ("/" in args.name or args.name.startswith(".")),
               f"--name {args.name!r}: a plain directory name, not a path"),
              (not args.compare and not (args.flops or args.ratio), "give --flops C ... or --ratio R"),
              (not args.compare and not args.depths, "give --depths D ..."),
              (any(d < 1 for d in args.depths or []), "--depths: every depth must be >= 1"),
              (any(not c > 0 for c in args.flops or []), "--flops: every budget must be > 0"),
              (args.ratio is not None and not args.ratio > 0, f"--ratio {args.ratio}: must be > 0"),
              (args.gpus is not None and args.gpus < 1, f"--gpus {args.gpus}: must be >= 1")])
    return args


# -----------------------------------------------------------------------------
# The cells and what they will cost

def plan_cells(args, gpus):
    """Every cell: its id, run dir, base_train arguments and derived recipe (steps, tokens, FLOPs),
    derived by the same recipe base_train will use."""
    flags = argparse.ArgumentParser(add_help=False)
    add_flags(flags)
    shape, _ = flags.parse_known_args(args.extra)  # the extra flags that shape a run (--head-dim, --matrix-lr, ...)
    try:
        from nanochat.tokenizer import get_tokenizer
        vocab = get_tokenizer().vocab_size
    except Missing:  # planning before the tokenizer exists: the recipe's vocab
        vocab = VOCAB_SIZE
    kind, values = ("flops", args.flops) if args.flops else ("ratio", [args.ratio])
    cells = []
    for value in values:
        for depth in args.depths:
            horizon = {"target_flops": value} if kind == "flops" else {"target_param_data_ratio": value}
            cell_shape = argparse.Namespace(**{**vars(shape), "depth": depth, "num_iterations": None, **horizon})
            recipe = from_flags(cell_shape, vocab, gpus, 1 if shape.device_batch_size in (None, "auto") else None)
            cells.append({"id": sweep.cell_id(kind, value, depth), "kind": kind, "value": value, "depth": depth,
                          "recipe": recipe})
    return cells


def print_plan(args, cells, gpus):
    """The cells and the whole sweep's estimated GPU-hours and cost (scripts.plan's estimate)."""
    total_hours = total_cost = 0.0
    print(f"{'cell':<16} {'depth':>5} {'params':>10} {'steps':>7} {'tokens':>10} {'FLOPs':>10} {'est. hours':>10}")
    for c in cells:
        r = c["recipe"]
        flops = r.tokens * r.flops_per_token
        _, source, seconds, cost = time_and_cost(flops, gpus, args.gpu, c["depth"], "--fp8" in args.extra,
                                                 gpu_hour_cost=args.gpu_hour_cost)
        total_hours, total_cost = total_hours + seconds / 3600, total_cost + cost
        print(f"{c['id']:<16} {c['depth']:>5} {r.horizon_params:>10.3g} {r.num_iterations:>7,} {r.tokens:>10.3g} "
              f"{flops:>10.3g} {seconds / 3600:>10.2f}")
    print(f"{len(cells)} cells on {gpus} x {args.gpu}: about {total_hours:.1f} h, {total_hours * gpus:.1f} "
          f"GPU-hours, ${total_cost:,.0f} at ${args.gpu_hour_cost:.2f}/GPU-hour (MFU {source})")


# -----------------------------------------------------------------------------
# Running the cells

def cell_argv(cell, run_dir, extra):
    """base_train's flags for a cell: its depth and horizon, one evaluation at the end (a periodic
    one every `steps` steps is one at step 0, of a single batch, and one at the end), then the
    sweep's extra flags, which win."""
    steps = cell["recipe"].num_iterations
    horizon = ["--target-flops", f"{cell['value']:g}"] if cell["kind"] == "flops" else \
        ["--target-param-data-ratio", f"{cell['value']:g}"]
    batch = [] if any(a.startswith("--device-batch-size") for a in extra) else ["--device-batch-size", "auto"]
    return ["--depth", str(cell["depth"]), *horizon, *batch, "--eval-every", str(steps), "--bpb-tokens", "1",
            "--core-every", str(steps), "--sample-every", "0", "--run-dir", run_dir, *extra]


def prepare_cell(cell, run_dir, argv):
    """'skip' (finished), or 'run'. A cell that ran with other settings is refused: its results would
    not be this sweep's."""
    settings = read_json(os.path.join(run_dir, "cell.json"))
    if settings is not None and settings["argv"] != argv:
        changed = sorted(set(settings["argv"]) ^ set(argv))
        raise BadInput(f"cell {cell['id']} in {run_dir} ran with other settings (differing: {' '.join(changed)}): "
                       f"use another --name, or delete {run_dir} to run it again")
    if sweep.cell_result(cell, run_dir)["status"] == "done":
        return "skip"
    dirty = git("status", "--porcelain")
    record = {"argv": argv, "commit": git("rev-parse", "HEAD"), "dirty": None if dirty is None else bool(dirty),
              "status": "running"}
    os.makedirs(run_dir, exist_ok=True)
    with atomic_write(os.path.join(run_dir, "cell.json")) as tmp, open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    return "run"


def run_cell(cell, run_dir, argv, gpus):
    """Train one cell to its end (resuming it if it was killed); its log goes to run_dir/train.log.
    A failure is recorded in cell.json with its reason, not raised."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"] if gpus > 1 \
        else [sys.executable]
    with open(os.path.join(run_dir, "train.log"), "a") as log:
        proc = subprocess.Popen([*launch, "-m", "scripts.base_train", *argv, "--resume"], stdout=log,
                                stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        try:
            code = proc.wait()
        except BaseException:  # Ctrl-C or SIGTERM of the sweep: the cell stops too (and resumes next time)
            proc.send_signal(signal.SIGTERM)
            proc.wait()
            raise
    with open(os.path.join(run_dir, "train.log")) as f:
        lines = [line.strip() for line in f if line.strip()]
    settings = read_json(os.path.join(run_dir, "cell.json"))
    settings.update(status="done" if code == 0 else "failed", reason=None if code == 0 else
                    (lines[-1] if lines else f"exit status {code}")[:300])
    with atomic_write(os.path.join(run_dir, "cell.json")) as tmp, open(tmp, "w") as f:
        json.dump(settings, f, indent=1)
    return settings


def run_sweep(args, out_dir, cells, gpus):
    for cell in cells:
        run_dir = os.path.join(out_dir, "runs", cell["id"])
        argv = cell_argv(cell, run_dir, args.extra)
        if prepare_cell(cell, run_dir, argv) == "skip":
            print(f"{cell['id']}: done before, skipped", flush=True)
            continue
        print(f"{cell['id']}: training {cell['recipe'].num_iterations:,} steps (log: {run_dir}/train.log)", flush=True)
        settings = run_cell(cell, run_dir, argv, gpus)
        print(f"{cell['id']}: {settings['status']}" + (f": {settings['reason']}" if settings["reason"] else ""),
              flush=True)
    rows = [sweep.cell_result(cell, os.path.join(out_dir, "runs", cell["id"])) for cell in cells]
    sweep.write_results(out_dir, rows)
    print("\n".join(sweep.write_summary(out_dir, args.name, rows, args.params)))
    return rows


def compare(args, root):
    """--compare BASELINE IDEA: <root>/IDEA/vs_BASELINE.md and .png."""
    base, idea = args.compare
    rows = {}
    for name in (base, idea):
        rows[name] = read_json(os.path.join(root, name, "results.json"))
        if rows[name] is None:
            raise Missing(f"no results of sweep {name!r} in {os.path.join(root, name)}: run it first")
    try:
        result = sweep.compare(rows[base], rows[idea], args.params)
    except ValueError as e:
        raise BadInput(f"--compare {base} {idea}: {e}") from None
    path = os.path.join(root, idea, f"vs_{base}.md")
    print("\n".join(sweep.write_comparison(path, base, idea, result, sweep.comparability(rows[base], rows[idea]))))
    return result


def main(argv=None):
    args = parse_args(argv)
    root = os.path.join(get_base_dir(), "sweeps")
    if args.compare:
        return compare(args, root)
    gpus = torch.cuda.device_count()
    if args.gpus is not None and args.gpus != gpus and not args.dry_run:
        raise BadInput(f"--gpus {args.gpus}: this machine has {gpus}; --gpus only plans (--dry-run)")
    planned = args.gpus or gpus or 1
    cells = plan_cells(args, planned)
    print_plan(args, cells, planned)
    if args.dry_run:
        return cells
    return run_sweep(args, os.path.join(root, args.name), cells, gpus)


if __name__ == "__main__":
    sys.exit(run(main))
