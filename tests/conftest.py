import random

import pytest

from nanochat.dataset import write_shards
from nanochat.tokenizer import Tokenizer


@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    """A base dir with tiny shards and a 300-token tokenizer: enough to train a toy model."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    rng = random.Random(0)
    words = "the of and to in is was for on that with as by at from his her an which were are".split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 80))) for _ in range(400)]
    write_shards(docs, str(tmp_path / "base_data"), docs_per_shard=200, val_docs=40, row_group_size=16)
    Tokenizer.train(iter(docs), vocab_size=300).save(str(tmp_path / "tokenizer"))
    return tmp_path
