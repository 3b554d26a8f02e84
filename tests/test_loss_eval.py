import math

import torch
import torch.nn as nn

import pytest

from nanochat.dataset import write_shards
from nanochat.loss_eval import evaluate_bpb, evaluate_split
from nanochat.tokenizer import get_tokenizer
from record_loader import CharTokenizer, record_rows


class Uniform(nn.Module):
    """Predicts every token with probability 1/V: loss ln(V) nats per target."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, x, y, loss_reduction="mean"):
        logits = torch.zeros(*x.shape, self.vocab)
        return nn.functional.cross_entropy(logits.view(-1, self.vocab), y.view(-1), ignore_index=-1,
                                           reduction=loss_reduction)


def test_bpb_of_uniform_model_by_hand():
    V = 16
    token_bytes = torch.tensor([1, 2, 3] * 5 + [0])  # token 15 is a special token (0 bytes)
    y = torch.tensor([[0, 1, 2, 15], [3, 4, -1, 5]])  # one special, one ignored target
    x = torch.zeros_like(y)
    batches = iter([(x, y), (x, y)])
    bpb = evaluate_bpb(Uniform(V), batches, 2, token_bytes)
    counted = [0, 1, 2, 3, 4, 5]  # the special and the ignored target count neither loss nor bytes
    nbytes = sum(token_bytes[t].item() for t in counted)
    assert math.isclose(bpb, 2 * len(counted) * math.log(V) / (math.log(2) * 2 * nbytes), rel_tol=1e-6)  # fp32 losses


class Recorder(Uniform):
    """Uniform, and remembers every input row it was shown."""

    def __init__(self, vocab):
        super().__init__(vocab)
        self.rows = []

    def forward(self, x, y, loss_reduction="mean"):
        self.rows += x.tolist()
        return super().forward(x, y, loss_reduction)


def whole_docs(rows, bos):
    """The documents that lie complete inside rows (between two BOS tokens of one row)."""
    docs = []
    for row in rows:
        starts = [i for i, t in enumerate(row) if t == bos]
        docs += [tuple(row[a:b]) for a, b in zip(starts, starts[1:])]
    return docs


class Bigram(nn.Module):
    """Random next-token logits per current token: which tokens are scored changes the bpb."""

    def __init__(self, vocab):
        super().__init__()
        self.table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0))

    def forward(self, x, y, loss_reduction="mean"):
        logits = self.table[x]
        return nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction=loss_reduction)


def record_bpb(model, rows, token_bytes):
    """The record's bpb function over its loader's rows: nats of targets with bytes, over those bytes."""
    t = torch.tensor(rows)
    x, y = t[:, :-1], t[:, 1:]
    loss = model(x, y, loss_reduction="none").view(-1)
    nbytes = token_bytes[y.reshape(-1)]
    return (loss * (nbytes > 0)).sum().item() / (math.log(2) * nbytes.sum().item())


def test_val_bpb_equals_the_records_loader_and_bpb_function(tmp_path, capsys):
    # a val split of 1,200 documents (~62K tokens) in row groups of 128; budgets of part of it and of
    # about twice it: the record reads the split again from its start, and so do we
    import random
    rng = random.Random(1)
    val = ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 100))) for _ in range(1200)]
    write_shards(val + ["train"] * 4, str(tmp_path), docs_per_shard=4, val_docs=1200, row_group_size=128)
    tok, model, B, T = CharTokenizer(), Bigram(256), 4, 63
    groups = [val[i:i + 128] for i in range(0, 1200, 128)]
    for budget, repeats in [(10 * B * T + 17, False), (480 * B * T, True)]:
        bpb, scored = evaluate_split(model, tok, "val", budget, B, T, "cpu", data_dir=str(tmp_path))
        steps = budget // (B * T)
        assert scored == steps * B * T
        assert bpb == pytest.approx(record_bpb(model, record_rows(groups, 0, 1, T, steps * B), tok.token_bytes()),
                                    abs=1e-5)
        assert ("read again from the start" in capsys.readouterr().out) == repeats


def test_a_split_larger_than_asked_scores_what_was_asked(base_dir):
    tok = get_tokenizer()
    _, tokens = evaluate_split(Uniform(tok.vocab_size), tok, "val", 64 * 5, 2, 32, "cpu")
    assert tokens == 64 * 5


# ---------------------------------------------------------------------------------------------
# A val split with fewer row groups than ranks (a small local corpus on many GPUs)


import torch.distributed as dist  # noqa: E402

from nanochat.dataloader import DataLoader  # noqa: E402
from nanochat.gpt import GPTConfig, build_model  # noqa: E402
from conftest import write_tiny_base  # noqa: E402
from optim_toy import spawn_gloo  # noqa: E402

B, T = 2, 32


@pytest.fixture
def one_row_group_val(tmp_path, monkeypatch):
    """Tiny shards whose val split (40 documents) is ONE row group, and a 300-token tokenizer."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    return write_tiny_base(tmp_path, n_docs=200, docs_per_shard=160, row_group_size=64)


