"""
Fast sampling with a KV cache.

Sampling by running the model on the whole sequence for every new token costs O(T²) work per
token (tests/test_engine.py keeps such a naive loop as the reference). Here the prompt goes through the model once (the "prefill"), every layer's keys and values are kept
in a cache, and each later step feeds only the newest token (the "decode"), whose query attends
over the cached keys. What the cache must carry, besides k and v:
- the position: rotary angles of new tokens start at `pos`, not 0 (GPT.forward offsets them)
- the previous token's normalized embedding, for the smear of the first new token
Sliding windows need nothing extra: attention() applies them to the full cached k, v.

    engine = Engine(model, tokenizer)
    for column in engine.generate(prompt_tokens, num_samples=4, max_tokens=64):
        ...  # column[i] is sample i's next token
"""
import torch
import torch.nn.functional as F


class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated to max_len.

    One model forward over T new tokens = one update() per layer (all writing at the same
    `pos`), then GPT.forward advances `pos` by T after the last layer."""

    def __init__(self, batch_size, max_len, n_layer, n_head, head_dim, device, dtype):
        shape = (n_layer, batch_size, max_len, n_head, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0             # number of tokens already stored
        self.prev_embed = None   # (B, 1, C): norm(wte(last token)), before smear; set by GPT.forward

    def update(self, layer, k, v):
        """Store k, v (B, T, H, D) of `layer` at pos; return that layer's keys and values of all
        tokens so far, (B, pos + T, H, D)."""
        end = self.pos + k.size(1)
        assert end <= self.max_len, f"KV cache full ({self.max_len} tokens)"
        self.k[layer, :, self.pos:end] = k
        self.v[layer, :, self.pos:end] = v
        return self.k[layer, :, :end], self.v[layer, :, :end]


def sample_next(logits, rng, temperature=1.0, top_k=None):
    """Next token ids (B, 1) from last-position logits (B, V). temperature 0 = greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    if top_k is not None:
        # sample among the k best only, then map the choice back to vocabulary ids
        values, ids = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1)
        choice = torch.multinomial(F.softmax(values / temperature, dim=-1), 1, generator=rng)
        return ids.gather(-1, choice)
    return torch.multinomial(F.softmax(logits / temperature, dim=-1), 1, generator=rng)


class Engine:
    def __init__(self, model, tokenizer=None):
        self.model = model
        # a sampled <|bos|> means the model has started a new document: the sample is over
        self.bos = getattr(tokenizer, "bos_token_id", None)

    @torch.inference_mode()
    def generate(self, tokens, num_samples=1, max_tokens=256, temperature=1.0, top_k=None, seed=42,
                 stop_at_bos=True):
        """Continue the prompt `tokens` (list of ids) num_samples times in parallel. Yields, per
        step, a list of num_samples next tokens. Stops after max_tokens steps, when prompt +
        generated tokens fill the cache (at most the model's rotary table, 4× sequence_len), or
        when every sample has produced <|bos|> (if stop_at_bos)."""
        model, cfg = self.model, self.model.config
        if max_tokens < 1:
            return
        device = model.wte.weight.device
        max_len = min(len(tokens) + max_tokens, model.cos.size(1))
        assert 0 < len(tokens) < max_len, f"prompt of {len(tokens)} tokens does not fit in {max_len}"
        # activations (and so k, v) run in the embedding table's dtype: bf16 on GPU, fp32 on CPU
        cache = KVCache(num_samples, max_len, cfg.n_layer, cfg.n_head, cfg.head_dim,
                        device, model.wte.weight.dtype)
        rng = torch.Generator(device=device).manual_seed(seed)
        # prefill: the same prompt in every row (simple; the prompt is cheap next to the decode)
        idx = torch.tensor([tokens], dtype=torch.long, device=device).expand(num_samples, -1)
        logits = model(idx, kv_cache=cache)[:, -1, :]
        done = [False] * num_samples
        while True:
            next_ids = sample_next(logits, rng, temperature, top_k)  # (B, 1)
            column = next_ids[:, 0].tolist()
            yield column
            if stop_at_bos and self.bos is not None:
                done = [d or t == self.bos for d, t in zip(done, column)]
            # the sequence is now pos + 1 tokens long; the newest one is not in the cache yet
            if all(done) or cache.pos + 1 >= max_len:
                return
            logits = model(next_ids, kv_cache=cache)[:, -1, :]  # decode: one new token per row

    def generate_batch(self, tokens, num_samples=1, stop_at_bos=True, **kwargs):
        """Run generate() to the end and return each sample's completion (list of ids), cut
        before its first <|bos|> when stop_at_bos."""
        completions = [[] for _ in range(num_samples)]
        finished = [False] * num_samples
        for column in self.generate(tokens, num_samples, stop_at_bos=stop_at_bos, **kwargs):
            for i, t in enumerate(column):
                finished[i] = finished[i] or (stop_at_bos and t == self.bos)
                if not finished[i]:
                    completions[i].append(t)
        return completions


SAMPLE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is",
                  "If yesterday was Friday, then tomorrow will be", "The opposite of hot is",
                  "The planets of the solar system are:", "My favorite color is"]


def sample_texts(model, tokenizer, prompts=SAMPLE_PROMPTS, max_tokens=24, sampled=True, should_stop=None):
    """A greedy continuation of each prompt (and, with sampled, one at temperature 1, top-50):
    what training and evaluation print so a person can see what the model has learned.
    should_stop: a callable checked before each prompt; None as soon as it is true."""
    engine = Engine(model, tokenizer)
    modes = [("greedy", 0, None)] + ([("t=1.0 top-50", 1.0, 50)] if sampled else [])
    out = []
    for prompt in prompts:
        if should_stop is not None and should_stop():
            return None
        tokens = tokenizer.encode(prompt, prepend=tokenizer.bos_token_id)
        for name, temperature, top_k in modes:
            ids = engine.generate_batch(tokens, max_tokens=max_tokens, temperature=temperature, top_k=top_k)[0]
            out.append(f"[{name}] {prompt}{tokenizer.decode(ids)}")
    return out
