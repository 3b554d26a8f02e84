"""
Take a model out of the repo: a directory that Hugging Face transformers loads, so a trained model
can be shared and evaluated with the tools its readers already use (transformers, lm-evaluation-harness).

    model.safetensors       the weights, under nanochat's own names
    config.json             the architecture, with auto_map pointing at
    modeling_nanochat.py    the model for AutoModelForCausalLM (standalone: torch and transformers only)
    tokenizer.json          the tokenizer for AutoTokenizer: our BPE ranks as merges, our split regex,
    tokenizer_config.json   <|bos|> as BOS (and prepended by default, as the model was trained)
    README.md               a model card: how it was trained and what it scored, with the rules

Needs the `hf` extra (pip install -e '.[hf]') for the tokenizers and safetensors libraries.
"""
import json
import os
import shutil
import tempfile

import torch

from nanochat.checkpoint import check_tokenizer, load_meta, load_weights, step_dir
from nanochat.cli import BadInput, Unavailable
from nanochat.common import fsync_path
from nanochat.report import git, read_json, read_metrics
from nanochat.tokenizer import SPECIAL_TOKENS, byte_level_alphabet

MODELING = os.path.join(os.path.dirname(os.path.abspath(__file__)), "modeling_nanochat.py")
# the architecture settings modeling_nanochat.py implements: a checkpoint with any other is refused
KNOWN_CONFIG = {"sequence_len", "vocab_size", "n_layer", "n_head", "n_embd", "window_pattern"}


def bpe_merges(ranks):
    """The merges that rebuild tiktoken's ranks: each multi-byte token, in rank order, is the one
    pair that byte-pair encoding with only the lower-ranked tokens leaves of it."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:  # merge the lowest-ranked adjacent pair, as encoding does
            pairs = [(ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            best, i = min(pairs)
            if best >= rank:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        merges.append((parts[0], parts[1]))
    return merges


def hf_tokenizer(tokenizer):
    """Our tokenizer as a transformers PreTrainedTokenizerFast: the same split regex, the same merges
    (tiktoken's rule that a whole piece found in the vocabulary is one token: ignore_merges), the
    specials at the same ids, and BOS prepended by default."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    chars = byte_level_alphabet()
    text = lambda b: "".join(chars[x] for x in b)  # noqa: E731
    ranks = tokenizer.enc._mergeable_ranks
    vocab = {text(b): rank for b, rank in ranks.items()}
    merges = [(text(a), text(b)) for a, b in bpe_merges(ranks)]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tokenizer.enc._pat_str), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokenizer.enc._special_tokens])
    assert tok.token_to_id("<|bos|>") == tokenizer.bos_token_id
    tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B",
                                                       special_tokens=[("<|bos|>", tokenizer.bos_token_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|bos|>",
                                   additional_special_tokens=SPECIAL_TOKENS[1:])


def representable(meta, state):
    """Refuse a checkpoint modeling_nanochat.py cannot represent: it would load, and be wrong."""
    config = meta["model_config"]
    unknown = set(config) - KNOWN_CONFIG
    if unknown or set(config["window_pattern"]) - set("SL"):
        raise BadInput(f"the checkpoint's model has settings the exported model does not know "
                       f"({', '.join(sorted(unknown)) or 'window pattern ' + config['window_pattern']}): "
                       f"extend nanochat/modeling_nanochat.py first")
    from nanochat.modeling_nanochat import NanochatConfig, NanochatForCausalLM
    with torch.device("meta"):
        expected = NanochatForCausalLM(NanochatConfig(**config)).state_dict()
    shapes = lambda sd: {k: tuple(v.shape) for k, v in sd.items()}  # noqa: E731
    if shapes(expected) != shapes(state):
        diff = sorted(set(shapes(expected).items()) ^ set(shapes(state).items()))[:3]
        raise BadInput(f"the checkpoint's weights do not match modeling_nanochat.py (first differences: {diff}): "
                       f"extend the modeling file first")
    return config


def model_card(run_dir, meta):
    """README.md: what the model is, how it was trained, what it scored and by which rules."""
    cfg = read_json(os.path.join(run_dir, "config.json")) or {}
    ev = read_json(os.path.join(run_dir, "base_eval.json")) or {}
    final = (read_metrics(os.path.join(run_dir, "metrics.jsonl")).get("final") or [{}])[-1]
    c = meta["model_config"]
    core = f"{ev['core']:.4f} ({ev.get('core_label')}, rules: {ev.get('rules')})" if ev.get("core") is not None \
        else "not measured (run python -m scripts.base_eval first)"
    val = (ev.get("bpb") or {}).get("val", final.get("val_bpb"))
    val_tokens = (ev.get("bpb_tokens") or {}).get("val", final.get("tokens_scored"))
    return "\n".join([
        "---", "library_name: transformers", "tags: [nanochat]", "---", "",
        f"# nanochat d{c['n_layer']}", "",
        f"A {c['n_layer']}-layer, {c['n_embd']}-wide GPT trained from scratch with nanochat, step {meta['step']:,}.",
        "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)",
        "tokenizer = AutoTokenizer.from_pretrained(DIR)  # prepends <|bos|>, as in training", "```", "",
        f"- training command: `{cfg.get('command', 'not recorded')}`",
        f"- tokens: {cfg.get('tokens', 0):,} ({cfg.get('num_iterations', '?')} steps of {cfg.get('total_batch_size', '?')})",
        f"- val bpb: {'n/a' if val is None else f'{val:.4f}'}"
        + (f" over {val_tokens:,} tokens" if val_tokens else "") + f" (data: {cfg.get('val_data')})",
        f"- CORE: {core}",
        f"- nanochat commit: {git('rev-parse', 'HEAD') or 'unknown'}", ""])


def export(run_dir, out_dir, tokenizer, step=None):
    """Write the directory, whole or not at all (a temp dir renamed into place). Returns out_dir."""
    try:
        import safetensors.torch
        import transformers  # noqa: F401 (the tokenizer and the config need it)
    except ImportError:
        raise Unavailable("exporting needs transformers: pip install -e '.[hf]'") from None
    meta = load_meta(run_dir, step)
    check_tokenizer(run_dir, tokenizer, meta)
    state = load_weights(run_dir, meta["step"], "cpu")
    config = representable(meta, state)
    previous = read_json(os.path.join(out_dir, "config.json"))
    if os.path.exists(out_dir) and (os.listdir(out_dir) and (previous or {}).get("model_type") != "nanochat"):
        raise BadInput(f"--out {out_dir}: exists and is not an earlier export: give a new directory")
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export.", dir=parent)
    try:
        safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(tmp, "model.safetensors"),
                                    metadata={"format": "pt"})
        shutil.copy(MODELING, os.path.join(tmp, "modeling_nanochat.py"))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump({**config, "model_type": "nanochat", "architectures": ["NanochatForCausalLM"],
                       "auto_map": {"AutoConfig": "modeling_nanochat.NanochatConfig",
                                    "AutoModelForCausalLM": "modeling_nanochat.NanochatForCausalLM"},
                       "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.bos_token_id,
                       "max_position_embeddings": config["sequence_len"], "use_cache": False,
                       "nanochat_checkpoint": step_dir(run_dir, meta["step"])}, f, indent=2)
        hf_tokenizer(tokenizer).save_pretrained(tmp)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(model_card(run_dir, meta))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; an export is meant to be shared
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), 0o644)
        fsync_path(tmp)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
