"""
Train the BPE tokenizer on the first --max-chars characters of the training shards.

    python -m scripts.tok_train --vocab-size 32768 --max-chars 2000000000
"""
import os
import sys
import time

from nanochat.cli import ArgumentParser, BadInput, check, run
from nanochat.checkpoint import checkpoints_using, save_json
from nanochat.shards import iter_documents
from nanochat.tokenizer import MIN_VOCAB_SIZE, SPECIAL_TOKENS, Tokenizer, get_tokenizer, get_tokenizer_dir


def capped_texts(max_chars, doc_cap):
    """Training text: documents cut to doc_cap chars (a few huge pages must not dominate
    the merge statistics), stopping once max_chars characters have been handed out."""
    seen = 0
    for text in iter_documents("train"):
        text = text[:doc_cap]
        yield text
        seen += len(text)
        if seen >= max_chars:
            return


def refuse_to_orphan_checkpoints(force):
    """A model is only usable with the exact tokenizer it was trained with: never replace that
    tokenizer by accident (checked before training, not after an hour of it)."""
    if force or not os.path.exists(os.path.join(get_tokenizer_dir(), "tokenizer.json")):
        return
    try:
        current = get_tokenizer()
    except ValueError:  # a corrupt tokenizer.json: no model can use it anyway
        return
    used = checkpoints_using(current)
    if used:
        raise BadInput(f"{current.path} is the tokenizer of checkpoint {used[0]}"
                       f"{f' (and {len(used) - 1} other runs)' if len(used) > 1 else ''}; retraining it "
                       f"would make that model unusable: use another NANOCHAT_BASE_DIR, delete the "
                       f"tokenizer and its checkpoints deliberately, or pass --force")


def main(argv=None):
    parser = ArgumentParser("python -m scripts.tok_train", __doc__)
    parser.add_argument("--vocab-size", type=int, default=32768, help="vocab size including special tokens")
    parser.add_argument("--max-chars", type=int, default=2_000_000_000, help="characters of training text to use")
    parser.add_argument("--doc-cap", type=int, default=10_000, help="characters kept from each document")
    parser.add_argument("--force", action="store_true",
                        help="replace the tokenizer even if checkpoints were trained with it (they become unusable)")
    args = parser.parse_args(argv)
    # checked here too, so a bad flag fails before the shards are read, as a usage error
    check(parser, [(args.vocab_size < MIN_VOCAB_SIZE, f"--vocab-size {args.vocab_size}: must be >= {MIN_VOCAB_SIZE} "
                                                      f"(256 byte tokens + {len(SPECIAL_TOKENS)} specials)"),
                   (args.max_chars < 1, f"--max-chars {args.max_chars}: must be >= 1"),
                   (args.doc_cap < 1, f"--doc-cap {args.doc_cap}: must be >= 1")])
    refuse_to_orphan_checkpoints(args.force)

    t0 = time.time()
    chars = 0

    def counted(texts):  # how much text the tokenizer really saw, for the report
        nonlocal chars
        for text in texts:
            chars += len(text)
            yield text
    tokenizer = Tokenizer.train(counted(capped_texts(args.max_chars, args.doc_cap)), args.vocab_size)
    train_time = time.time() - t0
    path = tokenizer.save(get_tokenizer_dir())

    sample = "Hello world! In 2026, tokenizers still split numbers like 123456 and ünïcödé 🎉."
    assert tokenizer.decode(tokenizer.encode(sample)) == sample, "tokenizer does not round-trip"
    save_json(os.path.join(get_tokenizer_dir(), "tok_train.json"), {  # for the report
        "vocab_size": tokenizer.vocab_size, "train_time": train_time, "chars": chars, "doc_cap": args.doc_cap})
    print(f"trained a {tokenizer.vocab_size:,}-token tokenizer on {chars:,} characters in {train_time:.1f}s; "
          f"saved to {path}")
    return tokenizer


if __name__ == "__main__":
    sys.exit(run(main))
