"""
Tests for nanochat/core_eval.py: each of the leaderboard evaluator's rules (rendering, scored
spans, order, subsets, few-shot draws) on a model whose answers are known by construction (a
bigram table: the logits at t are table[token t]), the repairs where that evaluator fails,
centering and aggregation, missing files, left truncation, the rank split, and a smoke run on
the real eval bundle.
"""
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import yaml

from nanochat import core_eval
from nanochat.gpt import GPTConfig, build_model
from nanochat.tokenizer import Tokenizer

BUNDLE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "eval_bundle")
WORDS = ["cat", "dog", "sat", "down", "mat", "red", "green"]  # each one token with its leading space


def make_tokenizer():
    text = "the " + " ".join(WORDS) + ". "
    filler = "pack my box with five dozen liquor jugs; how vexingly quick daft zebras jump! "  # more pairs to merge
    tok = Tokenizer.train([text * 20] * 5 + [filler * 3], 300)
    for w in WORDS:  # the hand-computed examples below rely on these
        assert len(tok.encode(" " + w)) == 1, w
    assert len(tok.encode("the")) == 1 and len(tok.encode("Q")) == 1
    return tok


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


class Bigram(nn.Module):
    """logits[b, t] = table[idx[b, t]]: the next-token prediction depends on the current token only."""

    def __init__(self, vocab_size, sequence_len=256):
        super().__init__()
        self.table = torch.zeros(vocab_size, vocab_size)
        self.config = SimpleNamespace(sequence_len=sequence_len)
        self.shapes = []

    def prefer(self, tok, prev, nxt, logit):
        self.table[tok.encode(prev)[-1], tok.encode(nxt)[0]] = logit

    def forward(self, idx):
        self.shapes.append(tuple(idx.shape))
        return self.table[idx]


def task(kind, data, num_fewshot=0, delimiter=" ", baseline=0.0, label="t"):
    return {"label": label, "type": kind, "data": data, "num_fewshot": num_fewshot, "delimiter": delimiter,
            "random_baseline": baseline, "path": label + ".jsonl"}


def mc_model(tok):
    # " red" after Q: loss ~2.8 (one token).  " green dog mat": loss ~5.7 on " green", then ~0, ~0:
    # a HIGHER total (~5.7) but a LOWER mean (~1.9) than " red".
    m = Bigram(tok.vocab_size)
    m.prefer(tok, "Q", " red", 3.0)
    m.prefer(tok, " green", " dog", 20.0)
    m.prefer(tok, " dog", " mat", 20.0)
    return m


# -----------------------------------------------------------------------------
# The three task types

def item(t, index=0, items=None):
    """evaluate_item on the task's items in file order (no shuffle): (correct, repaired)."""
    return core_eval.evaluate_item(t["model"], t["tok"], t, items or t["data"], index, "cpu")


def rows_of(tok, t, index=0, max_len=256):
    return core_eval.token_rows(tok, t["type"], core_eval.render_prompts(t, t["data"], index), max_len)


def test_multiple_choice_scores_only_what_follows_the_shared_prefix(tok):
    # both choices start with " red": the ruler scores " cat" against " dog mat"
    m = Bigram(tok.vocab_size)
    m.prefer(tok, " red", " cat", 3.0)
    m.prefer(tok, " dog", " mat", 20.0)
    t = task("multiple_choice", [{"query": "Q", "choices": ["red cat", "red dog mat"], "gold": 0}])
    (rows, repaired) = rows_of(tok, t)
    assert not repaired and [ids[start:] for ids, start in rows] == [tok.encode(" cat"), tok.encode(" dog mat")]
    ruler, _ = core_eval.score_rows(m, rows, tok.bos_token_id, "cpu")
    whole, _ = core_eval.score_rows(m, [(ids, 2) for ids, _ in rows], tok.bos_token_id, "cpu")
    assert ruler[0] < ruler[1] and whole[1] < whole[0]  # scoring the shared " red" too would flip the answer
    assert core_eval.evaluate_item(m, tok, t, t["data"], 0, "cpu") == (True, False)
    assert m.shapes[-1][0] == 2  # both choices in one forward


