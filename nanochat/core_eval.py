"""
The CORE metric of the DCLM paper: 22 in-context learning tasks, each scored by accuracy and
"centered" against random guessing, then averaged. No generation is needed: every task is
answered by comparing losses of candidate continuations under one forward pass.

    multiple_choice    few-shot + query + delimiter + choice, for each choice:
                       pick the choice whose scored tokens have the lowest MEAN loss
    schema             few-shot + context option + delimiter + continuation, for each option:
                       pick the option under which the shared continuation has the lowest mean loss
    language_modeling  few-shot + context + delimiter + continuation: correct iff the argmax at
                       every continuation position is the continuation token (= greedy decoding)

A CORE score says "GPT-2 grade" only when it is measured with the ruler that measured GPT-2
(124M 0.1139, 355M 0.1849, 774M 0.2146, 1.5B 0.2565): the evaluator behind the public
time-to-GPT-2 leaderboard. So every item is rendered, tokenized and scored its way, rule by rule
below; docs/EVAL.md sets each rule beside DCLM's own. Where that evaluator would crash or divide
by zero, the rule says what we do instead, and the item is counted as "repaired".

The eval bundle (eval_bundle.zip) holds core.yaml (the tasks), eval_meta_data.csv (random
baselines, in percent) and eval_data/**.jsonl. A task whose data file is missing or corrupt is
skipped with a warning, and the score says over how many tasks it was computed.
"""
import csv
import json
import os
import random
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from nanochat.cli import BadInput, Missing
from nanochat.common import any_rank, get_base_dir, print0

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
SHUFFLE_SEED = 1337  # each task's items are shuffled once; a subset is the first K of that order
FEWSHOT_SEED = 1234  # item i's examples: Random(1234 + i)
EXAMPLE_DELIMITER = "\n\n"  # after each few-shot example
# Recorded with every score (base_eval.json, the report), so that two scores measured differently
# are never compared. The revision counts changes to how we implement the ruler's rules.
RULES = "leaderboard, rev 1"


# -----------------------------------------------------------------------------
# The bundle

def get_eval_bundle_dir(path=None):
    return path or os.path.join(get_base_dir(), "eval_bundle")


class BundleError(BadInput):
    """A missing or damaged file of the eval bundle: one line naming the file and the fix."""
    def __init__(self, path, what):
        bundle = os.path.dirname(path) if os.path.basename(path) in ("core.yaml", "eval_meta_data.csv") else \
            os.path.dirname(os.path.dirname(path))
        super().__init__(f"{path}: {what}; the eval bundle {bundle} is damaged: delete it and run "
                         f"`python -m scripts.base_eval --download-only` (or pass --eval-bundle a whole copy)")


def _read_bundle_file(path, parse):
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return parse(f)
    except FileNotFoundError:
        raise BundleError(path, "missing") from None
    except (ValueError, KeyError, TypeError, yaml.YAMLError) as e:  # JSON, YAML, csv columns, numbers
        raise BundleError(path, f"unreadable ({type(e).__name__}: {' '.join(str(e).split())[:120]})") from None


def _read_task_file(path):
    """A task's records, or (None, why) if its file is missing or damaged: skipped, not fatal."""
    if not os.path.exists(path):
        return None, "missing"
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()], None
    except (ValueError, UnicodeDecodeError) as e:
        return None, f"corrupt ({' '.join(str(e).split())[:120]})"


