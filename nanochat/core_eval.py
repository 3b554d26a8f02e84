"""
The CORE metric of the DCLM paper: 22 in-context learning tasks, each scored by accuracy and
"centered" against random guessing, then averaged. No generation is needed: every task is
answered by comparing losses of candidate continuations under one forward pass.

    multiple_choice    few-shot + query + delimiter + choice, for each choice:
                       pick the choice whose tokens have the lowest MEAN loss
    schema             few-shot + context option + delimiter + continuation, for each option:
                       pick the option under which the shared continuation has the lowest mean loss
    language_modeling  few-shot + context + delimiter + continuation: correct iff the argmax at
                       every continuation position is the continuation token (= greedy decoding)

The eval bundle (eval_bundle.zip) holds core.yaml (the tasks), eval_meta_data.csv (random
baselines, in percent) and eval_data/**.jsonl. A task whose data file is missing is skipped with
a warning, and the score says over how many tasks it was computed.
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

from nanochat.common import get_base_dir, print0

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
FEWSHOT_SEED = 1234


# -----------------------------------------------------------------------------
# The bundle

def get_eval_bundle_dir(path=None):
    return path or os.path.join(get_base_dir(), "eval_bundle")


def load_tasks(bundle_dir):
    """The tasks of core.yaml, in order, each a dict with its data (a list of records),
    or data=None when the task's file is absent from eval_data/."""
    with open(os.path.join(bundle_dir, "core.yaml")) as f:
        config = yaml.safe_load(f)
    with open(os.path.join(bundle_dir, "eval_meta_data.csv"), newline="", encoding="utf-8") as f:
        baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
    tasks = []
    for spec in config["icl_tasks"]:
        label, kind = spec["label"], spec["icl_task_type"]
        if kind not in TASK_TYPES:
            raise ValueError(f"core.yaml: task {label} has unknown icl_task_type {kind!r}")
        if label not in baselines:
            raise ValueError(f"eval_meta_data.csv has no random baseline for task {label}")
        path = os.path.join(bundle_dir, "eval_data", spec["dataset_uri"])
        data = None
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                data = [json.loads(line) for line in f if line.strip()]
        tasks.append({
            "label": label, "type": kind, "path": path, "data": data,
            "num_fewshot": int(spec["num_fewshot"][0]),  # a list in the DCLM format; CORE uses one value
            "delimiter": spec["continuation_delimiter"],
            "random_baseline": baselines[label],  # in percent, as in the csv: 25.0 for 4 choices
        })
    return tasks


# -----------------------------------------------------------------------------
# Prompts

def fewshot_indices(n, index, k, seed=FEWSHOT_SEED):
    """k distinct items out of n, never `index` itself. Seeded by the item's index, so an item
    always gets the same examples: on any rank, in any run, whatever subset is evaluated."""
    picks = random.Random(seed + index).sample(range(n - 1), min(k, n - 1))
    return [j + (j >= index) for j in picks]  # draw from the n-1 others: skip over the item


def solved_example(task, item):
    """An item with its correct answer filled in, as shown among the few-shot examples."""
    d = task["delimiter"]
    if task["type"] == "multiple_choice":
        return item["query"] + d + item["choices"][item["gold"]]
    if task["type"] == "schema":
        return item["context_options"][item["gold"]] + d + item["continuation"]
    return item["context"] + d + item["continuation"]


def render_prompts(task, index):
    """(prompt, answer) text pairs of one item: one per choice, one per context option, or one."""
    data, d = task["data"], task["delimiter"]
    item = data[index]
    shots = "".join(solved_example(task, data[j]) + "\n\n"
                    for j in fewshot_indices(len(data), index, task["num_fewshot"]))
    if task["type"] == "multiple_choice":
        return [(shots + item["query"] + d, choice) for choice in item["choices"]]
    if task["type"] == "schema":
        return [(shots + option + d, item["continuation"]) for option in item["context_options"]]
    return [(shots + item["context"] + d, item["continuation"])]


