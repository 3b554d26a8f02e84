"""
Comparing runs, what a fork is judged by: final val bpb, CORE and training time side by side,
and, for groups of runs that repeat one configuration over seeds, whether a difference is real.

Identical runs that differ only in their seed spread: CORE by ~0.02 at the GPT-2 scale. A single
run per configuration cannot tell a gain from that noise; a few seeds per configuration can. Per
group: mean ± standard deviation; per metric against the baseline group (the first): the
difference with a 95% interval by Welch's t (two groups of unequal spread, t with the
Welch-Satterthwaite degrees of freedom), a verdict, and how many seeds per group would resolve
the difference observed at the spread observed.
"""
import fnmatch
import math
import os

import numpy as np
from matplotlib.figure import Figure

from nanochat.cli import Missing
from nanochat.common import get_base_dir
from nanochat.report import FLOPS, MINUTES, STEP, TOKENS, fmt, last_val, load_run, plot_curves, save_png

# Student's t at 97.5% (two-sided 95%) by degrees of freedom; past 30 the normal's 1.96 is close
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t975(df):
    """t's 97.5% quantile at (possibly fractional) degrees of freedom, interpolated in the table."""
    if df >= len(T975):
        return 2.042 - (2.042 - 1.960) * (1 - len(T975) / df)  # toward 1.96 as df grows
    lo = max(1, int(df))
    frac = df - lo
    return T975[lo - 1] + frac * (T975[min(lo, len(T975) - 1)] - T975[lo - 1])


def welch(base, other):
    """(difference of means other - base, half-width of its 95% interval) for two samples of 2 or
    more each, by Welch's t."""
    a, b = np.asarray(base, float), np.asarray(other, float)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return b.mean() - a.mean(), 0.0
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return b.mean() - a.mean(), t975(df) * se


def seeds_needed(base, other, limit=1000):
    """Seeds per group at which the 95% interval of the observed difference would exclude 0, at
    the groups' observed spread (None beyond `limit`; 0 if there is no spread to beat)."""
    diff = abs(np.mean(other) - np.mean(base))
    spread = math.sqrt((np.var(base, ddof=1) + np.var(other, ddof=1)) / 2)
    if spread == 0:
        return 0
    for n in range(2, limit + 1):
        if t975(2 * n - 2) * spread * math.sqrt(2 / n) < diff:
            return n
    return None


def verdict(metric, diff, half, lower_is_better):
    """One line: the difference, its interval, and whether it is a real gain, a real loss or noise."""
    better = diff < 0 if lower_is_better else diff > 0
    call = "within noise" if abs(diff) <= half else "a real gain" if better else "a real loss"
    return f"{metric} {diff:+.4f} ± {half:.4f} (95%, Welch's t): {call}"


# -----------------------------------------------------------------------------
# Which runs, and whether they compare

def resolve_groups(specs, root):
    """Each spec is a group: comma-separated run tags, or a glob over the runs under root (runs that
    --overwrite moved aside, <tag>.old-<time>, only by name)."""
    have = sorted(os.listdir(root)) if os.path.isdir(root) else []
    runs = [t for t in have if os.path.isdir(os.path.join(root, t)) and ".old-" not in t]
    groups = []
    for spec in specs:
        tags = fnmatch.filter(runs, spec) if any(c in spec for c in "*?[") else spec.split(",")
        for tag in tags or [spec]:
            if not os.path.isdir(os.path.join(root, tag)):
                raise Missing(f"no run {tag!r} under {root}: give the --model-tag of a training run "
                              f"(there: {', '.join(have) or 'none'})" if have
                              else f"no runs under {os.path.dirname(root)}: train one with python -m scripts.base_train")
        groups.append(tags)
    return groups


def comparability_warnings(runs):
    """Numbers of two runs mean the same only if they were measured the same way: same tokenizer
    (bpb is vocabulary-independent, but a retrained tokenizer changes the val bytes seen), same val
    data and val tokens, CORE over the same tasks and items under the same rules, the same horizon."""
    checks = [("tokenizer", lambda r: r["cfg"].get("tokenizer") or (r["cfg"].get("model_config") or {}).get("vocab_size")),
              ("val data", lambda r: r["cfg"].get("val_data")),
              ("CORE subset", lambda r: r["core"].get("core_label")),
              ("CORE rules", lambda r: r["core"].get("rules")),
              ("final val bpb tokens", lambda r: last_val(r).get("tokens_scored")),
              ("horizon (steps)", lambda r: r["cfg"].get("num_iterations"))]
    warnings = []
    for what, key in checks:
        values = {r["tag"]: key(r) for r in runs if key(r) is not None}
        if len(set(map(str, values.values()))) > 1:
            warnings.append(f"WARNING: not comparable: different {what}: "
                            + ", ".join(f"{tag}: {value}" for tag, value in values.items()))
    return warnings


# -----------------------------------------------------------------------------
# One run per group: the runs side by side