def test_multiple_choice_picks_lowest_mean_not_total_loss(tok):
    m = mc_model(tok)
    data = [{"query": "Q", "choices": ["red", "green dog mat"], "gold": g} for g in (1, 0)]
    t = task("multiple_choice", data)
    rows, _ = rows_of(tok, t)
    mean_loss, _ = core_eval.score_rows(m, rows, tok.bos_token_id, "cpu")
    total = [mean_loss[i].item() * (len(ids) - start) for i, (ids, start) in enumerate(rows)]
    assert total[1] > total[0] and mean_loss[1] < mean_loss[0]  # the two rules disagree here
    assert mean_loss[0].item() == pytest.approx(math.log(tok.vocab_size - 1 + math.e ** 3) - 3, abs=1e-4)
    assert [core_eval.evaluate_item(m, tok, t, data, i, "cpu")[0] for i in (0, 1)] == [True, False]
    assert core_eval.evaluate_task(m, tok, t, "cpu") == (0.5, 0)


def test_schema_scores_the_common_token_suffix(tok):
    # the options end in the same word as well: the ruler scores " sat down", not just " down",
    # so the option that predicts " sat" wins (scoring " down" alone would tie, and ties go to the first)
    m = Bigram(tok.vocab_size)
    m.prefer(tok, " cat", " sat", 20.0)
    m.prefer(tok, " sat", " down", 20.0)
    m.prefer(tok, "the", " dog", 20.0)  # "the dog" is the likelier option: that must not count
    data = [{"context_options": ["the dog sat", "the cat sat"], "continuation": "down", "gold": 1}]
    t = task("schema", data)
    rows, repaired = rows_of(tok, t)
    assert not repaired and all(ids[start:] == tok.encode(" sat down") for ids, start in rows)
    assert core_eval.evaluate_item(m, tok, t, data, 0, "cpu") == (True, False)


def test_language_modeling_exact_match(tok):
    m = Bigram(tok.vocab_size)
    m.prefer(tok, " cat", " sat", 20.0)
    m.prefer(tok, " sat", " down", 2.0)  # argmax though not confident: still correct
    data = [{"context": "the cat", "continuation": "sat down"},  # greedy: " sat" " down" -> right
            {"context": "the cat", "continuation": "sat mat"},   # greedy says " down", not " mat"
            {"context": "the dog", "continuation": "sat down"}]  # nothing predicts " sat" after " dog"
    t = task("language_modeling", data)
    assert [core_eval.evaluate_item(m, tok, t, data, i, "cpu")[0] for i in range(3)] == [True, False, False]
    m.prefer(tok, " sat", " mat", 5.0)  # now " mat" beats " down" after " sat"
    assert [core_eval.evaluate_item(m, tok, t, data, i, "cpu")[0] for i in range(3)] == [False, True, False]


# -----------------------------------------------------------------------------
# Rendering: items as stored, except a language-modelling context

def test_language_modeling_context_is_trimmed_and_the_answer_kept_as_stored(tok):
    # jeopardy: a context and a few-shot answer that end in a space; the delimiter's trailing space
    # leaves the prompt without the continuation, and the continuation's own trailing space stays
    data = [{"context": "HISTORY: it never hit $250 million ", "continuation": "Lottery "},
            {"context": "  the cat\n", "continuation": "sat"}]
    t = task("language_modeling", data, num_fewshot=1, delimiter="\nAnswer: ")
    assert core_eval.render_prompts(t, data, 1) == [
        "HISTORY: it never hit $250 million\nAnswer: Lottery \n\nthe cat\nAnswer:",
        "HISTORY: it never hit $250 million\nAnswer: Lottery \n\nthe cat\nAnswer: sat"]
    assert core_eval.render_prompts(t, data, 0)[1] == "the cat\nAnswer: sat\n\nHISTORY: it never hit $250 million" \
                                                     "\nAnswer: Lottery "
    # a trailing-space context with a space delimiter: the space goes to the answer (" sat" is scored)
    t = task("language_modeling", [{"context": "the cat ", "continuation": "sat"}])
    assert core_eval.render_prompts(t, t["data"], 0) == ["the cat", "the cat sat"]
    (ids, start), = rows_of(tok, t)[0]
    assert ids[start:] == tok.encode(" sat")


