import json
import os

import pytest

from nanochat.checkpoint import checkpoints_using
from nanochat.dataset import write_shards
from nanochat.tokenizer import get_tokenizer
from scripts import tok_eval, tok_train

GPT2_FILE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "tokenizers", "gpt2.tiktoken")


@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "no-cache"))
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu 12 345 6789".split()
    docs = [" ".join(words[(i * j) % len(words)] for j in range(40 + i % 30)) + f" doc{i}" for i in range(400)]
    write_shards(docs, str(tmp_path / "base_data"), docs_per_shard=200, val_docs=50, row_group_size=64)
    return tmp_path


def test_tok_train_saves_requested_vocab(base_dir, capsys):
    tok_train.main(["--vocab-size", "300", "--max-chars", "20000"])
    assert get_tokenizer().vocab_size == 300
    assert "saved to" in capsys.readouterr().out


def test_vocab_size_below_the_minimum_is_refused_in_both_places(base_dir, capsys):
    from nanochat.tokenizer import MIN_VOCAB_SIZE, SPECIAL_TOKENS, Tokenizer
    assert MIN_VOCAB_SIZE == 256 + len(SPECIAL_TOKENS)
    with pytest.raises(SystemExit) as exc:  # on the command line: a usage error, before any text is read
        tok_train.main(["--vocab-size", str(MIN_VOCAB_SIZE - 1)])
    assert exc.value.code == 2
    assert capsys.readouterr().err == (f"python -m scripts.tok_train: error: --vocab-size {MIN_VOCAB_SIZE - 1}: "
                                       f"must be >= {MIN_VOCAB_SIZE} (256 byte tokens + {len(SPECIAL_TOKENS)} "
                                       f"specials) (see --help)\n")
    with pytest.raises(ValueError, match=f"need at least {MIN_VOCAB_SIZE} "):
        Tokenizer.train(iter(["some text"]), MIN_VOCAB_SIZE - 1)
    assert Tokenizer.train(iter(["ab ab ab"]), MIN_VOCAB_SIZE).vocab_size == MIN_VOCAB_SIZE


def test_tok_train_caps_documents(base_dir):
    texts = list(tok_train.capped_texts(max_chars=1000, doc_cap=50))
    assert all(len(t) <= 50 for t in texts) and 1000 <= sum(map(len, texts)) < 1050


@pytest.mark.skipif(not os.path.exists(GPT2_FILE), reason="shared/tokenizers/gpt2.tiktoken not present")
def test_tok_eval_table(base_dir, capsys):
    tok_train.main(["--vocab-size", "300"])
    counts = tok_eval.main(["--gpt2", GPT2_FILE])
    out = capsys.readouterr().out
    assert set(counts) == {"ours", "gpt2"}
    assert counts["gpt2"]["val"] > 0 and counts["ours"]["train"] > counts["gpt2"]["train"]  # 300 < 50257 vocab
    assert "cl100k" in out and "skipped" in out  # no offline copy: said, not crashed


def test_tok_eval_missing_reference_file_names_flag(base_dir):
    tok_train.main(["--vocab-size", "300"])
    with pytest.raises(FileNotFoundError, match="--gpt2 /nope"):
        tok_eval.main(["--gpt2", "/nope"])


def checkpoint_with(base_dir, tag, meta):
    d = base_dir / "base_checkpoints" / tag / "step_000007"
    d.mkdir(parents=True)
    (d / "meta.json").write_text(json.dumps({"step": 7, **meta}))
    return d


def test_tok_train_refuses_to_replace_the_tokenizer_of_a_checkpoint(base_dir):
    tok_train.main(["--vocab-size", "300", "--max-chars", "20000"])
    tok = get_tokenizer()
    path = base_dir / "tokenizer" / "tokenizer.json"
    before = path.read_bytes()
    d = checkpoint_with(base_dir, "d4", {"model_config": {"vocab_size": 300}, "tokenizer": tok.fingerprint()})
    with pytest.raises(ValueError) as exc:
        tok_train.main(["--vocab-size", "300", "--max-chars", "10000"])
    assert str(exc.value) == (f"{path} is the tokenizer of checkpoint {d}; retraining it would make that model "
                              f"unusable: use another NANOCHAT_BASE_DIR, delete the tokenizer and its checkpoints "
                              f"deliberately, or pass --force")
    assert path.read_bytes() == before
    tok_train.main(["--vocab-size", "300", "--max-chars", "10000", "--force"])  # deliberately
    assert get_tokenizer().fingerprint() != tok.fingerprint()


def test_tok_train_ignores_checkpoints_of_other_tokenizers(base_dir):
    tok_train.main(["--vocab-size", "300", "--max-chars", "20000"])
    checkpoint_with(base_dir, "other", {"model_config": {"vocab_size": 300}, "tokenizer": "0123456789abcdef"})
    checkpoint_with(base_dir, "old-vocab", {"model_config": {"vocab_size": 512}})  # no fingerprint, other vocab
    tok_train.main(["--vocab-size", "300", "--max-chars", "10000"])
    assert len(checkpoints_using(get_tokenizer())) == 0
    checkpoint_with(base_dir, "old", {"model_config": {"vocab_size": 300}})  # no fingerprint: assume it is ours
    with pytest.raises(ValueError, match="base_checkpoints/old/step_000007"):
        tok_train.main(["--vocab-size", "300", "--max-chars", "20000"])