def common_prefix_len(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_prompts(tokenizer, pairs, max_len):
    """Token rows (ids, start): BOS + prompt + answer, with the answer at ids[start:].

    The answer span is found by tokenizing the prompt alone and the full text: BPE may merge
    across the boundary (the delimiter's trailing space joins the answer's first word), so the
    answer is everything after the tokens the two have in common. A row longer than the model's
    context is cut from the LEFT: the oldest few-shot text goes, the answer always stays."""
    bos = tokenizer.bos_token_id
    rows = []
    for prompt, answer in pairs:  # one by one: a thread pool per item would cost more than it saves
        prompt_ids, ids = tokenizer.encode(prompt, prepend=bos), tokenizer.encode(prompt + answer, prepend=bos)
        start = min(common_prefix_len(prompt_ids, ids), len(ids) - 1)  # never an empty answer
        cut = max(0, len(ids) - max_len)
        # start >= 1: the first answer token is predicted from the position before it (only an
        # answer longer than the whole context loses its first tokens)
        rows.append((ids[cut:], max(start - cut, 1)))
    return rows


# -----------------------------------------------------------------------------
# Scoring

def score_rows(model, rows, pad_id, device):
    """One forward over the rows (right-padded): per row, the mean loss over its answer tokens
    and whether the argmax reproduces every answer token."""
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
    mean_loss = (losses * mask).sum(1) / mask.sum(1)
    exact = ((logits.argmax(-1) == targets) | ~mask).all(1)
    return mean_loss, exact


def evaluate_item(model, tokenizer, task, index, device):
    """Is the model right on item `index`? All its choices go through the model in one batch."""
    rows = tokenize_prompts(tokenizer, render_prompts(task, index), model.config.sequence_len)
    mean_loss, exact = score_rows(model, rows, tokenizer.bos_token_id, device)
    if task["type"] == "language_modeling":
        return bool(exact[0])
    # mean, not total, loss: a long choice must not lose just for having more tokens
    return int(mean_loss.argmin()) == task["data"][index]["gold"]


def count_correct(model, tokenizer, task, device, n, rank=0, world_size=1):
    """Correct answers among this rank's share of the first n items: r, r+W, r+2W, ..."""
    return sum(evaluate_item(model, tokenizer, task, i, device) for i in range(rank, n, world_size))


def evaluate_task(model, tokenizer, task, device, max_items=None):
    """Accuracy on a task (on its first max_items items if given), split over all ranks."""
    n = len(task["data"]) if max_items is None else min(max_items, len(task["data"]))
    if n < 1:
        raise ValueError(f"task {task['label']}: no items to evaluate (max_items={max_items})")
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            correct = count_correct(model, tokenizer, task, device, n, rank, world_size)
    finally:
        model.train(was_training)
    if dist.is_initialized():
        total = torch.tensor(correct, dtype=torch.long, device=device)
        dist.all_reduce(total)
        correct = total.item()
    return correct / n


def centered(accuracy, random_baseline):
    """0 = random guessing, 1 = perfect: tasks with 2 and 10 choices become comparable.
    random_baseline is in percent, as in eval_meta_data.csv."""
    b = random_baseline / 100
    return (accuracy - b) / (1 - b)


def evaluate_core(model, tokenizer, bundle_dir, device, max_per_task=None):
    """CORE = mean centered accuracy over the tasks whose data is present. max_per_task
    evaluates only the first K items of each task: a fixed subset, cheap enough to run
    during training, but not comparable with a full CORE score (the label says so)."""
    tasks = load_tasks(bundle_dir)
    results, skipped = {}, []
    for task in tasks:
        if task["data"] is None:
            print0(f"warning: {task['path']} is missing: skipping CORE task {task['label']}")
            skipped.append(task["label"])
            continue
        t0 = time.time()
        acc = evaluate_task(model, tokenizer, task, device, max_per_task)
        n = len(task["data"]) if max_per_task is None else min(max_per_task, len(task["data"]))
        b = task["random_baseline"]
        results[task["label"]] = {"accuracy": acc, "centered": centered(acc, b), "random_baseline": b,
                                  "n_items": n}
        print0(f"{task['label']:<34} accuracy {acc:.4f}  centered {centered(acc, b):+.4f}  "
               f"({n} items, {time.time() - t0:.1f}s)")
    if not results:
        raise FileNotFoundError(f"no CORE task data found under {os.path.join(bundle_dir, 'eval_data')}")
    core = sum(r["centered"] for r in results.values()) / len(results)
    label = f"CORE over {len(results)}/{len(tasks)} tasks"
    if max_per_task is not None:
        label += f", subset: {max_per_task} items per task"
    return {"core": core, "core_label": label, "n_tasks": len(results), "n_total": len(tasks),
            "tasks": results, "skipped": skipped}