def load_tasks(bundle_dir):
    """The tasks of core.yaml, in order, each a dict with its data (a list of records), or
    data=None and `problem` saying why ("missing", "corrupt ...") when the task's file in
    eval_data/ cannot be used. A missing or damaged core.yaml / eval_meta_data.csv raises
    BundleError, naming the file and the fix."""
    config = _read_bundle_file(os.path.join(bundle_dir, "core.yaml"), lambda f: yaml.safe_load(f)["icl_tasks"])
    baselines = _read_bundle_file(os.path.join(bundle_dir, "eval_meta_data.csv"), lambda f: {
        row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)})
    tasks = []
    for spec in config:
        label, kind = spec["label"], spec["icl_task_type"]
        if kind not in TASK_TYPES:
            raise BadInput(f"{os.path.join(bundle_dir, 'core.yaml')}: task {label} has unknown icl_task_type {kind!r}")
        if label not in baselines:
            raise BadInput(f"{os.path.join(bundle_dir, 'eval_meta_data.csv')} has no random baseline for task {label}")
        path = os.path.join(bundle_dir, "eval_data", spec["dataset_uri"])
        data, problem = _read_task_file(path)
        tasks.append({
            "label": label, "type": kind, "path": path, "data": data, "problem": problem,
            "num_fewshot": int(spec["num_fewshot"][0]),  # a list in the DCLM format; CORE uses one value
            "delimiter": spec["continuation_delimiter"],
            "random_baseline": baselines[label],  # in percent, as in the csv: 25.0 for 4 choices
        })
    return tasks


# -----------------------------------------------------------------------------
# The items, in the ruler's order

def ordered_items(data, max_items=None):
    """The items as the ruler evaluates them: shuffled once with Random(1337), then cut to the
    first max_items. Files are often sorted (jeopardy by category, bigbench_cs_algorithms by
    question type), so a file's first K items would be a biased subset; a fixed shuffle is not,
    and the same K gives the same items in every run. Few-shot examples are drawn by position in
    THIS list, so even a full evaluation depends on the shuffle."""
    items = list(data)
    random.Random(SHUFFLE_SEED).shuffle(items)
    return items if max_items is None else items[:max_items]


def fewshot_indices(n, index, k):
    """The few-shot positions of item `index` among n: Random(1234 + index).sample(k) of the other
    n - 1 positions, in the order drawn. (The ruler builds the list of other positions; sampling
    positions of range(n - 1) and stepping over `index` draws the same ones without that O(n) list.)
    A task with fewer than k other items gives all n - 1 (the ruler raises there)."""
    picks = random.Random(FEWSHOT_SEED + index).sample(range(n - 1), min(k, n - 1))
    return [j + (j >= index) for j in picks]


# -----------------------------------------------------------------------------
# Prompts, rendered as the ruler renders them
#
# 1. Fields are used exactly as stored: piqa's queries keep their trailing "\n" ("...?\n\nAnswer:"),
#    bigbench_language_identification's end in "Answer: " (so " " + choice gives "Answer:  C"), a
#    jeopardy answer may end in a space. Only a language-modelling context is stripped.
# 2. One text per row: prompt, delimiter and answer are joined as text and tokenized whole.
# 3. Few-shot examples are solved items, each followed by a blank line.
# 4. Language modelling renders two texts: the prompt without the continuation, stripped (so a
#    delimiter's trailing space goes with it), and the prompt with it.

def render_prompts(task, items, index):
    """The texts of item `index` of `items`: one per choice, one per context option, or (language
    modelling) the prompt without and with its continuation."""
    d, item = task["delimiter"], items[index]
    shots = [items[j] for j in fewshot_indices(len(items), index, task["num_fewshot"])]
    if task["type"] == "multiple_choice":
        head = "".join(f"{s['query']}{d}{s['choices'][s['gold']]}{EXAMPLE_DELIMITER}" for s in shots)
        return [f"{head}{item['query']}{d}{choice}" for choice in item["choices"]]
    if task["type"] == "schema":
        head = "".join(f"{s['context_options'][s['gold']]}{d}{s['continuation']}{EXAMPLE_DELIMITER}" for s in shots)
        return [f"{head}{option}{d}{item['continuation']}" for option in item["context_options"]]
    head = "".join(f"{s['context'].strip()}{d}{s['continuation']}{EXAMPLE_DELIMITER}" for s in shots)
    prompt = f"{head}{item['context'].strip()}{d}"
    return [prompt.strip(), prompt + item["continuation"]]


def common_prefix_len(rows):
    """How many leading tokens all rows share."""
    n = 0
    for column in zip(*rows):
        if any(t != column[0] for t in column):
            break
        n += 1
    return n