def test_multiple_choice_query_keeps_its_newline(tok):
    # piqa's queries end in "\n", so the prompt has a blank line before "Answer:"; a choice keeps its spaces
    data = [{"query": "Question: how tall?\n", "choices": ["12 feet", "very "], "gold": 0}]
    t = task("multiple_choice", data, delimiter="\nAnswer: ")
    assert core_eval.render_prompts(t, data, 0) == ["Question: how tall?\n\nAnswer: 12 feet",
                                                    "Question: how tall?\n\nAnswer: very "]
    # bigbench_language_identification: the query ends in "Answer: " and the delimiter is " "
    t = task("multiple_choice", [{"query": "Sentence: x\nAnswer: ", "choices": ["A", "B"], "gold": 1}])
    assert core_eval.render_prompts(t, t["data"], 0) == ["Sentence: x\nAnswer:  A", "Sentence: x\nAnswer:  B"]


def test_schema_renders_option_delimiter_continuation(tok):
    data = [{"context_options": ["the cat", "the dog"], "continuation": "sat down. ", "gold": 0}] * 3
    t = task("schema", data)
    assert core_eval.render_prompts(t, data, 0) == ["the cat sat down. ", "the dog sat down. "]
    t = task("schema", data, num_fewshot=1)
    assert core_eval.render_prompts(t, data, 0)[1] == "the cat sat down. \n\nthe dog sat down. "


def test_fewshot_prompt_renders_solved_examples(tok):
    data = [{"query": f"q{i}", "choices": [f"a{i}", f"b{i}"], "gold": i % 2} for i in range(6)]
    t = task("multiple_choice", data, num_fewshot=3, delimiter="\nAnswer: ")
    for index in range(6):
        prompts = core_eval.render_prompts(t, data, index)
        assert [p.split("\n\n")[-1] for p in prompts] == [f"q{index}\nAnswer: {c}" for c in data[index]["choices"]]
        shots = prompts[0].split("\n\n")[:-1]
        assert shots == [f"q{j}\nAnswer: " + data[j]["choices"][data[j]["gold"]]
                         for j in core_eval.fewshot_indices(6, index, 3)]


# -----------------------------------------------------------------------------
# Order, subsets and few-shot draws: the ruler's

def test_items_are_shuffled_once_with_seed_1337_and_a_subset_is_the_first_k():
    assert core_eval.ordered_items(range(10)) == [0, 3, 7, 2, 1, 6, 4, 5, 8, 9]
    assert core_eval.ordered_items(range(20), 5) == [13, 1, 2, 9, 7]
    assert core_eval.ordered_items(range(7), 50) == core_eval.ordered_items(range(7))  # K >= n: the whole task
    assert core_eval.ordered_items(range(1000), 500)[:100] == core_eval.ordered_items(range(1000), 100)


