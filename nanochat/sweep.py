"""
Sweeps: does an idea's gain hold, grow or shrink as compute grows? A sweep is a grid of ordinary
training runs ("cells", run by scripts/sweep.py), and this module reads and fits them, the
Chinchilla way (Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models"):

  isoFLOP grid  several depths at each of several compute budgets C. At a fixed budget, val bpb
                against log(params) is close to a parabola; its minimum is the budget's
                compute-optimal model size N* (and token count D*). Across budgets, power laws
                N* ∝ C^a and D* ∝ C^b give the compute-optimal tokens per parameter.
  miniseries    several depths at one tokens-per-parameter ratio: val bpb and CORE against FLOPs.

Two sweeps (two versions of the code) compare by effective compute: for each point of the idea's
frontier (val bpb against FLOPs), the compute at which the baseline's frontier reaches the same
val bpb. Their ratio is the idea's compute multiplier (above 1: a gain worth that much compute),
and its trend with compute says whether the gain grows or shrinks at scale.

Both parameter conventions are kept, so either can be fitted: "horizon" (the block matrices and
lm_head, what the recipe scales the horizon by) and "total".
"""
import csv
import json
import math
import os

import numpy as np
from matplotlib.figure import Figure

from nanochat.common import atomic_write
from nanochat.report import read_json, read_metrics, save_png

PARAMS = ("horizon", "total")  # the parameter conventions a fit can use


def cell_id(kind, value, depth):
    """The name of a cell: `f1e+18-d12` (a FLOPs budget) or `r8-d12` (a tokens-per-param ratio)."""
    return f"{'f' if kind == 'flops' else 'r'}{value:g}-d{depth}"


# -----------------------------------------------------------------------------
# Results: from each cell's run dir, not from its log

def cell_result(cell, run_dir):
    """One row of results.csv: what the cell was (depth, width, parameters by group, steps, tokens,
    FLOPs), what it measured (final val bpb and its token count, CORE with its rules and items) and
    how it ran (training time, commit, status)."""
    cfg = read_json(os.path.join(run_dir, "config.json")) or {}
    metrics = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    final = (metrics.get("final") or [{}])[-1]
    core = next((r for r in reversed(metrics.get("core", [])) if r.get("step") == final.get("step")), {})
    settings = read_json(os.path.join(run_dir, "cell.json")) or {}
    counts = cfg.get("num_params") or {}
    finished = bool(final) and final.get("step") == cfg.get("num_iterations")
    return {
        "cell": cell["id"], "kind": cell["kind"], "budget": cell["value"], "depth": cell["depth"],
        "width": (cfg.get("model_config") or {}).get("n_embd"),
        "params_horizon": cfg.get("horizon_params"), "params_total": counts.get("total"),
        **{f"params_{group}": n for group, n in counts.items() if group != "total"},
        "steps": cfg.get("num_iterations"), "tokens": cfg.get("tokens"),
        "flops": (cfg.get("tokens") or 0) * (cfg.get("flops_per_token") or 0) or None,
        "val_bpb": final.get("val_bpb"), "val_tokens": final.get("tokens_scored"),
        "core": core.get("core"), "core_rules": core.get("rules"), "core_items_per_task": core.get("max_per_task"),
        "training_seconds": final.get("elapsed"), "commit": settings.get("commit"), "dirty": settings.get("dirty"),
        "status": "done" if finished else settings.get("status", "not run"), "reason": settings.get("reason"),
        "val_data": cfg.get("val_data"), "tokenizer": cfg.get("tokenizer"),
    }


def write_results(out_dir, rows):
    """results.json (the rows as they are) and results.csv (one column per field of any row)."""
    os.makedirs(out_dir, exist_ok=True)
    with atomic_write(os.path.join(out_dir, "results.json")) as tmp, open(tmp, "w") as f:
        json.dump(rows, f, indent=1)
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with atomic_write(os.path.join(out_dir, "results.csv")) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(rows)


def done(rows):
    return [r for r in rows if r["status"] == "done" and r["val_bpb"] is not None]


# -----------------------------------------------------------------------------
# Fits

