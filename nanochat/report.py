"""
The run report: one markdown file that says what was run, on what, for how long, at what cost,
and how good the model is, with plots beside it.

    python -m nanochat.report [--model-tag d24] [--start-time EPOCH] [--gpu-hour-cost 3.0]

writes $NANOCHAT_BASE_DIR/report.md and $NANOCHAT_BASE_DIR/report/*.png. Every input is optional:
a stage whose output file is missing is reported as "not run", so the report can be written
after any stage, or after a crash, to see how far a run got.
"""
import datetime
import json
import os
import platform
import subprocess
import time

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from nanochat.checkpoint import newest_model_tag
from nanochat.common import atomic_write, get_base_dir
from nanochat.core_eval import RULES

# Aggregate CORE of the original GPT-2 models (all 22 tasks), the numbers a run is measured against.
GPT2_CORE = [("GPT-2 124M", 0.1139), ("GPT-2 355M", 0.1849), ("GPT-2 774M", 0.2146), ("GPT-2 1.5B", 0.2565)]
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_json(path):
    """The parsed file, or None if it is missing or unreadable (a stage that did not run)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_metrics(path):
    """Records of metrics.jsonl grouped by type. A run killed mid-write can leave a torn last line: skip it."""
    groups = {}
    if not os.path.exists(path):
        return groups
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                groups.setdefault(rec.get("type"), []).append(rec)
    return groups


def git(*args):
    """Output of a git command in the repo, or None (no git installed, not a checkout)."""
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def ram_gb():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):  # not POSIX
        return None


def fmt(x, spec=",", missing="n/a"):
    """x formatted (numbers with spec), or `missing`: the report never prints a bare None."""
    if x is None:
        return missing
    return format(x, spec) if isinstance(x, (int, float)) else str(x)


def save_png(fig, path):
    """Agg canvas directly (no pyplot, no global backend switch), written atomically like report.md."""
    FigureCanvasAgg(fig)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")


# x axes of a curve: (record key, axis label, divisor)
STEP, MINUTES, FLOPS, TOKENS = ("step", "step", 1), ("elapsed", "training time (min)", 60), ("flops", "FLOPs", 1), \
    ("tokens", "tokens", 1)


def plot_curves(series, key, title, path, xaxes=(STEP, MINUTES, FLOPS)):
    """One figure, one view of the same curves per x axis. series: label -> records; more than one
    series (--compare) get a legend. False, and nothing written, if no record has `key`."""
    series = {label: [r for r in recs if r.get(key) is not None] for label, recs in series.items()}
    if not any(series.values()):
        return False
    fig = Figure(figsize=(5 * len(xaxes), 4))
    axes = fig.subplots(1, len(xaxes))
    for ax, (xkey, xlabel, scale) in zip(axes, xaxes):
        for label, recs in series.items():
            pts = [(r[xkey] / scale, r[key]) for r in recs if r.get(xkey) is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None, label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    if len(series) > 1:
        axes[0].legend()
    fig.suptitle(title)
    save_png(fig, path)
    return True


def plot_core_tasks(centered, path, label):
    names = sorted(centered, key=centered.get)
    fig = Figure(figsize=(8, 0.3 * len(names) + 1.5))
    ax = fig.subplots()
    ax.barh(names, [centered[n] for n in names])
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("centered score (0 = random guessing, 1 = perfect)")
    ax.set_title(f"{label}, per task")  # the label says when it is a subset of tasks or items
    save_png(fig, path)


def read_stage_times(base_dir):
    """speedrun.sh appends "<stage>\t<epoch seconds>" to speedrun_stages.tsv as each stage starts
    ("start" begins an invocation, "end" closes it). Returns (first start, [(stage, seconds)],
    with the time from "start" to the first stage called "setup"):
    the time of the stages that actually ran, summed over re-runs, so re-running a finished
    speedrun (every stage skipped in seconds) does not reset or inflate the wall time."""
    try:
        with open(os.path.join(base_dir, "speedrun_stages.tsv")) as f:
            marks = [(name, float(t)) for name, t in (line.rstrip("\n").split("\t") for line in f if "\t" in line)]
    except (OSError, ValueError):
        return None, []
    stages = {}
    for (name, t0), (_, t1) in zip(marks, marks[1:]):
        if name != "end":  # the gap from an invocation's end to the next one's start is not ours
            stages[name] = stages.get(name, 0.0) + (t1 - t0)
    first = next((t for name, t in marks if name == "start"), None)
    return first, [("setup" if name == "start" else name, sec) for name, sec in stages.items()]


def run_status(cfg, final, steps):
    """'complete', or why not: a run stopped before its horizon must not read as finished."""
    if not cfg:
        return None
    horizon = cfg.get("num_iterations")
    if final and final.get("step") == horizon:
        return "complete"
    reached = max(steps) if steps else 0
    return (f"INCOMPLETE: training stopped at step {reached:,} of {fmt(horizon)}; the numbers below are "
            "those of a partly trained model. Re-run the same command (or speedrun.sh) to resume.")


def header_section(ctx, start_time, gpu_hour_cost):
    cfg, final, base_dir = ctx["cfg"], ctx["final"], ctx["base_dir"]
    first, stages = read_stage_times(base_dir)
    if stages:
        wall, how = sum(sec for _, sec in stages), "stages that ran, summed over re-runs"
        start_time = start_time if start_time is not None else first
    else:  # no stage log (not run by speedrun.sh): from the given start until now
        wall, how = (time.time() - start_time if start_time is not None else None), "since the start"
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n_gpus == 0:
        cost = "CPU run: no GPU cost"
    elif wall is None:
        cost = "unknown (no start time: pass --start-time or run speedrun.sh)"
    else:
        cost = f"${wall / 3600 * n_gpus * gpu_hour_cost:,.2f} ({wall / 3600:.2f} h x {n_gpus} GPUs x ${gpu_hour_cost}/GPU-hour)"
    status = run_status(cfg, final, ctx["steps"])
    L = ["# nanochat report", ""]
    if status and status != "complete":
        L += [f"**{status}**", ""]
    command = cfg.get("command") or ("python -m scripts.base_train " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in cfg.get("args", {}).items()
        if v is not None and v is not False) if cfg else None)
    train_s = final.get("elapsed")
    L += [f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M:%S')}",
          f"- run: {ctx['tag'] or 'not run (no base_checkpoints/)'}" + (f" ({status})" if status == "complete" else ""),
          f"- training command: `{command}`" if command else "- training command: not run",
          "- started: " + (datetime.datetime.fromtimestamp(start_time).strftime("%Y-%m-%d %H:%M:%S")
                           if start_time is not None else "unknown"),
          f"- total wall time: {f'{wall / 3600:.2f} h ({how})' if wall is not None else 'unknown'}",
          f"- training time: {f'{train_s / 3600:.2f} h' if train_s is not None else 'not run'} "
          "(optimizer steps only, the leaderboard's figure; evaluation and the first 10 steps' compilation excluded)",
          f"- estimated cost: {cost}"]
    if stages:
        L += ["- stages: " + ", ".join(f"{name} {sec / 60:.1f} min" for name, sec in stages)]
    return L + [""]


def system_section():
    # enough to reproduce or explain a throughput number
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpu = f"{n_gpus} x {torch.cuda.get_device_name(0)}" if n_gpus else "none (CPU)"
    commit, branch, status = git("rev-parse", "--short", "HEAD"), git("rev-parse", "--abbrev-ref", "HEAD"), git("status", "--porcelain")
    return ["## System", "",
            f"- python {platform.python_version()}, torch {torch.__version__}, {platform.platform()}",
            f"- GPU: {gpu}",
            f"- CPU cores: {os.cpu_count()}, RAM: {fmt(ram_gb(), '.1f')} GB",
            f"- git: {commit or 'unknown'} on {branch or 'unknown'}"
            + ("" if status is None else " (dirty: uncommitted changes)" if status else " (clean)"), ""]


def tokenizer_section(base_dir):
    tok_train = read_json(os.path.join(base_dir, "tokenizer", "tok_train.json"))
    tok_eval = read_json(os.path.join(base_dir, "tokenizer", "tok_eval.json"))
    L = ["## Tokenizer", ""]
    if tok_train:
        L += [f"- vocab size {fmt(tok_train.get('vocab_size'))}, trained in {fmt(tok_train.get('train_time'), '.1f')} s "
              f"on {fmt(tok_train.get('chars'))} chars (documents capped at {fmt(tok_train.get('doc_cap'))} chars)"]
    else:
        L += ["- training: not run"]
    if tok_eval:
        nbytes = tok_eval.get("bytes", {})
        L += ["", "| tokenizer | vocab | bytes/token train | bytes/token val |", "|---|---|---|---|"]
        for name, toks in tok_eval.get("tokens", {}).items():  # higher bytes/token = better compression
            ratio = [nbytes[s] / toks[s] if toks.get(s) and nbytes.get(s) else None for s in ("train", "val")]
            L += [f"| {name} | {fmt(tok_eval.get('vocab', {}).get(name))} | {fmt(ratio[0], '.2f')} | {fmt(ratio[1], '.2f')} |"]
    else:
        L += ["- evaluation: not run"]
    return L + [""]


def training_section(cfg, metrics, final):
    L = ["## Training", ""]
    if cfg:
        mc, np_, args = cfg.get("model_config", {}), cfg.get("num_params", {}), cfg.get("args", {})
        tokens = final.get("total_tokens") or (cfg.get("total_batch_size") or 0) * (cfg.get("num_iterations") or 0)
        # the horizon's tokens:params counts the matrices and the lm_head (embeddings are lookups)
        scaling = (np_.get("transformer_matrices") or 0) + (np_.get("lm_head") or 0)
        L += [f"- depth {mc.get('n_layer')}, width {mc.get('n_embd')}, {mc.get('n_head')} heads, seq len {mc.get('sequence_len')}, "
              f"vocab {fmt(mc.get('vocab_size'))}, windows {mc.get('window_pattern')}",
              "- params: " + ", ".join(f"{k} {fmt(v)}" for k, v in np_.items()),
              f"- FLOPs/token {fmt(cfg.get('flops_per_token'), '.3e')}, batch {fmt(cfg.get('total_batch_size'))} tokens, "
              f"{fmt(cfg.get('num_iterations'))} iterations, {fmt(tokens)} tokens, "
              f"tokens:params {fmt(tokens / scaling if scaling else None, '.2f')}",
              f"- {fmt(cfg.get('world_size'))} x {fmt(cfg.get('device_name'))}, dtype {fmt(cfg.get('dtype'))}, "
              f"fp8 {'on' if args.get('fp8') else 'off'}, attention {fmt(cfg.get('attention_backend'))}, "
              "seed " + (str(args["seed"]) if args.get("seed") is not None else "the record's (init 42, file order)"),
              "- flags (the rest left to the recipe): `"
              + " ".join(f"--{k.replace('_', '-')}={v}" for k, v in args.items() if v is not None) + "`"]
    else:
        L += ["- config: not run (no config.json)"]
    train = metrics.get("train", [])
    if train:
        steady = train[len(train) // 10:] or train  # the first steps include compilation
        tps = sum(r.get("tok_per_sec") or 0 for r in steady) / len(steady)
        mfus = [r["mfu"] for r in steady if r.get("mfu") is not None]
        L += [f"- last train loss (smoothed) {fmt(train[-1].get('loss'), '.4f')} at step {fmt(train[-1].get('step'))}; "
              f"{tps:,.0f} tok/s, MFU " + (f"{100 * sum(mfus) / len(mfus):.1f} %" if mfus else "n/a")]
    if final:
        L += [f"- training time {fmt(final.get('elapsed'), ',.0f')} s, {fmt(final.get('total_flops'), '.3e')} FLOPs"]
    if not train and not final:
        L += ["- training metrics: not run"]
    return L + [""]


def last_val(run):
    """The record with a run's last val bpb: the final one, else the newest val record ({} if none)."""
    if run["final"].get("val_bpb") is not None:
        return run["final"]
    return (run["metrics"].get("val") or [{}])[-1]