def test_fewshot_positions_after_the_shuffle_are_the_rulers():
    # item i of the shuffled 10-item task gets Random(1234 + i).sample(other positions, 3): positions,
    # then the items there
    expected = {0: [8, 2, 1], 1: [7, 8, 4], 2: [9, 8, 6], 5: [1, 4, 3], 9: [8, 5, 4]}
    items = core_eval.ordered_items(range(10))
    for i, positions in expected.items():
        assert core_eval.fewshot_indices(10, i, 3) == positions
    assert [items[j] for j in core_eval.fewshot_indices(10, 0, 3)] == [8, 7, 3]
    for n, k in [(5, 3), (11, 10), (1000, 10)]:
        for index in range(0, n, max(1, n // 7)):
            picks = core_eval.fewshot_indices(n, index, k)
            assert index not in picks and len(set(picks)) == len(picks) == min(k, n - 1)


def test_a_subset_draws_its_examples_from_the_subset(tok, monkeypatch):
    # the ruler cuts the shuffled list first, then draws by position in what is left
    data = [{"context": f"the cat {i}", "continuation": "sat"} for i in range(30)]
    t = task("language_modeling", data, num_fewshot=3)
    seen = {}
    render = core_eval.render_prompts
    monkeypatch.setattr(core_eval, "render_prompts", lambda task, items, i: seen.setdefault(i, render(task, items, i)))
    core_eval.evaluate_task(rank_model(tok), tok, t, "cpu", max_items=5)
    subset = core_eval.ordered_items(data, 5)
    assert sorted(seen) == list(range(5))
    for i, prompts in seen.items():
        assert prompts == render(t, subset, i)
        assert all(subset[j]["context"] in prompts[0] for j in core_eval.fewshot_indices(5, i, 3))


def test_subset_accuracy_is_over_the_shuffled_items(tok):
    # the file's first 10 items are right, the other 30 wrong: a first-K subset would score 1.0
    data = [{"context": "the cat", "continuation": "sat"}] * 10 + [{"context": "the dog", "continuation": "sat"}] * 30
    m = rank_model(tok)
    t = task("language_modeling", data)
    first10 = core_eval.ordered_items(list(range(40)), 10)
    acc, _ = core_eval.evaluate_task(m, tok, t, "cpu", max_items=10)
    assert acc == sum(i < 10 for i in first10) / 10 < 1.0
    assert core_eval.evaluate_task(m, tok, t, "cpu") == (0.25, 0)


# -----------------------------------------------------------------------------
# Where the ruler fails: a sensible answer, and the item counted as repaired

def test_repairs_where_the_ruler_fails(tok):
    # a choice whose tokens are all shared with another's: the ruler's span is empty (a NaN mean);
    # every row then scores from its last shared token on
    t = task("multiple_choice", [{"query": "Q", "choices": ["red", "red dog"], "gold": 0}])
    rows, repaired = rows_of(tok, t)
    assert repaired and [ids[start:] for ids, start in rows] == [tok.encode(" red"), tok.encode(" red dog")]
    # schema options with nothing in common at the end: at least the last token is scored
    t = task("schema", [{"context_options": ["the cat", "the dog"], "continuation": "", "gold": 0}], delimiter="")
    rows, repaired = rows_of(tok, t)
    assert repaired and [len(ids) - start for ids, start in rows] == [1, 1]
    # a continuation that merges with the context's last token: the ruler's prefix assertion fails;
    # the span is what follows the tokens both rows share
    t = task("language_modeling", [{"context": "the ca", "continuation": "t"}], delimiter="")
    (ids, start), = rows_of(tok, t)[0]
    assert rows_of(tok, t)[1] and ids[start:] == tok.encode(" cat")
    # a crop that reaches into the scored span: its last tokens stay
    t = task("multiple_choice", [{"query": "Q", "choices": ["red", " ".join(["cat"] * 50)], "gold": 0}])
    rows, repaired = rows_of(tok, t, max_len=32)
    assert repaired and len(rows[1][0]) == 32 and rows[1][1] == 1
    # fewer items than shots: the ruler raises; all the other items serve
    t = task("language_modeling", [{"context": "the cat", "continuation": "sat"}] * 3, num_fewshot=10)
    t["model"], t["tok"] = rank_model(tok), tok
    assert item(t) == (True, True) and core_eval.render_prompts(t, t["data"], 0)[0].count("\n\n") == 2
    assert core_eval.evaluate_task(t["model"], tok, t, "cpu") == (1.0, 3)


def test_repaired_items_are_counted_and_reported(tok, tmp_path, capsys):
    mc = [{"query": "Q", "choices": ["red", "red dog"], "gold": 0},
          {"query": "Q", "choices": ["red", "green"], "gold": 0}]
    write_bundle(tmp_path, [("mc", "multiple_choice", "b/mc.jsonl", 0, 50, mc)], present={"mc"})
    res = core_eval.evaluate_core(mc_model(tok), tok, str(tmp_path), "cpu")
    assert res["tasks"]["mc"]["n_repaired"] == 1 and res["n_repaired"] == 1
    assert "1 repaired where the ruler fails" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# Context length

def test_left_truncation_keeps_the_answer(tok):
    m = mc_model(tok)
    m.config.sequence_len = 32
    long_query = " ".join(["the dog sat down"] * 30) + " Q"  # ~120 tokens
    data = [{"query": long_query, "choices": ["red", "green dog mat"], "gold": 1}]
    t = task("multiple_choice", data, num_fewshot=0)
    rows, repaired = rows_of(tok, t, max_len=32)
    assert all(len(ids) == 32 for ids, _ in rows) and not repaired
    assert rows[0][0][rows[0][1]:] == tok.encode(" red") and rows[0][0][rows[0][1] - 1] == tok.encode("Q")[0]
    assert rows[1][0][rows[1][1]:] == tok.encode(" green dog mat")
    assert core_eval.evaluate_item(m, tok, t, data, 0, "cpu") == (True, False)  # the same pick as uncut
    assert max(T for _, T in m.shapes) <= 32


# -----------------------------------------------------------------------------
# Bundle loading, centering, aggregation

def write_bundle(root, tasks, present):
    """A small bundle: tasks = [(label, type, uri, shots, baseline%, records)]; only `present` files written."""
    os.makedirs(root, exist_ok=True)
    spec = [{"label": l, "icl_task_type": k, "dataset_uri": u, "num_fewshot": [s], "continuation_delimiter": " "}
            for l, k, u, s, _, _ in tasks]
    with open(os.path.join(root, "core.yaml"), "w") as f:
        yaml.safe_dump({"icl_tasks": spec}, f)
    with open(os.path.join(root, "eval_meta_data.csv"), "w") as f:
        f.write("Eval Task,Task Type,Random baseline,Description\n")
        f.writelines(f'{l},{k},{b},"a, description"\n' for l, k, _, _, b, _ in tasks)
    for l, _, uri, _, _, records in tasks:
        if l in present:
            path = os.path.join(root, "eval_data", uri)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)


def test_centered():
    assert core_eval.centered(0.62, 62) == pytest.approx(0.0)
    assert core_eval.centered(1.0, 25) == pytest.approx(1.0)
    assert core_eval.centered(0.625, 25) == pytest.approx(0.5)
    assert core_eval.centered(0.0, 50) == pytest.approx(-1.0)


def test_evaluate_core_aggregates_and_skips_missing(tok, tmp_path, capsys):
    lm = [{"context": "the cat", "continuation": "sat"}, {"context": "the dog", "continuation": "sat"}]
    mc = [{"query": "Q", "choices": ["red", "green dog mat"], "gold": 1}] * 4
    write_bundle(tmp_path, [("lm", "language_modeling", "a/lm.jsonl", 1, 0, lm),
                            ("mc", "multiple_choice", "b/mc.jsonl", 0, 50, mc),
                            ("gone", "multiple_choice", "b/gone.jsonl", 0, 25, mc)], present={"lm", "mc"})
    m = mc_model(tok)
    m.prefer(tok, " cat", " sat", 20.0)  # lm: item 0 right, item 1 wrong -> 0.5
    m.train()
    res = core_eval.evaluate_core(m, tok, str(tmp_path), "cpu")
    assert m.training  # restored
    assert res["skipped"] == ["gone"] and "gone.jsonl is missing" in capsys.readouterr().out
    assert res["tasks"]["lm"] == {"accuracy": 0.5, "centered": 0.5, "random_baseline": 0.0, "n_items": 2,
                                  "n_repaired": 0}
    assert res["tasks"]["mc"]["accuracy"] == 1.0 and res["tasks"]["mc"]["centered"] == pytest.approx(1.0)
    assert res["core"] == pytest.approx(0.75)
    assert (res["n_tasks"], res["n_total"]) == (2, 3) and res["core_label"] == "CORE over 2/3 tasks, all items"
    assert (res["rules"], res["max_per_task"]) == ("leaderboard, rev 1", None)
    sub = core_eval.evaluate_core(m, tok, str(tmp_path), "cpu", max_per_task=1)
    assert core_eval.ordered_items(lm, 1) == lm[:1]  # the one item evaluated: the right one
    assert sub["tasks"]["lm"]["n_items"] == 1 and sub["tasks"]["lm"]["accuracy"] == 1.0
    assert sub["tasks"]["lm"]["n_repaired"] == 1  # 1-shot with 1 item: no other item to show (the ruler raises)
    assert sub["core_label"] == "CORE over 2/3 tasks, seeded subset of 1 items per task" and sub["max_per_task"] == 1


def test_damaged_bundle_files_are_one_line_errors_naming_file_and_fix(tmp_path):
    mc = [{"query": "Q", "choices": ["a", "b"], "gold": 1}]
    write_bundle(tmp_path, [("mc", "multiple_choice", "b/mc.jsonl", 0, 50, mc)], present={"mc"})
    fix = "python -m scripts.base_eval --download-only"
    (tmp_path / "eval_meta_data.csv").rename(tmp_path / "meta.bak")
    with pytest.raises(core_eval.BundleError) as e:
        core_eval.load_tasks(str(tmp_path))
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'eval_meta_data.csv'}: missing;") and fix in msg and "\n" not in msg
    (tmp_path / "meta.bak").rename(tmp_path / "eval_meta_data.csv")
    (tmp_path / "core.yaml").write_text("icl_tasks: [unclosed")
    with pytest.raises(core_eval.BundleError, match=r"core\.yaml: unreadable \(ParserError") as e:
        core_eval.load_tasks(str(tmp_path))
    assert fix in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "core.yaml").unlink()
    with pytest.raises(core_eval.BundleError, match=r"core\.yaml: missing; the eval bundle .* is damaged: delete it"):
        core_eval.load_tasks(str(tmp_path))