def parabola_minimum(x, y):
    """(x at the minimum of the least-squares parabola through the points, its y), or None when
    the points do not curve upward (fewer than 3, or a maximum)."""
    if len(set(x)) < 3:
        return None
    a, b, c = np.polyfit(x, y, 2)
    if a <= 0:
        return None
    x0 = -b / (2 * a)
    return x0, c - b * b / (4 * a)


def power_law(x, y):
    """(exponent, coefficient) of y = coefficient · x^exponent, least squares in log-log."""
    slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
    return float(slope), float(math.exp(intercept))


def isoflop_optima(rows, params="horizon"):
    """Per budget: the compute-optimal size N* (minimum of the parabola of val bpb against
    log(params)), its tokens D* (the cells' log-tokens against log-params, a straight line at a
    fixed budget, read at N*), the bpb there, and a warning when N* lies outside the depths sampled."""
    optima = []
    for budget in sorted({r["budget"] for r in rows}):
        cells = sorted((r for r in rows if r["budget"] == budget), key=lambda r: r[f"params_{params}"])
        logn = [math.log(r[f"params_{params}"]) for r in cells]
        found = parabola_minimum(logn, [r["val_bpb"] for r in cells])
        if found is None:
            optima.append({"budget": budget, "warning": f"no minimum at {budget:g} FLOPs: val bpb does not curve up "
                                                        "over the depths sampled (the optimum lies outside them, or "
                                                        "fewer than 3 depths)"})
            continue
        slope, intercept = np.polyfit(logn, [math.log(r["tokens"]) for r in cells], 1)
        n_star, bpb = math.exp(found[0]), found[1]
        outside = not logn[0] <= found[0] <= logn[-1]
        optima.append({"budget": budget, "params": n_star, "tokens": math.exp(intercept + slope * found[0]),
                       "val_bpb": bpb, "warning": f"the optimum at {budget:g} FLOPs lies outside the depths sampled: "
                                                  "extrapolated" if outside else None})
    return optima


def scaling(optima):
    """N* ∝ C^a, D* ∝ C^b across budgets, and the compute-optimal tokens per parameter (its
    spread over the budgets). None with fewer than 2 budgets that have an optimum."""
    found = [o for o in optima if "params" in o]
    if len(found) < 2:
        return None
    C = [o["budget"] for o in found]
    ratios = [o["tokens"] / o["params"] for o in found]
    return {"params_exponent": power_law(C, [o["params"] for o in found])[0],
            "tokens_exponent": power_law(C, [o["tokens"] for o in found])[0],
            "ratio_mean": float(np.mean(ratios)), "ratio_min": min(ratios), "ratio_max": max(ratios)}


def frontier(rows, params="horizon"):
    """(FLOPs, val bpb) points, FLOPs increasing: a miniseries' cells, or the best an isoFLOP
    grid's budgets can do: the fitted optimum where it lies among the depths sampled, else the
    best cell measured."""
    if not rows or rows[0]["kind"] != "flops":
        return sorted((r["flops"], r["val_bpb"]) for r in rows)
    best = {}
    for o in isoflop_optima(rows, params):
        measured = min(r["val_bpb"] for r in rows if r["budget"] == o["budget"])
        best[o["budget"]] = o["val_bpb"] if "params" in o and not o["warning"] else measured
    return sorted(best.items())


def compute_to_reach(points, bpb):
    """The FLOPs at which a frontier (FLOPs increasing, bpb falling) reaches `bpb`: linear in
    log(FLOPs) between its points, and along its end segments beyond them."""
    logc = [math.log(c) for c, _ in points]
    b = [y for _, y in points]
    i = next((k for k in range(1, len(b) - 1) if b[k] <= bpb), len(b) - 1)  # the segment [i-1, i] around bpb
    t = (bpb - b[i - 1]) / (b[i] - b[i - 1]) if b[i] != b[i - 1] else 0.0
    return math.exp(logc[i - 1] + t * (logc[i] - logc[i - 1]))


