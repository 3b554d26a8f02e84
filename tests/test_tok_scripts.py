import os

import pytest

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