def test_a_corrupt_task_file_is_skipped_and_labelled(tok, tmp_path, capsys):
    mc = [{"query": "Q", "choices": ["red", "green dog mat"], "gold": 1}] * 4
    write_bundle(tmp_path, [("mc", "multiple_choice", "b/mc.jsonl", 0, 50, mc),
                            ("bad", "multiple_choice", "b/bad.jsonl", 0, 25, mc)], present={"mc", "bad"})
    (tmp_path / "eval_data" / "b" / "bad.jsonl").write_text('{"query": "Q\x01 unterminated\n')
    tasks = core_eval.load_tasks(str(tmp_path))
    assert [t["problem"] for t in tasks] == [None, tasks[1]["problem"]] and tasks[1]["data"] is None
    assert tasks[1]["problem"].startswith("corrupt (")
    res = core_eval.evaluate_core(mc_model(tok), tok, str(tmp_path), "cpu")
    out = capsys.readouterr().out
    assert res["skipped"] == ["bad"] and res["skipped_why"]["bad"].startswith("corrupt (")
    assert "bad.jsonl is corrupt (" in out and "--download-only" in out
    assert res["core_label"] == "CORE over 1/2 tasks, all items"


def test_load_tasks_real_bundle_layout():
    if not os.path.isdir(BUNDLE):
        pytest.skip("shared/eval_bundle not present")
    tasks = core_eval.load_tasks(BUNDLE)
    assert len(tasks) == 22
    by = {t["label"]: t for t in tasks}
    assert by["boolq"]["random_baseline"] == 62 and by["boolq"]["num_fewshot"] == 10
    assert by["jeopardy"]["delimiter"] == "\nAnswer: " and by["winograd"]["type"] == "schema"
    assert by["squad"]["data"] is None and len(by["copa"]["data"]) == 100


