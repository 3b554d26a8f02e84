"""
Export a trained model as a Hugging Face directory: transformers loads it, lm-evaluation-harness
scores it, and it needs nothing from this repo.

    python -m scripts.export --model-tag d24 --out d24-hf          # the newest step (or --step N)

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("d24-hf", trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained("d24-hf")           # prepends <|bos|>, as in training

Needs the `hf` extra: pip install -e '.[hf]'. A checkpoint the exported model code cannot
represent is refused rather than written wrong. See nanochat/export.py for what is in the directory.
"""
import sys

from nanochat.checkpoint import get_run_dir, newest_model_tag
from nanochat.cli import ArgumentParser, Missing, run
from nanochat.export import export
from nanochat.tokenizer import get_tokenizer


def main(argv=None):
    p = ArgumentParser("python -m scripts.export", __doc__)
    p.add_argument("--model-tag", default=None, help="run under base_checkpoints/ (default: the newest)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--out", required=True, metavar="DIR", help="the directory to write (default: none, required)")
    args = p.parse_args(argv)
    tag = args.model_tag or newest_model_tag()
    if tag is None:
        raise Missing("no run under base_checkpoints/: train one with python -m scripts.base_train")
    out = export(get_run_dir(tag), args.out, get_tokenizer(), args.step)
    print(f"wrote {out}: load it with AutoModelForCausalLM.from_pretrained({out!r}, trust_remote_code=True)")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
