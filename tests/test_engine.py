import pytest
import torch

from nanochat.engine import Engine, KVCache
from nanochat.gpt import GPTConfig, build_model


@pytest.fixture(scope="module")
def model():
    """A tiny model with every path switched on: random non-zero weights everywhere (smear,
    value-embedding gates, backout, output projections), and short windows on the first layers
    so that generation runs past them."""
    torch.manual_seed(0)
    cfg = GPTConfig.from_depth(4, vocab_size=64, sequence_len=64, head_dim=16)
    model = build_model(cfg, "cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    for block, window in zip(model.blocks, [3, 8, 5]):  # the last layer stays long (64)
        block.attn.window = window
    return model


class Tok:  # the Engine only needs the <|bos|> id from the tokenizer
    def __init__(self, bos):
        self.bos_token_id = bos


def new_cache(model, batch_size, max_len):
    cfg = model.config
    return KVCache(batch_size, max_len, cfg.n_layer, cfg.n_head, cfg.head_dim, "cpu", torch.float32)


@torch.no_grad()
def naive_greedy(model, tokens, n):
    """The reference: no cache, the whole sequence through the model for every new token."""
    idx = torch.tensor([tokens])
    for _ in range(n):
        next_id = model(idx)[:, -1, :].argmax(dim=-1, keepdim=True)
        idx = torch.cat([idx, next_id], dim=1)
    return idx[0, len(tokens):].tolist()


@pytest.mark.parametrize("prompt", [[7], [1, 2, 3], list(range(5, 25))])
def test_greedy_matches_full_recompute(model, prompt):
    n = 64 - len(prompt)  # up to sequence_len: the model's context
    expected = naive_greedy(model, prompt, n)
    got = [col[0] for col in Engine(model).generate(prompt, max_tokens=n, temperature=0)]
    assert got == expected
    assert len(set(got)) > 3  # not a degenerate repeat of one token


def test_prefill_and_decode_logits_match_full_forward(model):
    torch.manual_seed(1)
    idx = torch.randint(0, 64, (2, 40))
    with torch.no_grad():
        full = model(idx)
        cache = new_cache(model, 2, 40)
        chunks = [model(idx[:, :10], kv_cache=cache)]           # prefill
        chunks += [model(idx[:, t:t + 1], kv_cache=cache) for t in range(10, 30)]  # decode
        chunks.append(model(idx[:, 30:], kv_cache=cache))       # a multi-token chunk after a prefix
    assert cache.pos == 40
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-4, rtol=1e-4)
    # the smear and the windows matter: a cache that forgot the previous embedding would differ
    with torch.no_grad():
        cache = new_cache(model, 2, 40)
        model(idx[:, :10], kv_cache=cache)
        cache.prev_embed = torch.zeros_like(cache.prev_embed)
        wrong = model(idx[:, 10:11], kv_cache=cache)
    assert (wrong - full[:, 10:11]).abs().max() > 1e-2


def test_cache_is_full(model):
    cache = new_cache(model, 1, 4)
    with torch.no_grad():
        model(torch.zeros(1, 3, dtype=torch.long), kv_cache=cache)
        with pytest.raises(AssertionError, match="full"):
            model(torch.zeros(1, 2, dtype=torch.long), kv_cache=cache)


def test_sampling_reproducible_and_top_k_1_is_greedy(model):
    engine, prompt = Engine(model), [3, 1, 4]
    a = engine.generate_batch(prompt, max_tokens=20, temperature=1.0, seed=5)
    b = engine.generate_batch(prompt, max_tokens=20, temperature=1.0, seed=5)
    c = engine.generate_batch(prompt, max_tokens=20, temperature=1.0, seed=6)
    assert a == b and a != c
    greedy = naive_greedy(model, prompt, 20)
    assert engine.generate_batch(prompt, max_tokens=20, temperature=0.7, top_k=1, seed=9) == [greedy]
    assert a != [greedy]  # temperature 1 really samples
    # top_k restricts every choice to the k best under the full-recompute logits
    seq = list(prompt)
    for t in engine.generate_batch(prompt, max_tokens=10, temperature=2.0, top_k=3)[0]:
        with torch.no_grad():
            best3 = model(torch.tensor([seq]))[0, -1].topk(3).indices.tolist()
        assert t in best3
        seq.append(t)


def test_num_samples_rows_are_independent(model):
    engine, prompt = Engine(model), [9, 8, 7, 6]
    rows = engine.generate_batch(prompt, num_samples=4, max_tokens=30, temperature=1.0)
    assert len(rows) == 4 and all(len(r) == 30 for r in rows)
    assert len({tuple(r) for r in rows}) == 4  # four different samples from one shared prompt
    # each row is a proper continuation of its own tokens: greedy in a batch = greedy alone
    assert engine.generate_batch(prompt, num_samples=3, max_tokens=30, temperature=0) == \
        [naive_greedy(model, prompt, 30)] * 3


def test_stops_at_bos_and_at_cache_end(model):
    prompt = [2, 5]
    greedy = naive_greedy(model, prompt, 20)
    bos = greedy[6]
    cut = greedy.index(bos)
    engine = Engine(model, Tok(bos))
    steps = list(engine.generate(prompt, max_tokens=20, temperature=0))
    assert [s[0] for s in steps] == greedy[:cut + 1]  # stops right after sampling <|bos|>
    assert engine.generate_batch(prompt, max_tokens=20, temperature=0) == [greedy[:cut]]
    assert engine.generate_batch(prompt, max_tokens=20, temperature=0, stop_at_bos=False) == [greedy]
    # max_tokens beyond the rotary table: prompt + output fill exactly 4 × sequence_len
    out = Engine(model).generate_batch(prompt, max_tokens=10_000, temperature=0)[0]
    assert len(prompt) + len(out) == model.cos.size(1) == 4 * 64


def test_sampling_gives_up_between_prompts_at_a_stop_request(model):
    from nanochat.engine import sample_texts

    class Text(Tok):
        def encode(self, text, prepend=None):
            return [prepend, 5, 6]

        def decode(self, ids):
            return "x" * len(ids)
    asked = []
    out = sample_texts(model, Text(0), prompts=["a", "b", "c"], max_tokens=2, sampled=False,
                       should_stop=lambda: asked.append(1) or len(asked) >= 2)
    assert out is None and len(asked) == 2  # the second prompt was never sampled
    assert len(sample_texts(model, Text(0), prompts=["a", "b"], max_tokens=2, sampled=False)) == 2
