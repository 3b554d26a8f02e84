"""Every command's --help and flag errors follow one convention (nanochat/cli.py): the program
named as invoked, a help text and a visible default for every flag, one-line errors."""
import argparse
import importlib
import subprocess
import sys

import pytest

from nanochat import cli

COMMANDS = ["scripts.base_train", "scripts.base_eval", "scripts.tok_train", "scripts.tok_eval", "scripts.plan",
            "scripts.bench_model", "scripts.bench_dataloader", "scripts.chaos", "scripts.gpu_check",
            "scripts.sample", "nanochat.dataset", "scripts.report", "scripts.sweep", "scripts.export"]


class Captured(Exception):
    def __init__(self, parser):
        self.parser = parser


def parser_of(module_name, monkeypatch):
    """The parser a command builds: its main() is stopped at the moment it parses its flags."""
    def grab(self, args=None, namespace=None):
        raise Captured(self)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", grab)
    with pytest.raises(Captured) as e:
        importlib.import_module(module_name).main([])
    return e.value.parser


@pytest.mark.parametrize("module_name", COMMANDS)
def test_help_names_the_command_and_explains_every_flag(module_name, monkeypatch):
    parser = parser_of(module_name, monkeypatch)
    assert parser.prog == f"python -m {module_name}"
    assert isinstance(parser, cli.ArgumentParser)  # one-line errors, defaults shown
    options = [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
    assert options
    for action in options:
        flag = action.option_strings[-1]
        assert action.help and action.help.strip(), f"{module_name} {flag} has no help text"
        if action.help == argparse.SUPPRESS:  # an old spelling kept as a hidden alias
            continue
        # a numeric flag without a fixed default is derived or unlimited: its help says which
        if action.default is None and action.type in (int, float):
            assert "default" in action.help, f"{module_name} {flag}: say what leaving it out means"
        # -1 used to mean "auto" for some flags and "never" for others; now None is auto and 0 is off
        assert action.default != -1, f"{module_name} {flag}: -1 as a sentinel"
    text = parser.format_help()
    assert f"usage: python -m {module_name}" in text
    assert "SPEC" not in text and "(default: None)" not in text


def test_device_type_and_compile_flags_are_closed_sets(monkeypatch):
    for name in ["scripts.base_train", "scripts.base_eval", "scripts.bench_model", "scripts.bench_dataloader",
                 "scripts.sample"]:
        actions = {a.dest: a for a in parser_of(name, monkeypatch)._actions}
        assert tuple(actions["device_type"].choices) == ("cuda", "cpu", "mps"), name
        if "compile" in actions:
            assert isinstance(actions["compile"], argparse.BooleanOptionalAction), name


def test_help_runs_as_a_command_and_a_bad_flag_is_one_line():
    out = subprocess.run([sys.executable, "-m", "scripts.plan", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("usage: python -m scripts.plan")
    assert "--gpu-hour-cost X     dollars per GPU-hour (default: 3.0)" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "scripts.plan", "--depth", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr == "python -m scripts.plan: error: --depth 0: must be >= 1 (the number of layers) (see --help)\n"


def test_every_means_steps_with_zero_off():
    assert [cli.every(v) for v in ("250", "1", "0")] == [250, 1, 0]
    with pytest.raises(argparse.ArgumentTypeError, match="-1: expected N >= 1 steps, or 0 for off"):
        cli.every("-1")  # no hidden meaning for negative numbers


@pytest.mark.parametrize("module_name, argv, message", [
    ("scripts.plan", ["--gpus", "0"], "--gpus 0: must be >= 1"),
    ("scripts.plan", ["--gpu", "v100"], "argument --gpu: invalid choice: 'v100'"),
    ("scripts.plan", ["--mfu", "1.5"], "--mfu 1.5: must be in (0, 1]"),
    ("scripts.bench_model", ["--depth", "0"], "--depth 0: must be >= 1"),
    ("scripts.bench_dataloader", ["--max-seq-len", "0"], "--max-seq-len 0: must be >= 1"),
    ("scripts.base_eval", ["--core-max-per-task", "0"], "--core-max-per-task 0: must be >= 1"),
    ("scripts.base_eval", ["--bpb-tokens", "-1"], "--bpb-tokens -1: must be >= 0 (0: off)"),
    ("scripts.tok_train", ["--vocab-size", "100"], "--vocab-size 100: must be >= "),
    ("scripts.chaos", ["--kills", "0"], "--kills 0: must be >= 1"),
    ("nanochat.dataset", ["-n", "0"], "argument -n/--num-shards: '0': expected a number of shards >= 1, or 'all'"),
    ("nanochat.dataset", ["--row-group-size", "0"], "--row-group-size 0: must be >= 1"),
])
def test_bad_values_are_one_line_flag_errors(module_name, argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        importlib.import_module(module_name).main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("module_name, argv", [
    ("scripts.base_eval", ["--max-per-task", "3"]), ("scripts.base_eval", ["--eval-tokens", "9"]),
    ("scripts.base_train", ["--seq-len", "64"]), ("scripts.bench_model", ["--seq-len", "64"]),
    ("scripts.plan", ["--seq-len", "64"])])
def test_one_spelling_per_flag(module_name, argv, capsys):
    # a flag has one name in every script: no hidden second spelling to learn or to collide with
    with pytest.raises(SystemExit) as e:
        importlib.import_module(module_name).parse_args(argv)
    assert e.value.code == 2 and f"unrecognized arguments: {' '.join(argv)}" in capsys.readouterr().err


def test_shard_count():
    from nanochat import dataset
    assert dataset.shard_count("all") is None and dataset.shard_count("3") == 3
    for bad in ("-1", "0", "x"):  # no hidden meaning for a negative number
        with pytest.raises(argparse.ArgumentTypeError, match="expected a number of shards >= 1, or 'all'"):
            dataset.shard_count(bad)