def compare(base_rows, idea_rows, params="horizon"):
    """The idea's compute multiplier at each point of its frontier, and its trend: the exponent k
    of multiplier ∝ C^k (above 0: the gain grows with compute)."""
    base, idea = frontier(done(base_rows), params), frontier(done(idea_rows), params)
    if len(base) < 2 or not idea:
        raise ValueError("comparing needs a baseline frontier of 2 or more points and an idea with 1 or more")
    points = [{"flops": c, "val_bpb": bpb, "baseline_flops": compute_to_reach(base, bpb)} for c, bpb in idea]
    for p in points:
        p["multiplier"] = p["baseline_flops"] / p["flops"]
        p["extrapolated"] = not base[0][1] >= p["val_bpb"] >= base[-1][1]
    trend = power_law([p["flops"] for p in points], [p["multiplier"] for p in points])[0] if len(points) > 1 else None
    return {"points": points, "trend_exponent": trend}


def trend_line(result):
    k = result["trend_exponent"]
    if k is None:
        return "one point: no trend (add budgets or depths)"
    verdict = "grows with compute" if k > 0.02 else "shrinks with compute" if k < -0.02 else "holds roughly constant"
    return f"the compute multiplier {verdict} (multiplier ∝ C^{k:+.3f} over these budgets)"


def comparability(base_rows, idea_rows):
    """Warnings where the two sweeps were not measured alike, or do not overlap in compute."""
    warnings = []
    for what, key in (("val data", "val_data"), ("tokenizer", "tokenizer"), ("CORE rules", "core_rules"),
                      ("val tokens", "val_tokens")):
        a, b = {r[key] for r in done(base_rows)}, {r[key] for r in done(idea_rows)}
        if a != b:
            warnings.append(f"not comparable: different {what} ({', '.join(map(str, a))} vs {', '.join(map(str, b))})")
    span = lambda rows: (min(r["flops"] for r in rows), max(r["flops"] for r in rows))  # noqa: E731
    (lo, hi), (ilo, ihi) = span(done(base_rows)), span(done(idea_rows))
    if ihi < lo or ilo > hi:
        warnings.append(f"the budgets do not overlap ({lo:.3g}..{hi:.3g} vs {ilo:.3g}..{ihi:.3g} FLOPs): the "
                        "multipliers are extrapolated")
    return warnings


# -----------------------------------------------------------------------------
# sweep.md and plots

def md_table(header, rows):
    return [f"| {' | '.join(header)} |", "|" + "---|" * len(header)] + [f"| {' | '.join(map(str, r))} |" for r in rows]


def num(x, spec=".4g"):
    return "n/a" if x is None else format(x, spec)


def write_summary(out_dir, name, rows, params="horizon"):
    """sweep.md (the cells, the fits) and the plots, in out_dir. Returns the markdown lines."""
    L = [f"# Sweep {name}", "", f"{len(done(rows))} of {len(rows)} cells done; parameters: {params} "
         f"({'block matrices + lm_head' if params == 'horizon' else 'all'}).", ""]
    L += md_table(["cell", "depth", "params", "steps", "tokens", "FLOPs", "val bpb (tokens)", "CORE", "status"],
                  [[r["cell"], r["depth"], num(r[f"params_{params}"], ".3g"), r["steps"], num(r["tokens"], ".3g"),
                    num(r["flops"], ".3g"), f"{num(r['val_bpb'])} ({num(r['val_tokens'], ',')})", num(r["core"]),
                    r["status"] + (f": {r['reason']}" if r.get("reason") else "")] for r in rows])
    good = done(rows)
    if good and good[0]["kind"] == "flops":
        L += isoflop_section(out_dir, good, params)
    elif good:
        L += miniseries_section(out_dir, good, params)
    with atomic_write(os.path.join(out_dir, "sweep.md")) as tmp, open(tmp, "w") as f:
        f.write("\n".join(L) + "\n")
    return L


