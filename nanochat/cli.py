"""
The command-line conventions every command follows, so that all of them behave alike:

- `--help` names the program as it is invoked (`python -m scripts.base_train`), keeps the
  module docstring's layout, and shows each flag's default: a help text that already says its
  default ("default: auto") is left as written, any other gets "(default: VALUE)" appended.
- A bad flag value is ONE line on stderr, `PROG: error: ...`, and exit status 2 (argparse's
  convention), never a traceback and never the whole usage text burying the message.
- Sentinel values mean one thing everywhere: a flag that is derived when left out has the
  default None and says "auto"; 0 switches a periodic action ("every N steps") off.
- A user's mistake found later (a damaged file, a missing run, a setting the machine cannot
  honour) is raised as a UserError naming what, where and the fix; run() prints it as one
  `error:` line and exits 1. Any other exception is a bug and keeps its traceback.
"""
import argparse
import os
import sys


class UserError(Exception):
    """A mistake in what the user gave (a flag, a file, a setting) or an input the machine cannot
    use, raised on purpose with a message that names what, where and the fix."""


# Each keeps its built-in kind too, so a caller can still catch "a file that is not there".
class BadInput(UserError, ValueError):
    """A flag value, file or setting that cannot be used as given."""


class Missing(UserError, FileNotFoundError):
    """A file, run or checkpoint that is not there."""


class Unavailable(UserError, RuntimeError):
    """What this machine or network cannot do as asked: no CUDA for --fp8, a host that does not answer."""


def run(main, argv=None):
    """A command's exit status: main(argv)'s (0 unless it returns a number), or 1 after a UserError,
    printed as one `error:` line. Under torchrun every rank that hits one prints it (a mistake may
    show on one rank only), ranks other than 0 naming themselves."""
    try:
        status = main(argv)
    except UserError as e:
        rank = int(os.environ.get("RANK", 0))
        sys.stderr.write(f"error: {'' if rank == 0 else f'(rank {rank}) '}{' '.join(str(e).split())}\n")
        return 1
    return status if isinstance(status, int) else 0

DEVICE_TYPES = ("cuda", "cpu", "mps")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):
        help = action.help or ""
        # a None / False default says nothing useful ("None"): such a help text says what happens instead
        if "default:" in help or action.default is None or action.default is False \
                or action.default is argparse.SUPPRESS or not action.option_strings:
            return help
        return help + " (default: %(default)s)"

    def _get_default_metavar_for_optional(self, action):
        # short placeholders keep the usage readable: --total-batch-size N, not TOTAL_BATCH_SIZE
        names = {"model_tag": "TAG", "eval_bundle": "DIR", "hf_path": "NAME", "device_batch_size": "N|auto"}
        return {int: "N", every: "N", float: "X"}.get(action.type) or names.get(action.dest, "VALUE")


class ArgumentParser(argparse.ArgumentParser):
    def __init__(self, prog, description, **kwargs):
        super().__init__(prog=prog, description=description, formatter_class=HelpFormatter, **kwargs)

    def error(self, message):
        flag_error(self.prog, f"{message} (see --help)")


def flag_error(prog, message):
    """A bad flag value found after parsing (one that takes the machine or the tokenizer to judge):
    the same one line and exit status 2 as argparse's own errors."""
    sys.stderr.write(f"{prog}: error: {message}\n")
    sys.exit(2)


def every(text):
    """`--X-every N`: every N steps, 0 = off."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text}: expected N >= 1 steps, or 0 for off")
    return value


def check(parser, problems):
    """parser.error for the first (bad, message) pair whose condition holds."""
    for bad, message in problems:
        if bad:
            parser.error(message)