def scored_starts(kind, rows):
    """(start of each row's scored span, which runs to the row's end; repaired). The ruler scores:
    multiple choice  the tokens after the longest common token prefix of all the choices' rows
                     (what the choices share is no evidence for any of them);
    schema           the longest common token suffix of the rows: the continuation, as far as
                     its tokens do not merge with the differing context before it;
    language model   the tokens after the prompt without the continuation (rows[0]), whose tokens
                     must be a prefix of the full row's (rows[1]).
    Where the ruler's span would be empty (a choice whose tokens are a prefix of another's: a NaN
    mean) or its prefix assertion fails, we score at least each row's last token, or, for language
    modelling, everything after the common prefix, and say the item was repaired."""
    shortest = min(len(r) for r in rows)
    if kind == "multiple_choice":
        common = common_prefix_len(rows)
        return [max(1, min(common, shortest - 1))] * len(rows), common >= shortest
    if kind == "schema":
        suffix = common_prefix_len([r[::-1] for r in rows])
        kept = max(1, min(suffix, shortest - 1))
        return [len(r) - kept for r in rows], kept != suffix
    without, full = rows
    ok = len(without) < len(full) and full[:len(without)] == without
    return [len(without) if ok else max(1, min(common_prefix_len(rows), len(full) - 1))], not ok


def token_rows(tokenizer, kind, prompts, max_len):
    """([(ids, start)], repaired): the item's rows, each BOS + text, and where its scored span
    starts. A row longer than the model's context is cropped from the LEFT (the oldest few-shot
    text goes, as the ruler does for a model that declares its length); if the crop reaches into
    the scored span (the ruler asserts), the span keeps its last tokens."""
    rows = [tokenizer.encode(p, prepend=tokenizer.bos_token_id) for p in prompts]  # one by one: no thread pool per item
    starts, repaired = scored_starts(kind, rows)
    if kind == "language_modeling":
        rows = rows[1:]  # only the full row goes through the model
    out = []
    for ids, start in zip(rows, starts):
        cut = max(0, len(ids) - max_len)
        repaired |= start - cut < 1  # position 0 has nothing before it to predict it from
        out.append((ids[cut:], max(start - cut, 1)))
    return out, repaired


# -----------------------------------------------------------------------------
# Scoring

def score_rows(model, rows, pad_id, device):
    """One forward over the rows (right-padded with pad_id, as the ruler pads with BOS): per row,
    the mean loss over its scored tokens and whether the argmax reproduces every one of them."""
    B, T = len(rows), max(len(ids) for ids, _ in rows)
    idx = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T - 1), dtype=torch.bool)  # over targets: position t predicts token t+1
    for r, (ids, start) in enumerate(rows):
        idx[r, :len(ids)] = torch.tensor(ids)
        mask[r, start - 1:len(ids) - 1] = True
    idx, mask = idx.to(device), mask.to(device)
    logits = model(idx)[:, :-1].float()
    targets = idx[:, 1:]
    losses = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                             reduction="none").view(B, T - 1)
    mean_loss = (losses * mask).sum(1) / mask.sum(1).clamp(min=1)
    exact = ((logits.argmax(-1) == targets) | ~mask).all(1)
    return mean_loss, exact


def evaluate_item(model, tokenizer, task, items, index, device):
    """(is the model right on item `index` of `items`, was the item repaired). All its rows go
    through the model in one batch. The lowest MEAN loss wins (a long choice must not lose just
    for having more tokens); ties go to the first, as in the ruler."""
    rows, repaired = token_rows(tokenizer, task["type"], render_prompts(task, items, index),
                                model.config.sequence_len)
    repaired |= task["num_fewshot"] > len(items) - 1  # fewer items than shots: the ruler raises
    mean_loss, exact = score_rows(model, rows, tokenizer.bos_token_id, device)
    if task["type"] == "language_modeling":
        return bool(exact[0]), repaired
    return int(mean_loss.argmin()) == items[index]["gold"], repaired


