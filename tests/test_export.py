"""
scripts.export: a tiny trained model exported as a Hugging Face directory and loaded back with
transformers: the same logits, token ids, greedy tokens and CORE. Needs the `hf` extra
(pip install -e '.[dev,hf]'); skipped without it.
"""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from nanochat import core_eval, hf_model  # noqa: E402
from nanochat.checkpoint import get_run_dir, load_model, step_dir  # noqa: E402
from nanochat.cli import UserError  # noqa: E402
from nanochat.engine import Engine  # noqa: E402
from nanochat.tokenizer import get_tokenizer  # noqa: E402
from scripts import base_train, export  # noqa: E402
from test_dataset import DEMO_TASKS  # noqa: E402

# short windows of 128 under a 256-token context: the export must honour them
TINY = ["--depth", "2", "--head-dim", "16", "--max-seq-len", "256", "--window-pattern", "SSSL", "--device-batch-size",
        "2", "--total-batch-size", "512", "--num-iterations", "3", "--eval-every", "0", "--core-every", "0",
        "--sample-every", "0", "--device-type", "cpu", "--model-tag", "x"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    base = tmp_path_factory.mktemp("base")
    mp = pytest.MonkeyPatch()
    mp.setenv("NANOCHAT_BASE_DIR", str(base))
    from conftest import write_tiny_base
    write_tiny_base(base)
    base_train.main(TINY)
    out = str(base / "x-hf")
    assert export.main(["--model-tag", "x", "--out", out]) == 0
    yield out
    mp.undo()


def test_logits_tokens_and_generation_round_trip(exported):
    tok = get_tokenizer()
    ours, _ = load_model(get_run_dir("x"), "cpu", tokenizer=tok)
    ours.eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True)
    hf_tok = transformers.AutoTokenizer.from_pretrained(exported)
    text = "def f(x):\n    return x ** 2  # 12345, 3.14 naïve café 🎉 “quotes”\n\tthe cat  sat"
    assert hf_tok(text, add_special_tokens=False).input_ids == tok.encode(text)
    assert hf_tok(text).input_ids == tok.encode(text, prepend=tok.bos_token_id)  # BOS first, as in training
    assert hf_tok.decode(tok.encode(text)) == text
    idx = torch.tensor([tok.encode(text * 10, prepend=tok.bos_token_id)[:300]])  # past the 128-token window
    assert idx.size(1) == 300
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx), atol=1e-5, rtol=0)
    greedy = hf.generate(idx[:, :40], max_new_tokens=10, do_sample=False)[0, 40:].tolist()
    assert greedy == Engine(ours, tok).generate_batch(idx[0, :40].tolist(), max_tokens=10, temperature=0,
                                                      stop_at_bos=False)[0]


def test_core_through_hf_path_equals_the_native_core(exported):
    tok = get_tokenizer()
    ours, _ = load_model(get_run_dir("x"), "cpu", tokenizer=tok)
    bundle = "nanochat/demo_data/eval_bundle"
    native = core_eval.evaluate_core(ours, tok, bundle, "cpu", max_per_task=4)
    model, hf_tok = hf_model.load_hf_model(exported, "cpu")
    via_hf = core_eval.evaluate_core(model, hf_tok, bundle, "cpu", max_per_task=4)
    assert len(native["tasks"]) == DEMO_TASKS
    assert {k: v["accuracy"] for k, v in via_hf["tasks"].items()} == {k: v["accuracy"] for k, v in native["tasks"].items()}


def test_the_directory_says_what_it_is(exported):
    config = json.load(open(f"{exported}/config.json"))
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_nanochat.NanochatForCausalLM"
    assert config["window_pattern"] == "SSSL" and config["nanochat_checkpoint"] == step_dir(get_run_dir("x"), 3)
    card = open(f"{exported}/README.md").read()
    assert "python -m scripts.base_train --depth 2" in card and "nanochat commit:" in card
    assert "import nanochat" not in open(f"{exported}/modeling_nanochat.py").read()  # works without this repo


def test_a_checkpoint_it_cannot_represent_is_refused(exported, tmp_path):
    meta_path = f"{step_dir(get_run_dir('x'), 3)}/meta.json"
    meta = json.load(open(meta_path))
    json.dump({**meta, "model_config": {**meta["model_config"], "n_kv_head": 1}}, open(meta_path, "w"))
    try:
        with pytest.raises(UserError, match="settings the exported model does not know \\(n_kv_head\\)"):
            export.main(["--model-tag", "x", "--out", str(tmp_path / "bad")])
        assert not (tmp_path / "bad").exists()
    finally:
        json.dump(meta, open(meta_path, "w"))