# -----------------------------------------------------------------------------
# Distributed: ranks split the items and sum their counts

RANK_DATA = [{"context": "the cat", "continuation": "sat"}, {"context": "the dog", "continuation": "sat"},
             {"context": "the cat", "continuation": "sat"}, {"context": "the cat", "continuation": "mat"},
             {"context": "the cat", "continuation": "sat"}]  # right, wrong, right, wrong, right: 3/5


def rank_model(tok):
    m = Bigram(tok.vocab_size)
    m.prefer(tok, " cat", " sat", 20.0)
    return m


def _rank_worker(rank, world, rdzv, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=world)
    tok = make_tokenizer()
    m, t = rank_model(tok), task("language_modeling", RANK_DATA)
    acc, _ = core_eval.evaluate_task(m, tok, t, "cpu")
    # with a stop check the ranks agree per item (3 items on rank 0, 2 on rank 1: no hang); a
    # request seen by rank 1 only stops both
    unstopped, _ = core_eval.evaluate_task(m, tok, t, "cpu", should_stop=lambda: False)
    stopped = core_eval.evaluate_task(m, tok, t, "cpu", should_stop=lambda: rank == 1)
    torch.save((acc, unstopped, stopped), f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_rank_split_counts(tok):
    m, t = rank_model(tok), task("language_modeling", RANK_DATA)
    count = lambda rank, world, n=5: core_eval.count_correct(m, tok, t, RANK_DATA[:n], "cpu", rank, world)[0]
    assert count(0, 1) == 3 and (count(0, 2), count(1, 2)) == (3, 0)  # items 0,2,4 and 1,3
    assert count(0, 3) + count(1, 3) + count(2, 3) == 3
    assert count(0, 2, n=2) + count(1, 2, n=2) == 1  # only the items listed


def test_two_gloo_ranks_sum_to_the_whole(tmp_path):
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "rdzv"), str(tmp_path)), nprocs=2)
    assert [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)] == [(0.6, 0.6, None), (0.6, 0.6, None)]


