"""
The command-line conventions every script follows, so that all of them behave alike:

- `--help` names the program as it is invoked (`python -m scripts.base_train`), keeps the
  module docstring's layout, and shows each flag's default: a help text that already says its
  default ("default: auto") is left as written, any other gets "(default: VALUE)" appended.
- A bad flag value is ONE line on stderr, `PROG: error: ...`, and exit status 2 (argparse's
  convention), never a traceback and never the whole usage text burying the message.
- Sentinel values mean one thing everywhere: a flag that is derived when left out has the
  default None and says "auto"; 0 switches a periodic action ("every N steps") off.
"""
import argparse
import sys

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