def isoflop_section(out_dir, rows, params):
    optima, fit = isoflop_optima(rows, params), None
    L = ["", "## Compute-optimal size per budget", ""]
    L += md_table(["budget (FLOPs)", "N*", "D*", "D*/N*", "val bpb at N*"],
                  [[f"{o['budget']:.3g}", num(o.get("params"), ".3g"), num(o.get("tokens"), ".3g"),
                    num(o["tokens"] / o["params"] if "params" in o else None, ".1f"), num(o.get("val_bpb"))]
                   for o in optima])
    L += [f"- warning: {o['warning']}" for o in optima if o.get("warning")]
    fit = scaling(optima)
    if fit:
        L += ["", f"N* ∝ C^{fit['params_exponent']:.3f}, D* ∝ C^{fit['tokens_exponent']:.3f}; compute-optimal tokens "
                  f"per parameter {fit['ratio_mean']:.1f} ({fit['ratio_min']:.1f} to {fit['ratio_max']:.1f} over the "
                  "budgets)."]
    plot_isoflop(os.path.join(out_dir, "isoflop.png"), rows, optima, params)
    return L + ["", "![val bpb against parameters, per budget](isoflop.png)"]


def miniseries_section(out_dir, rows, params):
    L = ["", "## val bpb and CORE against compute", ""]
    if len(rows) > 1:
        k, _ = power_law([r["flops"] for r in rows], [r["val_bpb"] for r in rows])
        L += [f"val bpb ∝ C^{k:.3f} over {len(rows)} depths."]
    fig = Figure(figsize=(10, 4))
    for ax, key in zip(fig.subplots(1, 2), ("val_bpb", "core")):
        pts = [(r["flops"], r[key]) for r in rows if r[key] is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
        ax.set_xscale("log")
        ax.set(xlabel="training FLOPs", ylabel=key)
        ax.grid(alpha=0.3)
    save_png(fig, os.path.join(out_dir, "miniseries.png"))
    return L + ["", "![val bpb and CORE against FLOPs](miniseries.png)"]


def plot_isoflop(path, rows, optima, params):
    fig = Figure(figsize=(6, 4.5))
    ax = fig.subplots()
    for budget in sorted({r["budget"] for r in rows}):
        cells = sorted((r for r in rows if r["budget"] == budget), key=lambda r: r[f"params_{params}"])
        x, y = [r[f"params_{params}"] for r in cells], [r["val_bpb"] for r in cells]
        line, = ax.plot(x, y, "o", label=f"{budget:.3g} FLOPs")
        if len(x) >= 3:
            coeffs = np.polyfit(np.log(x), y, 2)
            xs = np.exp(np.linspace(math.log(x[0]), math.log(x[-1]), 50))
            ax.plot(xs, np.polyval(coeffs, np.log(xs)), color=line.get_color(), alpha=0.6)
    for o in optima:
        if "params" in o:
            ax.plot([o["params"]], [o["val_bpb"]], "k*", markersize=10)
    ax.set_xscale("log")
    ax.set(xlabel=f"parameters ({params})", ylabel="val bpb", title="isoFLOP curves (★: the fitted optimum)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_png(fig, path)


def write_comparison(path_md, base_name, idea_name, result, warnings):
    """<idea>/vs_<baseline>.md and .png: the multiplier per point, the trend, the caveats."""
    L = [f"# {idea_name} against {base_name}", ""] + [f"- WARNING: {w}" for w in warnings] + [""]
    L += md_table(["idea FLOPs", "idea val bpb", "baseline FLOPs for that bpb", "compute multiplier"],
                  [[f"{p['flops']:.3g}", f"{p['val_bpb']:.4f}", f"{p['baseline_flops']:.3g}",
                    f"{p['multiplier']:.3f}" + (" (extrapolated)" if p["extrapolated"] else "")] for p in result["points"]])
    L += ["", trend_line(result) + ".", "", f"![compute multiplier]({os.path.basename(path_md)[:-3]}.png)"]
    with atomic_write(path_md) as tmp, open(tmp, "w") as f:
        f.write("\n".join(L) + "\n")
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.plot([p["flops"] for p in result["points"]], [p["multiplier"] for p in result["points"]], "o-")
    ax.axhline(1, color="gray", lw=1)
    ax.set_xscale("log")
    ax.set(xlabel="idea's training FLOPs", ylabel="compute multiplier", title=f"{idea_name} vs {base_name}")
    ax.grid(alpha=0.3)
    save_png(fig, path_md[:-3] + ".png")
    return L