# -----------------------------------------------------------------------------
# Smoke run on the real bundle (18 of the 22 task files are present in shared/)

@pytest.mark.skipif(not os.path.isdir(BUNDLE), reason="shared/eval_bundle not present")
def test_real_bundle_smoke(tok):
    torch.manual_seed(0)
    model = build_model(GPTConfig(sequence_len=64, vocab_size=tok.vocab_size, n_layer=1, n_head=1, n_embd=64), "cpu")
    res = core_eval.evaluate_core(model, tok, BUNDLE, "cpu", max_per_task=2)
    assert res["n_tasks"] == 18 and res["n_total"] == 22 and len(res["skipped"]) == 4
    assert set(res["skipped"]) == {"hellaswag_zeroshot", "hellaswag", "squad", "coqa"}
    assert res["core_label"] == "CORE over 18/22 tasks, seeded subset of 2 items per task"
    assert all(t["n_items"] == 2 and t["accuracy"] in (0.0, 0.5, 1.0) for t in res["tasks"].values())
    assert math.isfinite(res["core"]) and -2 < res["core"] <= 1


def test_a_stop_request_ends_core_between_items(tok, tmp_path, monkeypatch):
    lm = [{"context": "the cat", "continuation": "sat"}] * 6
    write_bundle(tmp_path, [("lm", "language_modeling", "a/lm.jsonl", 0, 0, lm),
                            ("lm2", "language_modeling", "a/lm2.jsonl", 0, 0, lm)], present={"lm", "lm2"})
    scored, original = [], core_eval.evaluate_item
    monkeypatch.setattr(core_eval, "evaluate_item", lambda *a: scored.append(a[4]) or original(*a))
    res = core_eval.evaluate_core(mc_model(tok), tok, str(tmp_path), "cpu", should_stop=lambda: len(scored) >= 2)
    assert res is None and len(scored) == 2  # gave up before the third of 12 items
