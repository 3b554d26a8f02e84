import random

import pytest

from nanochat.cli import run
from nanochat.dataset import write_shards
from nanochat.tokenizer import Tokenizer


def write_tiny_base(path, n_docs=400, docs_per_shard=200, val_docs=40, row_group_size=16):
    """Tiny shards of word soup and a 300-token tokenizer under `path`: enough to train a toy model."""
    rng = random.Random(0)
    words = "the of and to in is was for on that with as by at from his her an which were are".split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 80))) for _ in range(n_docs)]
    write_shards(docs, str(path / "base_data"), docs_per_shard=docs_per_shard, val_docs=val_docs,
                 row_group_size=row_group_size)
    Tokenizer.train(iter(docs), vocab_size=300).save(str(path / "tokenizer"))
    return path


@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    """A base dir (NANOCHAT_BASE_DIR) with write_tiny_base's shards and tokenizer."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    return write_tiny_base(tmp_path)


def error_line(main, argv, capsys):
    """The one `error:` line a command prints for a user's mistake, after checking that it exits 1
    with that line alone on stderr (no traceback)."""
    assert run(main, argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err.strip()