def count_correct(model, tokenizer, task, items, device, rank=0, world_size=1, should_stop=None):
    """(correct, repaired) among this rank's share of the items: positions r, r+W, r+2W, ...
    should_stop: checked before every item, agreed by all ranks; None as soon as it is true."""
    mine, correct, repaired = range(rank, len(items), world_size), 0, 0
    for k in range(len(range(0, len(items), world_size))):  # rank 0 has the most items: all loop as often
        if should_stop is not None:
            if any_rank(bool(should_stop()), device):
                return None
        if k < len(mine):
            right, fixed = evaluate_item(model, tokenizer, task, items, mine[k], device)
            correct, repaired = correct + right, repaired + fixed
    return correct, repaired


def evaluate_task(model, tokenizer, task, device, max_items=None, should_stop=None):
    """(accuracy, items repaired) on a task, or on the first max_items of its shuffled items,
    split over all ranks. should_stop: see count_correct (None when it stopped the evaluation)."""
    items = ordered_items(task["data"], max_items)
    if not items:
        raise ValueError(f"task {task['label']}: no items to evaluate (max_items={max_items})")
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            counts = count_correct(model, tokenizer, task, items, device, rank, world_size, should_stop)
    finally:
        model.train(was_training)
    if counts is None:
        return None
    if dist.is_initialized():
        total = torch.tensor(counts, dtype=torch.long, device=device)
        dist.all_reduce(total)
        counts = total.tolist()
    return counts[0] / len(items), counts[1]


def centered(accuracy, random_baseline):
    """0 = random guessing, 1 = perfect: tasks with 2 and 10 choices become comparable.
    random_baseline is in percent, as in eval_meta_data.csv."""
    b = random_baseline / 100
    return (accuracy - b) / (1 - b)


def items_label(max_per_task):
    return "all items" if max_per_task is None else f"seeded subset of {max_per_task} items per task"


def evaluate_core(model, tokenizer, bundle_dir, device, max_per_task=None, should_stop=None):
    """CORE = mean centered accuracy over the tasks whose data is present. max_per_task
    evaluates the first K of each task's shuffled items: cheap enough to run during training,
    but not comparable with a full CORE score (the label says so). A missing task file is
    skipped, not fatal (the ruler stops there), so a partial bundle still gives a labelled score.
    should_stop: a callable checked between items (all ranks agree); None when it stopped."""
    tasks = load_tasks(bundle_dir)
    results, skipped_why = {}, {}
    for task in tasks:
        if task["data"] is None:
            fix = "" if task["problem"] == "missing" else \
                " (delete the eval bundle and run `python -m scripts.base_eval --download-only` to get it whole)"
            print0(f"warning: {task['path']} is {task['problem']}: skipping CORE task {task['label']}{fix}")
            skipped_why[task["label"]] = task["problem"]
            continue
        t0 = time.time()
        scored = evaluate_task(model, tokenizer, task, device, max_per_task, should_stop)
        if scored is None:
            return None
        (acc, repaired), b = scored, task["random_baseline"]
        n = len(task["data"]) if max_per_task is None else min(max_per_task, len(task["data"]))
        results[task["label"]] = {"accuracy": acc, "centered": centered(acc, b), "random_baseline": b,
                                  "n_items": n, "n_repaired": repaired}
        print0(f"{task['label']:<34} accuracy {acc:.4f}  centered {centered(acc, b):+.4f}  "
               f"({n} items, {time.time() - t0:.1f}s)"
               + (f"  {repaired} repaired where the ruler fails (docs/EVAL.md)" if repaired else ""))
    if not results:
        raise Missing(f"no CORE task data found under {os.path.join(bundle_dir, 'eval_data')}: pass --eval-bundle "
                      f"a whole copy, or delete it and run `python -m scripts.base_eval --download-only`")
    core = sum(r["centered"] for r in results.values()) / len(results)
    label = f"CORE over {len(results)}/{len(tasks)} tasks, " + items_label(max_per_task)
    return {"core": core, "core_label": label, "n_tasks": len(results), "n_total": len(tasks),
            "rules": RULES, "max_per_task": max_per_task,
            "n_repaired": sum(r["n_repaired"] for r in results.values()),
            "tasks": results, "skipped": list(skipped_why), "skipped_why": skipped_why}
