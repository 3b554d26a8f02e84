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
baselines, in percent) and eval_data/**.jsonl. A task whose data file is missing or corrupt is
skipped with a warning, and the score says over how many tasks it was computed.

A score is only comparable with another computed the same way, so the text is rendered and
scored as DCLM's evaluator (MosaicML llm-foundry 0.9) does it, rule by rule below; where we
differ, the comment says why. docs/EVAL.md has the whole table. A result records its SEMANTICS
and how many items per task it saw: all of them, or a fixed seeded subset (max_per_task).
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

from nanochat.common import any_rank, get_base_dir, print0

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
FEWSHOT_SEED = 1234
SUBSET_SEED = 1234
# Recorded with every score. Rev 2: fields whitespace-stripped and answers scored with their
# leading space, as DCLM does; subsets are seeded shuffles. Rev 1 (unrecorded) scored "42" after
# a context ending in a space, and took a file's first K items as its subset.
SEMANTICS = "DCLM v1 semantics, rev 2"
# Few-shot examples are joined by a blank line, as in the evaluator that published the GPT-2
# reference scores we compare against. llm-foundry's default, which DCLM's config keeps, is one
# "\n": a known difference, which re-deriving GPT-2's score with --hf-path settles (docs/EVAL.md).
EXAMPLE_DELIMITER = "\n\n"


# -----------------------------------------------------------------------------
# The bundle

def get_eval_bundle_dir(path=None):
    return path or os.path.join(get_base_dir(), "eval_bundle")


class BundleError(ValueError):
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
            raise ValueError(f"core.yaml: task {label} has unknown icl_task_type {kind!r}")
        if label not in baselines:
            raise ValueError(f"eval_meta_data.csv has no random baseline for task {label}")
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
# Prompts, rendered as DCLM renders them
#
# How DCLM (llm-foundry's in-context-learning datasets) turns an item into text, and so do we:
# 1. Every string field of an item (context, continuation, query) is stripped of leading and
#    trailing whitespace; list fields (choices, context_options) are kept as they are. This
#    matters: all piqa queries end in "\n" (else "?\n\nAnswer:"), all
#    bigbench_language_identification queries end in "Answer: " (else "Answer:  A"), and a few
#    jeopardy contexts and answers end in spaces.
# 2. The item's context and delimiter end WITHOUT trailing whitespace ("...\nAnswer:"), and the
#    answer carries the space instead (" 42"), unless it already starts with one. This holds
#    for all three task types. The scored tokens are then the tokens of " 42": with our split
#    pattern a space before a digit is its own token, so "...Answer: " + "42" would put that
#    space in the context and score a bare "42", a tokenization a trained model rarely sees.
#    (llm-foundry adds the space only for tokenizers where " a" is one token; for a
#    SentencePiece tokenizer the answer, tokenized on its own, gets its word-start marker
#    instead: in text, that is the same leading space.)
# 3. Few-shot examples are solved items (stripped fields, delimiter and answer as they are),
#    each followed by EXAMPLE_DELIMITER.
# We match DCLM because CORE is defined by its evaluator: another rendering of the same items
# measures something else (rev 1 differed on every piqa item, for instance).

def fewshot_indices(n, index, k, seed=FEWSHOT_SEED):
    """k distinct items out of n, never `index` itself (at most n-1: a 1-item task gets none).
    Seeded by the item's index, so an item always gets the same examples, drawn from the whole
    task: on any rank, in any run, whatever subset is evaluated. (DCLM draws from one generator
    shared by all items in file order, so its draw for an item depends on every item before it:
    the same distribution, but a subset could not reproduce it.)"""
    picks = random.Random(seed + index).sample(range(n - 1), min(k, n - 1))
    return [j + (j >= index) for j in picks]  # draw from the n-1 others: skip over the item


def stripped(item):
    """The item as DCLM reads it: string fields stripped of surrounding whitespace, lists kept."""
    return {key: value.strip() if isinstance(value, str) else value for key, value in item.items()}


def spaced(answer):
    """The answer as DCLM scores it: led by the space the context no longer ends with."""
    return answer if answer.startswith(" ") else " " + answer


def solved_example(task, item):
    """An item with its correct answer filled in, as shown among the few-shot examples."""
    d, item = task["delimiter"], stripped(item)
    if task["type"] == "multiple_choice":
        return item["query"] + d + item["choices"][item["gold"]]
    if task["type"] == "schema":
        return item["context_options"][item["gold"]] + d + item["continuation"]
    return item["context"] + d + item["continuation"]


def render_prompts(task, index):
    """(prompt, answer) text pairs of one item: one per choice, one per context option, or one.
    The delimiter's trailing space moves from the prompt to the answer (rule 2 above)."""
    data, d = task["data"], task["delimiter"]
    item = stripped(data[index])
    shots = "".join(solved_example(task, data[j]) + EXAMPLE_DELIMITER
                    for j in fewshot_indices(len(data), index, task["num_fewshot"]))
    if task["type"] == "multiple_choice":
        prompt = shots + (item["query"] + d).rstrip()
        return [(prompt, spaced(choice)) for choice in item["choices"]]
    if task["type"] == "schema":
        # DCLM keeps a context option as it is (a list field: not stripped) and appends the
        # delimiter's non-space part; with no few-shot examples it appends no delimiter at all,
        # which is the same text for CORE's schema tasks (delimiter " ").
        answer = spaced(item["continuation"])
        return [(shots + option + d.rstrip(), answer) for option in item["context_options"]]
    return [(shots + (item["context"] + d).rstrip(), spaced(item["continuation"]))]


def common_prefix_len(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_prompts(tokenizer, pairs, max_len):
    """Token rows (ids, start): BOS + prompt + answer, with the answer at ids[start:].

    The text is tokenized whole, as the model would read it, and the answer is everything after
    the tokens it shares with the prompt alone. DCLM instead tokenizes few-shot text, context and
    answer separately and concatenates the ids; with GPT-2's tokenizer that gives the same ids
    (checked on ~3,500 items of the bundle: no difference), since a prompt ends without a space
    and an answer starts with one. (DCLM prepends no BOS for GPT-2; we start every row with the
    tokenizer's document-start token, as in training.)

    A row longer than the model's context is cut from the LEFT: the oldest few-shot text goes,
    the answer always stays, as in DCLM. An answer longer than the whole context keeps its last
    tokens (DCLM raises an error there)."""
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
    # As in DCLM: the lowest MEAN loss over each choice's (or, for schema, the shared
    # continuation's) tokens wins; a long choice must not lose just for having more tokens. Ties
    # go to the first, as in DCLM. Every token of a choice is scored: scoring only the tokens after
    # what all choices share would leave a choice whose tokens are a prefix of another's with no
    # tokens at all (a NaN mean). A schema item scores only the continuation: how likely each
    # context option is on its own must not count, only how well it predicts what follows.
    return int(mean_loss.argmin()) == task["data"][index]["gold"]


def subset_indices(n, max_items=None, seed=SUBSET_SEED):
    """The items a run evaluates: all n in file order, or the first max_items of one fixed
    shuffle of the task. A file's first K items are a biased sample (jeopardy's first 100 are one
    category, bigbench_cs_algorithms' first 100 one question type); a seeded shuffle is not, and
    every run with the same K sees the same items, so two subset scores compare (and K=100's
    items are among K=500's)."""
    order = list(range(n))
    if max_items is None or max_items >= n:
        return order
    random.Random(seed).shuffle(order)
    return order[:max_items]


def count_correct(model, tokenizer, task, device, indices, rank=0, world_size=1, should_stop=None):
    """Correct answers among this rank's share of the items: indices[r], indices[r+W], ...
    should_stop: checked before every item, agreed by all ranks; None as soon as it is true."""
    mine, correct = indices[rank::world_size], 0
    for k in range(len(indices[::world_size])):  # rank 0 has the most items: all ranks loop as often
        if should_stop is not None:
            if any_rank(bool(should_stop()), device):
                return None
        if k < len(mine):
            correct += evaluate_item(model, tokenizer, task, mine[k], device)
    return correct


def evaluate_task(model, tokenizer, task, device, max_items=None, should_stop=None):
    """Accuracy on a task (on a seeded subset of max_items items if given), split over all ranks.
    Few-shot examples still come from the whole task: an item is rendered the same in a subset
    as in the full run. should_stop: see count_correct (None when it stopped the evaluation)."""
    indices = subset_indices(len(task["data"]), max_items)
    if not indices:
        raise ValueError(f"task {task['label']}: no items to evaluate (max_items={max_items})")
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            correct = count_correct(model, tokenizer, task, device, indices, rank, world_size, should_stop)
    finally:
        model.train(was_training)
    if correct is None:
        return None
    if dist.is_initialized():
        total = torch.tensor(correct, dtype=torch.long, device=device)
        dist.all_reduce(total)
        correct = total.item()
    return correct / len(indices)


def centered(accuracy, random_baseline):
    """0 = random guessing, 1 = perfect: tasks with 2 and 10 choices become comparable.
    random_baseline is in percent, as in eval_meta_data.csv."""
    b = random_baseline / 100
    return (accuracy - b) / (1 - b)


def items_label(max_per_task):
    return "all items" if max_per_task is None else f"seeded subset of {max_per_task} items per task"


def evaluate_core(model, tokenizer, bundle_dir, device, max_per_task=None, should_stop=None):
    """CORE = mean centered accuracy over the tasks whose data is present. max_per_task
    evaluates a fixed seeded subset of K items per task: cheap enough to run during training,
    but not comparable with a full CORE score (the label says so). A missing task file is
    skipped, not fatal (DCLM stops there), so a partial bundle still gives a labelled score.
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
        acc = evaluate_task(model, tokenizer, task, device, max_per_task, should_stop)
        if acc is None:
            return None
        n = len(task["data"]) if max_per_task is None else min(max_per_task, len(task["data"]))
        b = task["random_baseline"]
        results[task["label"]] = {"accuracy": acc, "centered": centered(acc, b), "random_baseline": b,
                                  "n_items": n}
        print0(f"{task['label']:<34} accuracy {acc:.4f}  centered {centered(acc, b):+.4f}  "
               f"({n} items, {time.time() - t0:.1f}s)")
    if not results:
        raise FileNotFoundError(f"no CORE task data found under {os.path.join(bundle_dir, 'eval_data')}")
    core = sum(r["centered"] for r in results.values()) / len(results)
    label = f"CORE over {len(results)}/{len(tasks)} tasks, " + items_label(max_per_task)
    return {"core": core, "core_label": label, "n_tasks": len(results), "n_total": len(tasks),
            "semantics": SEMANTICS, "max_per_task": max_per_task,
            "subset_seed": None if max_per_task is None else SUBSET_SEED,
            "tasks": results, "skipped": list(skipped_why), "skipped_why": skipped_why}
