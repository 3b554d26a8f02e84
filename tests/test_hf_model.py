"""
Tests for nanochat/hf_model.py: a tiny randomly initialised GPT2LMHeadModel and a small byte-level
BPE tokenizer, built here (no download), scored by our CORE and bpb code. Skipped when
transformers is not installed (it is the optional `hf` extra).
"""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network, whatever happens
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from nanochat import core_eval, hf_model  # noqa: E402
from nanochat.cli import UserError  # noqa: E402
from scripts import base_eval  # noqa: E402
from test_core_eval import write_bundle  # noqa: E402

TEXT = "the cat sat on the mat. 42 is the answer; Q: what is six times seven? café — naïve\n\n"


def make_hf_tokenizer():
    """A GPT-2-style byte-level BPE with <|endoftext|> as its only special token."""
    tk = tokenizers.Tokenizer(tokenizers.models.BPE())
    tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([TEXT] * 50, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>",
                                                eos_token="<|endoftext|>")


def make_gpt2(vocab_size, n_positions=64):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=32, n_layer=2, n_head=2,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A model directory as save_pretrained writes it: what --hf-path loads."""
    path = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    tok = make_hf_tokenizer()
    make_gpt2(len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_adapter_logits_and_loss_equal_the_models_own(saved):
    model, tok = hf_model.load_hf_model(saved, "cpu")
    ref = transformers.AutoModelForCausalLM.from_pretrained(saved).eval()
    assert model.config.sequence_len == 64 and model.config.vocab_size == len(tok.hf) == tok.vocab_size
    idx = torch.randint(0, tok.vocab_size, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, expected = model(idx), ref(input_ids=idx).logits
        assert logits.shape == (3, 17, tok.vocab_size) and torch.equal(logits, expected)
        targets = idx.roll(-1, 1)
        targets[:, -1] = -1  # ignored, as in our loaders
        loss = model(idx, targets, loss_reduction="none")
        assert loss.shape == (51,) and (loss.view(3, 17)[:, -1] == 0).all()
        manual = F.cross_entropy(expected[:, :-1].reshape(-1, tok.vocab_size), idx[:, 1:].reshape(-1))
        assert model(idx, targets).item() == pytest.approx(manual.item(), rel=1e-6)


def test_tokenizer_adapter_uses_the_models_own_tokenizer():
    hf_tok = make_hf_tokenizer()
    tok = hf_model.HFTokenizer(hf_tok)
    eot = hf_tok.convert_tokens_to_ids("<|endoftext|>")
    assert tok.bos_token_id == eot  # GPT-2's document separator starts our rows
    text = " café — naïve 😀\n\n 42"
    assert tok.encode(text) == hf_tok.encode(text, add_special_tokens=False)
    assert tok.encode(text, prepend=eot) == [eot] + tok.encode(text)
    assert tok.encode([text, "the cat"]) == [tok.encode(text), tok.encode("the cat")]
    assert eot not in tok.encode("a<|endoftext|>b")  # text is text: never parsed into a special token
    ids = tok.enc.encode_to_numpy(text)  # the dataloader's path
    assert ids.dtype.name == "uint32" and ids.tolist() == tok.encode(text)
    assert tok.decode(tok.encode(text)) == text
    # bpb counts the bytes of the model's own tokens: they add up to the text's UTF-8 length,
    # including tokens that hold part of a multi-byte character
    nbytes = tok.token_bytes()
    assert nbytes.shape == (len(hf_tok),) and nbytes[eot] == 0
    for s in [text, TEXT, "😀😀 x"]:
        assert int(nbytes[tok.encode(s)].sum()) == len(s.encode("utf-8"))
    assert any(len(hf_tok.decode([i]).encode()) != nbytes[i] for i in tok.encode("😀"))  # decode() would miscount


def test_sentencepiece_style_token_bytes():
    vocab = [("<unk>", 0.0), ("<s>", 0.0), ("▁the", -1.0), ("▁", -2.0), ("a", -2.0), ("é", -2.0), ("<0x0A>", -3.0)]
    tk = tokenizers.Tokenizer(tokenizers.models.Unigram(vocab, unk_id=0, byte_fallback=True))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>")
    tok = hf_model.HFTokenizer(hf_tok)
    assert tok.bos_token_id == 1
    assert tok.token_bytes().tolist() == [0, 0, 4, 1, 1, 2, 1]  # "▁the" is " the"; "<0x0A>" one byte


def test_core_end_to_end_on_a_tiny_gpt2(saved, tmp_path):
    model, tok = hf_model.load_hf_model(saved, "cpu")
    lm = [{"context": "Q: what is six times seven?", "continuation": "42"},
          {"context": "the cat sat on the", "continuation": "mat."}, {"context": "café", "continuation": "naïve"}]
    mc = [{"query": "the cat sat on the", "choices": ["mat.", "answer"], "gold": 0}] * 3
    schema = [{"context_options": ["the cat", "the answer"], "continuation": "sat on the mat.", "gold": 0}] * 3
    write_bundle(tmp_path, [("lm", "language_modeling", "a/lm.jsonl", 1, 0, lm),
                            ("mc", "multiple_choice", "b/mc.jsonl", 1, 50, mc),
                            ("schema", "schema", "c/schema.jsonl", 0, 50, schema)], present={"lm", "mc", "schema"})
    res = core_eval.evaluate_core(model, tok, str(tmp_path), "cpu", max_per_task=2)
    assert res["core_label"] == "CORE over 3/3 tasks, seeded subset of 2 items per task"
    assert all(t["n_items"] == 2 and t["accuracy"] in (0.0, 0.5, 1.0) for t in res["tasks"].values())
    assert math.isfinite(res["core"])
    # an LM item scored by hand the way the leaderboard's evaluator does it: BOS + the prompt with its
    # continuation, scored after the tokens of BOS + the prompt without it; right iff greedy decoding
    # reproduces them
    task = next(t for t in core_eval.load_tasks(str(tmp_path)) if t["label"] == "lm")
    for i in range(3):
        without, full = core_eval.render_prompts(task, task["data"], i)
        ids, start = [tok.bos_token_id] + tok.encode(full), 1 + len(tok.encode(without))
        assert ids[:start] == [tok.bos_token_id] + tok.encode(without)
        assert core_eval.token_rows(tok, "language_modeling", [without, full], 64) == ([(ids, start)], False)
        with torch.no_grad():
            greedy = model(torch.tensor([ids])).argmax(-1)[0, start - 1:-1].tolist()
        assert core_eval.evaluate_item(model, tok, task, task["data"], i, "cpu") == (greedy == ids[start:], False)


def test_base_eval_hf_path(saved, base_dir, tmp_path):
    bundle = tmp_path / "bundle"
    write_bundle(bundle, [("lm", "language_modeling", "a/lm.jsonl", 0, 0,
                           [{"context": "the cat sat on the", "continuation": "mat."}] * 4)], present={"lm"})
    res = base_eval.main(["--hf-path", saved, "--eval-bundle", str(bundle), "--core-max-per-task", "3",
                          "--bpb-tokens", "128", "--device-batch-size", "2", "--device-type", "cpu"])
    out = base_dir / "hf_eval" / saved.strip("/").replace("/", "--") / "base_eval.json"
    with open(out) as f:
        saved_json = json.load(f)
    assert saved_json == json.loads(json.dumps(res))
    assert res["model"] == saved and res["step"] is None and res["samples"] == []
    assert res["rules"] == core_eval.RULES and res["max_per_task"] == 3 and res["tasks"]["lm"]["n_items"] == 3
    # bpb in the model's own tokens and bytes: an untrained model is near log2(vocab) bits per token
    assert set(res["bpb"]) == {"train", "val"} and all(1 < v < 20 for v in res["bpb"].values())


def test_bad_hf_path_is_one_line(tmp_path):
    with pytest.raises(UserError) as e:
        hf_model.load_hf_model(str(tmp_path / "no-such-model"), "cpu")
    msg = str(e.value)
    assert msg.startswith("--hf-path") and "no-such-model" in msg and "\n" not in msg