def compare_table(runs):
    """Final val bpb, CORE and training time of each run, and its difference from the first. A run
    that has not reached its horizon says so, and a CORE measured before a run's last step says when."""
    def row_values(r):
        return [last_val(r).get("val_bpb"), r["core"].get("core"), r["final"].get("elapsed")]
    base = row_values(runs[0])
    L = ["| run | val bpb | CORE | training time (s) | Δ val bpb | Δ CORE | Δ time |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        vals = row_values(r)
        deltas = [None if v is None or b is None else v - b for v, b in zip(vals, base)]
        steps = [rec["step"] for recs in r["metrics"].values() for rec in recs if isinstance(rec.get("step"), int)]
        last, horizon = max(steps, default=None), r["cfg"].get("num_iterations")
        tag = r["tag"] if r["final"].get("step") == horizon else \
            f"{r['tag']} (UNFINISHED: step {fmt(last)} of {fmt(horizon)})"
        core = "n/a" if vals[1] is None else f"{vals[1]:.4f} ({r['core'].get('core_label', 'CORE')}" + \
            (f", at step {r['core']['step']:,}" if r["core"].get("step") not in (None, last) else "") + ")"
        L.append(f"| {tag} | {fmt(vals[0], '.4f')} | {core} | {fmt(vals[2], ',.0f')} | "
                 f"{fmt(deltas[0], '+.4f')} | {fmt(deltas[1], '+.4f')} | {fmt(deltas[2], '+,.0f')} |")
    return L


# -----------------------------------------------------------------------------
# Several runs per group: means, spreads, and whether a difference is real

def metric_values(group):
    """{metric: [value per run]} of a group: val bpb, CORE and each CORE task's centered score."""
    values = {"val bpb": [last_val(r).get("val_bpb") for r in group], "CORE": [r["core"].get("core") for r in group]}
    for r in group:
        for task, t in (r["core"].get("tasks") or {}).items():
            values.setdefault(f"CORE {task}", []).append(t.get("centered") if isinstance(t, dict) else t)
    return {k: [x for x in v if x is not None] for k, v in values.items()}


def mean_std(v):
    return f"{np.mean(v):.4f} ± {np.std(v, ddof=1):.4f}" if len(v) > 1 else (f"{v[0]:.4f}" if v else "n/a")


def difference(base, other, metric):
    """(the difference with its interval and verdict, the seeds per group that would resolve it), or
    (why there is none, "")."""
    if len(base) < 2 or len(other) < 2:
        return f"{metric}: one run in a group: no noise estimate", ""
    if np.ptp(base) == np.ptp(other) == 0 and base[0] == other[0]:
        return f"{metric}: the same in every run", ""
    diff, half = welch(base, other)
    n = seeds_needed(base, other)
    return verdict(metric, diff, half, metric == "val bpb"), "more than 1000" if n is None else str(n)


def group_lines(labels, groups):
    """Per group mean ± std; per metric against the baseline: difference, interval, verdict, seeds;
    then the CORE tasks in one table."""
    values = [metric_values(g) for g in groups]
    L = ["| group | runs | val bpb | CORE |", "|---|---|---|---|"]
    L += [f"| {label} | {len(group)} | {mean_std(v['val bpb'])} | {mean_std(v['CORE'])} |"
          for label, group, v in zip(labels, groups, values)]
    tasks = [m for m in values[0] if m.startswith("CORE ")]
    for label, v in zip(labels[1:], values[1:]):
        L += ["", f"{label} against {labels[0]}:"]
        for metric in ("val bpb", "CORE"):
            line, seeds = difference(values[0][metric], v[metric], metric)
            L.append(f"- {line}" + (f"; seeds per group to resolve it at this spread: {seeds}" if seeds else ""))
        rows = [(t[5:], values[0][t], v.get(t, [])) for t in tasks]
        if rows:
            L += ["", f"| CORE task (centered) | {labels[0]} | {label} | difference |", "|---|---|---|---|"]
            L += [f"| {task} | {mean_std(b)} | {mean_std(o)} | {difference(b, o, '')[0].lstrip(': ')} |"
                  for task, b, o in rows]
    return L


def plot_groups(labels, groups, path):
    """val bpb against step: every run a thin line in its group's color, the group's mean a thick one."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for i, (label, group) in enumerate(zip(labels, groups)):
        color = f"C{i}"
        curves = [[(rec["step"], rec["val_bpb"]) for rec in r["metrics"].get("val", [])] for r in group]
        for curve in curves:
            ax.plot([s for s, _ in curve], [v for _, v in curve], color=color, lw=0.7, alpha=0.5)
        common = sorted(set.intersection(*(set(s for s, _ in c) for c in curves))) if curves else []
        means = [np.mean([dict(c)[s] for c in curves]) for s in common]
        ax.plot(common, means, color=color, lw=2.5, label=f"{label} (mean of {len(group)})")
    ax.set(xlabel="step", ylabel="val bpb", title="val bpb: each seed thin, each group's mean thick")
    ax.legend()
    ax.grid(alpha=0.3)
    save_png(fig, path)


def compare_runs(specs, base_dir=None):
    """Print (and return) the comparison of groups of runs (each spec: tags separated by commas, or
    a glob; the first group is the baseline); write the plot beside report.md."""
    base_dir = base_dir or get_base_dir()
    groups = [[load_run(base_dir, tag) for tag in tags]
              for tags in resolve_groups(specs, os.path.join(base_dir, "base_checkpoints"))]
    flat = [r for g in groups for r in g]
    name = "_vs_".join(s.replace(",", "+").replace("*", "x") for s in specs)
    path = os.path.join(base_dir, "report", f"compare_{name}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if all(len(g) == 1 for g in groups):
        plotted = plot_curves({r["tag"]: r["metrics"].get("val", []) for r in flat}, "val_bpb",
                              "val bpb: " + " vs ".join(specs), path, xaxes=(STEP, TOKENS, FLOPS, MINUTES))
        lines = compare_table(flat) + ["", "One run per group: no noise estimate is possible (compare groups of seeds: "
                                           "--compare base-s1,base-s2,base-s3 idea-s1,idea-s2,idea-s3)."]
    else:
        plot_groups(specs, groups, path)
        lines, plotted = group_lines(specs, groups), True
    lines += [""] + comparability_warnings(flat)
    lines += [f"plot: {path}" if plotted else "plot: none (no run has val bpb records)"]
    print("\n".join(lines))
    return lines