def split_bpb(rank, world, tokens):
    torch.manual_seed(0)  # the same weights on every rank
    tokenizer = get_tokenizer()
    model = build_model(GPTConfig(sequence_len=T, vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_embd=32), "cpu")
    return [evaluate_split(model, tokenizer, "val", n, B, T, "cpu", rank, world) for n in tokens]


def _bpb_worker(rank, world, rdzv, out_dir, tokens):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=world)
    torch.save(split_bpb(rank, world, tokens), f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_a_rank_without_val_row_group_scores_nothing_and_bpb_is_right(one_row_group_val, tmp_path, capsys):
    # the training stream refuses an empty rank; evaluation lets it contribute zeros
    with pytest.raises(ValueError, match="data stream 1 of 2 gets no row group of the 'val' shards"):
        DataLoader(get_tokenizer(), B, T, "val", rank=1, world_size=2)
    assert list(DataLoader(get_tokenizer(), B, T, "val", rank=1, world_size=2, allow_empty=True)) == []
    # each rank scores tokens // (B × T × 2) batches: rank 0 the batches one process scores for half the
    # tokens (its stream is the same: the one row group, read again when used up), rank 1 none
    (tmp_path / "two").mkdir()
    two = spawn_gloo(_bpb_worker, 2, tmp_path / "two", [6 * B * T, 80 * B * T])
    one = split_bpb(0, 1, [3 * B * T, 40 * B * T])
    assert one[0][1] == 3 * B * T and one[1][1] == 40 * B * T
    for r in two:  # both ranks get the all-reduced result, equal to one process's
        assert r == one, (r, one)


def test_a_stop_request_ends_the_evaluation_before_the_next_batch():
    V, served, asked = 16, [], []
    token_bytes = torch.ones(V, dtype=torch.long)

    def batches():
        for i in range(10):
            served.append(i)
            yield torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long)

    def should_stop():
        asked.append(len(served))
        return len(served) >= 3  # the request arrives while the third batch is loaded
    bpb, tokens = evaluate_bpb(Uniform(V), batches(), 10, token_bytes, return_tokens=True, should_stop=should_stop)
    assert bpb is None and served == [0, 1, 2] and tokens == 8  # two batches scored, the third given up
    assert asked == [1, 2, 3]  # asked before every batch
    assert evaluate_bpb(Uniform(V), batches(), 2, token_bytes, should_stop=lambda: False) == \
        evaluate_bpb(Uniform(V), batches(), 2, token_bytes)  # no request: the same number


def _bpb_rank_worker(rank, world, rdzv, out_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=world)
    token_bytes = torch.ones(16, dtype=torch.long)
    batch = (torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long))
    shares = [3, 1]  # uneven: rank 1's share runs out first and must keep answering, not hang
    plain = evaluate_bpb(Uniform(16), iter([batch] * shares[rank]), 5, token_bytes, return_tokens=True)
    checked = evaluate_bpb(Uniform(16), iter([batch] * shares[rank]), 5, token_bytes, return_tokens=True,
                           should_stop=lambda: False)
    stopped = evaluate_bpb(Uniform(16), iter([batch] * shares[rank]), 5, token_bytes, should_stop=lambda: rank == 1)
    torch.save((plain, checked, stopped), f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_ranks_agree_on_a_stop_request_with_uneven_shares(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_bpb_rank_worker, args=(2, str(tmp_path / "rdzv"), str(tmp_path)), nprocs=2)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    bpb = 4 * math.log(16) / (math.log(2) * 4)  # uniform over 16 tokens of 1 byte: 4 bits per byte
    for plain, checked, stopped in results:
        assert plain == checked and plain[1] == 16 and math.isclose(plain[0], bpb, rel_tol=1e-6)
        assert stopped is None  # the request reached rank 1 only: both gave up