def bpb_lines(run):
    """The two val bpb figures: measured during training, and by base_eval on the final checkpoint.
    They differ in how many tokens were scored, so both say it."""
    val, ev = last_val(run), run["ev"]
    args = run["cfg"].get("args") or {}
    train_tokens = args.get("final_bpb_tokens") if val is run["final"] else args.get("bpb_tokens")
    L = [f"- val bpb during training: {fmt(val.get('val_bpb'), '.4f', 'not run')}"
         + (f" at step {val['step']:,}" if val.get("step") is not None and val.get("val_bpb") is not None else "")
         + (f", over {fmt(val.get('tokens_scored') or train_tokens)} tokens" if val.get("val_bpb") is not None else "")]
    bpb = ev.get("bpb") or {}
    if bpb:
        counts = ev.get("bpb_tokens") or {}
        L += [f"- val bpb by base_eval (step {fmt(ev.get('step'))}): "
              + ", ".join(f"{split} {fmt(bpb.get(split), '.4f')}" + (f" over {counts[split]:,} tokens" if counts.get(split) else "")
                          for split in ("train", "val") if split in bpb)]
    return L


def core_lines(ctx, plot_dir):
    ev, src, tag = ctx["ev"], ctx["core"], ctx["tag"]
    if not src:
        return ["- CORE: not run"]
    core, label = src["core"], src.get("core_label", "CORE")
    where = f"base_eval at step {fmt(ev.get('step'))}" if src is ev else f"during training, step {fmt(src.get('step'))}"
    rows = sorted(GPT2_CORE + [(f"**ours ({tag}), {label}**", core)], key=lambda r: r[1])  # ours in rank order
    L = [f"- CORE from {where}", "", "| model | CORE |", "|---|---|"] + [f"| {n} | {s:.4f} |" for n, s in rows]
    beaten = [name for name, score in GPT2_CORE if core > score]
    L += ["", f"Our {label} = {core:.4f}: " + (f"beats {beaten[-1]} ({dict(GPT2_CORE)[beaten[-1]]:.4f})"
                                               if beaten else "below GPT-2 124M (0.1139)") + "."]
    # which rules and which items: two CORE scores compare only if both match
    items = "all items of each task" if "max_per_task" in src else "not recorded"
    if src.get("max_per_task") is not None:
        items = (f"the first {src['max_per_task']} of each task's fixed shuffle, not comparable with a full score")
    L += [f"CORE rules: {src.get('rules') or 'not recorded'}; items: {items}."]
    if src.get("rules") != RULES:
        L += [f"These are not the rules GPT-2's scores were measured with ({RULES}): the GPT-2 rows do not compare."]
    if ev and (ev.get("n_tasks") or 22) < (ev.get("n_total") or 22):
        L += [f"Only {ev['n_tasks']} of {ev['n_total']} tasks were scored; the GPT-2 numbers are over all 22, "
              "so the comparison is approximate."]
    tasks = src.get("tasks", {})  # base_eval: dicts of scores; a training core record: centered only
    L += ["", "| task | accuracy | centered | random baseline | items |", "|---|---|---|---|---|"]
    for name, t in tasks.items():
        t = t if isinstance(t, dict) else {"centered": t}
        L += [f"| {name} | {fmt(t.get('accuracy'), '.4f')} | {fmt(t.get('centered'), '.4f')} | "
              f"{fmt(t.get('random_baseline'), '.1f')} | {fmt(t.get('n_items'))} |"]
    if ev and ev.get("skipped"):  # base_eval records why (missing, corrupt) per task
        why = ev.get("skipped_why") or {}
        L += ["", "Skipped: " + "; ".join(f"{name}: {why.get(name, 'data missing')}" for name in ev["skipped"])]
    centered = {n: (t.get("centered") if isinstance(t, dict) else t) for n, t in tasks.items()}
    centered = {n: c for n, c in centered.items() if isinstance(c, (int, float))}  # a task that errored has none
    if centered:
        plot_core_tasks(centered, os.path.join(plot_dir, "core_tasks.png"), label)
        L += ["", f"![{label} per task](report/core_tasks.png)"]
    core_recs = ctx["core_history"]
    if core_recs:
        L += ["", "CORE during training: " + ", ".join(f"step {r['step']}: {r['core']:.4f}" for r in core_recs)]
    return L


