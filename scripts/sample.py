"""
Talk to a pretrained model: stream a completion of a prompt through the KV-cache engine.

    python -m scripts.sample --prompt "The capital of France is"          # newest run, newest step
    python -m scripts.sample --model-tag d24 --prompt "Once upon a time" --num-samples 3 --temperature 0.8
    python -m scripts.sample --model-tag d24 -i                            # a prompt loop (empty line or Ctrl-D ends)

A base model continues text; it does not answer questions. Give it the start of something
("The capital of France is") rather than a question. --temperature 0 is greedy decoding.
"""
import sys

from nanochat.cli import DEVICE_TYPES, ArgumentParser, BadInput, Missing, check, run
from nanochat.checkpoint import get_run_dir, load_model, newest_model_tag
from nanochat.common import compute_init
from nanochat.engine import Engine
from nanochat.tokenizer import get_tokenizer


def parse_args(argv=None):
    p = ArgumentParser("python -m scripts.sample", __doc__)
    p.add_argument("--model-tag", default=None, help="run under base_checkpoints/ (default: the newest)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--prompt", default=None, help="text to continue (default with -i: ask for one)")
    p.add_argument("-i", "--interactive", action="store_true", help="ask for prompts in a loop")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens to generate per sample (default: 128)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: 0.8)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens; 0 = all (default: 50)")
    p.add_argument("--num-samples", type=int, default=1, help="completions per prompt (default: 1)")
    p.add_argument("--seed", type=int, default=42, help="sampling seed (default: 42)")
    p.add_argument("--device-type", default=None, choices=DEVICE_TYPES, help="default: autodetect")
    args = p.parse_args(argv)
    check(p, [(args.prompt is None and not args.interactive, "give --prompt TEXT, or -i for a prompt loop")] +
          [(value < low, f"{flag} {value}: must be >= {low}") for flag, value, low in [
              ("--max-tokens", args.max_tokens, 1), ("--num-samples", args.num_samples, 1), ("--top-k", args.top_k, 0),
              ("--temperature", args.temperature, 0)]])
    return args


def check_length(model, n_prompt, max_tokens):
    """Refuse a prompt the model cannot take at all (its rotary table ends there); warn when the
    prompt and the completion run past the context it was trained on (the text beyond is unreliable)."""
    trained, most = model.config.sequence_len, model.cos.size(1)
    if n_prompt >= most:
        raise BadInput(f"the prompt is {n_prompt} tokens (BOS included); this model takes at most {most - 1}: "
                       f"shorten it (it was trained on {trained}-token contexts)")
    if n_prompt + max_tokens > trained:
        print(f"warning: the prompt ({n_prompt} tokens) + --max-tokens {max_tokens} run past the {trained}-token "
              f"context the model was trained on: what comes after token {trained} is unreliable", file=sys.stderr)


def complete(engine, tokenizer, prompt, args):
    """Print each sample's completion of `prompt`; one sample is streamed token by token.
    Returns the completions' texts."""
    out = sys.stdout
    tokens = tokenizer.encode(prompt, prepend=tokenizer.bos_token_id)
    check_length(engine.model, len(tokens), args.max_tokens)
    kwargs = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k or None, seed=args.seed)
    if args.num_samples > 1:  # several at once: they finish together, so print them whole
        texts = [tokenizer.decode(ids) for ids in engine.generate_batch(tokens, args.num_samples, **kwargs)]
        for i, text in enumerate(texts):
            out.write(f"--- sample {i + 1}\n{prompt}{text}\n")
        return texts
    out.write(prompt)
    ids, shown = [], ""
    for column in engine.generate(tokens, 1, **kwargs):
        if column[0] == tokenizer.bos_token_id:  # the model started a new document: this one is over
            break
        ids.append(column[0])
        # decode the whole completion, not token by token: a character can span two tokens,
        # and half of it decodes to U+FFFD until the rest arrives
        text = tokenizer.decode(ids)
        if not text.endswith("\ufffd"):
            out.write(text[len(shown):])
            out.flush()
            shown = text
    out.write(tokenizer.decode(ids)[len(shown):] + "\n")
    return [tokenizer.decode(ids)]


def main(argv=None):
    args = parse_args(argv)
    _, _, _, _, device = compute_init(args.device_type)
    tag = args.model_tag or newest_model_tag()
    if tag is None:
        raise Missing("no run under base_checkpoints/: train one with python -m scripts.base_train")
    tokenizer = get_tokenizer()
    model, meta = load_model(get_run_dir(tag), device, args.step, tokenizer=tokenizer)
    model.eval()
    engine = Engine(model, tokenizer)
    print(f"# {tag} at step {meta['step']}, {device.type}; temperature {args.temperature}, top-k {args.top_k}",
          file=sys.stderr)
    if args.prompt is not None:
        complete(engine, tokenizer, args.prompt, args)
    while args.interactive:
        try:
            prompt = input("> ")
        except EOFError:
            break
        if not prompt:
            break
        try:
            complete(engine, tokenizer, prompt, args)
        except BadInput as e:  # a prompt too long: ask for another
            print(f"error: {e}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(run(main))
