"""scripts/sample.py: a completion streamed through the KV-cache engine from a saved checkpoint."""
import dataclasses
import io

import pytest
import torch

from nanochat.checkpoint import get_run_dir, save_checkpoint
from nanochat.engine import Engine
from nanochat.gpt import GPTConfig, build_model
from nanochat.tokenizer import get_tokenizer
from scripts import sample
from conftest import error_line


@pytest.fixture
def run(base_dir):
    """A tiny untrained checkpoint 'tiny' at step 3, next to the conftest tokenizer."""
    tok = get_tokenizer()
    torch.manual_seed(0)
    cfg = GPTConfig(sequence_len=64, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=64)
    model = build_model(cfg, "cpu")
    save_checkpoint(get_run_dir("tiny"), 3, model, None, meta={"model_config": dataclasses.asdict(cfg)},
                    loader_states=[])
    return model, tok


def test_greedy_stream_equals_engine(run, capsys):
    model, tok = run
    sample.main(["--prompt", "the question", "--temperature", "0", "--max-tokens", "12", "--device-type", "cpu"])
    out = capsys.readouterr().out
    ids = Engine(model, tok).generate_batch(tok.encode("the question", prepend=tok.bos_token_id),
                                            max_tokens=12, temperature=0)[0]
    assert out == "the question" + tok.decode(ids) + "\n"  # the streamed text is the whole completion, once


def test_several_samples_seeded(run, capsys):
    args = ["--model-tag", "tiny", "--step", "3", "--prompt", "to be", "--num-samples", "3", "--seed", "7",
            "--max-tokens", "8", "--device-type", "cpu"]
    sample.main(args)
    first = capsys.readouterr().out
    sample.main(args)
    assert capsys.readouterr().out == first  # same seed, same samples
    assert [line for line in first.splitlines() if line.startswith("--- sample")] == \
        ["--- sample 1", "--- sample 2", "--- sample 3"]


def test_interactive_loop_reads_prompts_until_empty_line(run, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("the\nof and\n\nnever read\n"))
    sample.main(["-i", "--max-tokens", "4", "--temperature", "0", "--device-type", "cpu"])
    out = capsys.readouterr().out
    assert out.count("> ") == 3 and "the" in out and "of and" in out and "never read" not in out


@pytest.mark.parametrize("argv, message", [
    ([], "give --prompt TEXT, or -i"),
    (["--prompt", "x", "--temperature", "-1"], "--temperature -1.0: must be >= 0"),
    (["--prompt", "x", "--num-samples", "0"], "--num-samples 0: must be >= 1"),
])
def test_bad_flags_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        sample.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_no_run_says_how_to_train_one(base_dir, capsys):
    assert "no run under base_checkpoints/" in error_line(sample.main, ["--prompt", "x", "--device-type", "cpu"], capsys)
