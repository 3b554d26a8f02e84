import math

import torch
import torch.nn as nn

from nanochat.dataset import iter_documents
from nanochat.loss_eval import evaluate_bpb, evaluate_split
from nanochat.tokenizer import get_tokenizer


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


def test_asking_for_more_tokens_than_the_split_holds_scores_it_once(base_dir, capsys):
    tok = get_tokenizer()
    split_tokens = sum(len(ids) + 1 for ids in tok.encode(list(iter_documents("val"))))  # +1: each doc's BOS
    model = Recorder(tok.vocab_size)
    asked = 256 * 30  # 30 batches of 2x128 (rows longer than most documents): about three times the split
    assert split_tokens < asked / 2
    bpb, _ = evaluate_split(model, tok, "val", asked, 2, 128, "cpu")
    docs = whole_docs(model.rows, tok.bos_token_id)
    assert len(docs) > 20 and len(set(docs)) == len(docs)  # no document scored twice
    assert len(model.rows) * 128 <= split_tokens
    assert "note: the val split holds only" in capsys.readouterr().out
    model.rows = []
    bpb2, tokens = evaluate_split(model, tok, "val", asked, 2, 128, "cpu")
    assert tokens == len(model.rows) * 128 and bpb2 == bpb  # the tokens reported are those scored
    assert split_tokens * 0.5 < tokens <= split_tokens  # most of the split (crops and the last partial batch go)


def test_a_split_larger_than_asked_scores_what_was_asked(base_dir):
    tok = get_tokenizer()
    _, tokens = evaluate_split(Uniform(tok.vocab_size), tok, "val", 64 * 5, 2, 32, "cpu")
    assert tokens == 64 * 5


# ---------------------------------------------------------------------------------------------
# A val split with fewer row groups than ranks (a small local corpus on many GPUs)


import pytest  # noqa: E402
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


def test_a_rank_without_val_row_group_scores_nothing_and_bpb_is_right(one_row_group_val, tmp_path):
    # the training stream still refuses an empty rank; evaluation lets it contribute zeros
    with pytest.raises(ValueError, match="data stream 1 of 2 gets no row group of the 'val' shards"):
        DataLoader(get_tokenizer(), B, T, "val", rank=1, world_size=2)
    assert list(DataLoader(get_tokenizer(), B, T, "val", rank=1, world_size=2, one_pass=True)) == []
    tokens = [3 * B * T, 10 ** 6]  # part of the split (rank 0 scores all 3 batches itself), and all of it
    one = split_bpb(0, 1, tokens)
    (tmp_path / "two").mkdir()
    two = spawn_gloo(_bpb_worker, 2, tmp_path / "two", tokens)
    assert one[0][1] == 3 * B * T and one[1][1] > one[0][1]  # scored 3 batches, then the whole split
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