def samples_and_plots(ctx, plot_dir):
    ev, metrics = ctx["ev"], ctx["metrics"]
    L = ["## Samples", ""]
    samples = ev.get("samples") or ((metrics.get("sample") or [{}])[-1]).get("samples")
    for s in samples or []:
        L += ["````text", s, "````", ""]
    if not samples:
        L += ["not run", ""]
    L += ["## Plots", ""]
    for recs, key, name, title in [(metrics.get("train", []), "loss", "train_loss",
                                    "train loss (smoothed: a debiased moving average over ~10 steps)"),
                                   (metrics.get("val", []), "val_bpb", "val_bpb", "validation bpb")]:
        if plot_curves({ctx["tag"]: recs}, key, title, os.path.join(plot_dir, name + ".png")):
            L += [f"![{title}](report/{name}.png)", ""]
        else:
            L += [f"- {title.split(' (')[0]}: not run", ""]
    return L


def load_run(base_dir, tag):
    """One run's config, metrics, evaluation and final record ({} where missing: a stage not run)."""
    run_dir = os.path.join(base_dir, "base_checkpoints", tag)
    metrics = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    ev = read_json(os.path.join(run_dir, "base_eval.json")) or {}
    # CORE: base_eval's if it ran, else the last one measured during training
    core_recs = [r for r in metrics.get("core", []) if isinstance(r.get("core"), (int, float))]
    core = ev if ev.get("core") is not None else (core_recs[-1] if core_recs else {})
    return dict(tag=tag, cfg=read_json(os.path.join(run_dir, "config.json")) or {}, metrics=metrics, ev=ev,
                core=core, core_history=core_recs, final=(metrics.get("final") or [{}])[-1])


def write_report(base_dir=None, model_tag=None, start_time=None, gpu_hour_cost=3.0):
    base_dir = base_dir or get_base_dir()
    plot_dir = os.path.join(base_dir, "report")
    os.makedirs(plot_dir, exist_ok=True)
    tag = model_tag or newest_model_tag(base_dir)
    ctx = load_run(base_dir, tag) if tag else dict(tag=None, cfg={}, metrics={}, ev={}, core={}, core_history=[],
                                                            final={})
    metrics = ctx["metrics"]
    ctx.update(base_dir=base_dir,
               steps=[r["step"] for recs in metrics.values() for r in recs if isinstance(r.get("step"), int)])
    L = header_section(ctx, start_time, gpu_hour_cost) + system_section() + tokenizer_section(base_dir)
    L += training_section(ctx["cfg"], metrics, ctx["final"])
    L += ["## Results", ""] + bpb_lines(ctx) + core_lines(ctx, plot_dir) + [""]
    L += samples_and_plots(ctx, plot_dir)
    path = os.path.join(base_dir, "report.md")
    with atomic_write(path) as tmp, open(tmp, "w") as f:
        f.write("\n".join(L))
    return path
