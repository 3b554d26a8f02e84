"""
A user's mistakes and the faults of a shared machine: one `error:` line naming the thing and the
fix (exit 1, no traceback), and nothing lost. Runs have one owner; bad rows, impossible sizes,
bad settings and damaged files are refused before they cost anything.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import error_line
from nanochat import attention, dataset, estimate, shards
from nanochat.checkpoint import own_run
from nanochat.cli import UserError, run
from scripts import base_eval, base_train, chaos, sample
from test_base_train import TINY

# -----------------------------------------------------------------------------
# One owner per run


def records(base_dir, tag):
    with open(base_dir / "base_checkpoints" / tag / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_a_run_has_one_owner_and_a_killed_owner_frees_it(base_dir, capsys):
    # A trains in another process; B, on the same tag, is refused while A lives (with --resume too,
    # which used to let both write); A is killed with SIGKILL; B then takes the run over and resumes it
    args = TINY + ["--num-iterations", "200", "--total-batch-size", "128", "--eval-every", "0", "--save-every", "5",
                   "--model-tag", "shared"]
    a = subprocess.Popen([sys.executable, "-m", "scripts.base_train", *args], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    run_dir = base_dir / "base_checkpoints" / "shared"
    deadline = time.time() + 60
    while not (run_dir / "step_000005").exists() and time.time() < deadline:
        time.sleep(0.05)
    try:
        for extra in ([], ["--resume"]):
            msg = error_line(base_train.main, args + extra, capsys)
            assert f"{run_dir} is in use by pid {a.pid} on {socket.gethostname()}" in msg, msg
            assert "another --model-tag" in msg
    finally:
        a.send_signal(signal.SIGKILL)
        a.wait()
    assert a.returncode == -signal.SIGKILL, "A finished before it was killed: give it more steps"
    assert base_train.main(args + ["--resume"])["steps"] == 200  # the stale lock is no obstacle
    assert "resumed from" in capsys.readouterr().out
    train_steps = [r["step"] for r in records(base_dir, "shared") if r["type"] == "train"]
    assert train_steps == list(range(1, 201))  # nobody else wrote into it: each step once, in order


def test_an_unlockable_filesystem_warns_and_runs(tmp_path, monkeypatch):
    import fcntl
    monkeypatch.setattr(fcntl, "flock", lambda *a: (_ for _ in ()).throw(OSError(38, "Function not implemented")))
    with pytest.warns(UserWarning, match="nothing stops a second run"):
        handle = own_run(str(tmp_path / "r"))
    handle.close()


def test_a_second_chaos_in_one_base_dir_is_refused(base_dir):
    held = own_run(str(base_dir / "base_checkpoints" / "chaos-session"))
    try:
        with pytest.raises(UserError, match=r"chaos-session is in use by pid \d+"):
            chaos.main(["--kills", "1"])
    finally:
        held.close()


def test_chaos_fails_on_a_resume_that_ignores_the_checkpoints(base_dir, tmp_path, monkeypatch):
    # training is deterministic, so a restart from scratch ends with the same weights: only the
    # resume check can tell
    sabotaged = tmp_path / "sabotaged_train.py"
    sabotaged.write_text("import sys\nfrom scripts import base_train\n"
                         "base_train.resume = lambda run: None  # every checkpoint ignored: a restart at step 0\n"
                         "sys.exit(base_train.cli.run(base_train.main))\n")
    monkeypatch.setattr(chaos, "TRAIN_CMD", [sys.executable, str(sabotaged)])
    with pytest.raises(SystemExit, match=r"chaos: FAILED: after a kill with the newest complete checkpoint at step "
                                         r"\d+, the restart did not resume from it: it trained step 1 first"):
        chaos.main(["--kills", "1", "--", "--num-iterations", "12"])


# -----------------------------------------------------------------------------
# Sizes that cannot fit, found before anything is allocated


def test_a_model_too_big_for_the_machine_is_refused_with_what_fits(base_dir, capsys):
    msg = error_line(base_train.main, ["--depth", "500", "--device-type", "cpu"], capsys)
    assert "this run needs about" in msg and "GB per device" in msg and "cpu RAM has" in msg
    assert "try --depth " in msg and "--skip-memory-check" in msg
    assert not (base_dir / "base_checkpoints").exists()


def test_the_memory_check_suggests_a_batch_and_can_be_skipped(base_dir, capsys, monkeypatch):
    args = TINY + ["--num-iterations", "1", "--total-batch-size", "128", "--eval-every", "0"]
    need = estimate.run_estimate(base_train.from_flags(base_train.parse_args(args), 300, 1).config, 2, 1,
                                 __import__("torch").device("cpu"))
    monkeypatch.setattr(estimate, "device_memory", lambda device: need)  # room for device batch 2, not 4
    assert "try --device-batch-size 2 (gradient accumulation keeps" in error_line(base_train.main, args, capsys)
    assert base_train.main(args + ["--skip-memory-check"])["steps"] == 1


# -----------------------------------------------------------------------------
# Bad rows and files in a local corpus: the file and the line


@pytest.mark.parametrize("row, shown", [('{"text": null}', "null"), ('{"text": 42}', "42"),
                                        ('{"text": ["a", "b"]}', '["a", "b"]')])
def test_a_row_whose_text_is_not_a_string_names_file_and_line(tmp_path, capsys, row, shown):
    src = tmp_path / "c.jsonl"
    src.write_text('{"text": "fine"}\n\n' + row + "\n")
    msg = error_line(dataset.main, ["--local", str(src), "--out", str(tmp_path / "out")], capsys)
    assert f"{src}:3: the text is {shown}" in msg and "not a string" in msg
    assert not os.path.exists(tmp_path / "out" / "manifest.json")


def test_bad_files_name_themselves(tmp_path, capsys):
    out = ["--out", str(tmp_path / "out")]
    (tmp_path / "fake.txt.gz").write_text("not gzip")
    (tmp_path / "fake.parquet").write_text("not parquet")
    (tmp_path / "latin1.txt").write_bytes(b"line one\nline two caf\xe9\n")
    pq.write_table(pa.table({"text": ["a", None]}), tmp_path / "nulls.parquet")
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.md").write_text("x")
    cases = {"fake.txt.gz": "fake.txt.gz: cannot be read (BadGzipFile", "fake.parquet": "fake.parquet: not a readable "
             "parquet file", "latin1.txt": "latin1.txt:2: not UTF-8 text", "nulls.parquet": "nulls.parquet: row 2: the "
             "text is null", "missing.jsonl": "missing.jsonl does not exist", "empty": "empty: no .jsonl / .txt / "
             ".parquet / .jsonl.gz / .txt.gz files in it (it is empty)", "other": "(skipped 1: notes.md)"}
    for name, expected in cases.items():
        assert expected in error_line(dataset.main, ["--local", str(tmp_path / name)] + out, capsys), name


def test_a_build_killed_midway_is_started_over_by_the_same_command(tmp_path, capsys):
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(40)))
    out = tmp_path / "out"
    out.mkdir()
    (out / "building.json").write_text(json.dumps({"source": dataset.local_source([str(src)])}))
    (out / "shard_00000.parquet").write_text("half written")  # what a kill -9 leaves: no manifest
    assert run(dataset.main, ["--local", str(src), "--out", str(out)]) == 0
    assert "unfinished build" in capsys.readouterr().out and not (out / "building.json").exists()
    assert len(list(shards.iter_documents("train", str(out)))) + len(list(shards.iter_documents("val", str(out)))) == 40
    # another source's unfinished build is not ours to delete
    (out / "building.json").write_text(json.dumps({"source": "/elsewhere"}))
    os.remove(out / "manifest.json")
    assert "an unfinished build from /elsewhere" in error_line(dataset.main, ["--local", str(src), "--out", str(out)],
                                                                capsys)


# -----------------------------------------------------------------------------
# Settings, missing pieces, damaged files: one line each


def test_bad_settings_name_the_variable(base_dir, capsys, monkeypatch):
    args = TINY + ["--num-iterations", "1", "--total-batch-size", "128"]
    for var, value, expected in [("NANOCHAT_DTYPE", "fp12", "NANOCHAT_DTYPE='fp12': expected one of"),
                                 ("NANOCHAT_ATTN", "fa9", "NANOCHAT_ATTN='fa9': expected one of"),
                                 ("NANOCHAT_ATTN", "fa3", "NANOCHAT_ATTN='fa3' cannot run on cpu"),
                                 ("NANOCHAT_ATTN", "flex", "NANOCHAT_ATTN='flex' trains on CUDA only")]:
        monkeypatch.setattr(attention, "_chosen", None)
        monkeypatch.setenv(var, value)
        assert expected in error_line(base_train.main, args, capsys), var
        monkeypatch.delenv(var)
    monkeypatch.setattr(attention, "_chosen", None)


def test_a_base_dir_under_a_file_names_the_variable(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "file" / "nanochat"))
    msg = error_line(base_train.main, TINY, capsys)
    assert f"NANOCHAT_BASE_DIR={tmp_path / 'file' / 'nanochat'}: cannot create it" in msg


def test_missing_pieces_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    assert "no tokenizer at" in error_line(base_train.main, TINY, capsys)
    assert "no manifest.json in" in error_line(base_eval.main, ["--device-type", "cpu"], capsys)


def test_an_unknown_run_is_one_line(base_dir, capsys):
    assert "no checkpoint in" in error_line(sample.main, ["--model-tag", "nope", "--prompt", "x",
                                                          "--device-type", "cpu"], capsys)


def test_a_meta_json_without_its_fields_names_file_and_fix(base_dir, capsys):
    args = TINY + ["--num-iterations", "2", "--total-batch-size", "128", "--model-tag", "m"]
    base_train.main(args)
    meta = base_dir / "base_checkpoints" / "m" / "step_000002" / "meta.json"
    meta.write_text(json.dumps({"note": "valid JSON, not ours"}))
    msg = error_line(base_train.main, args + ["--resume"], capsys)
    assert f"{meta} has no 'step' field" in msg and "to resume from the previous checkpoint" in msg


def test_sample_refuses_a_prompt_that_does_not_fit_and_warns_past_the_context(base_dir, capsys):
    base_train.main(TINY + ["--num-iterations", "1", "--total-batch-size", "128", "--eval-every", "0", "--model-tag", "s"])
    long = " ".join(["the"] * 200)  # the model takes 4 × 32 positions at most
    assert run(sample.main, ["--prompt", long, "--device-type", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.splitlines()[-1].startswith("error: the prompt is 202 tokens")
    assert "this model takes at most 127" in err
    assert run(sample.main, ["--prompt", "the cat", "--max-tokens", "40", "--device-type", "cpu",
                             "--temperature", "0"]) == 0
    assert "run past the 32-token context the model was trained on" in capsys.readouterr().err
