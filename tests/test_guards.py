"""
Damaged inputs and wrong combinations end in one line that names the file (or flag) and the fix,
and leave everything already on disk as it was. CPU only, no network.
"""
import dataclasses
import errno
import json
import os
import random
import re
import shutil
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat import checkpoint, dataset
from nanochat import shards as shards_module  # the fixture `shards` is a directory of them
from nanochat.dataloader import DataLoader
from nanochat.gpt import GPTConfig, build_model
from nanochat.tokenizer import Tokenizer
from scripts import base_train

WORDS = "the of and to in is was for on that with as by at from his her an which were are".split()


def one_line(exc_info):
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    return msg


def snapshot(directory):
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))}


@pytest.fixture(scope="module")
def docs():
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))) for _ in range(400)]


@pytest.fixture(scope="module")
def tok(docs):
    return Tokenizer.train(iter(docs), vocab_size=300)


@pytest.fixture
def shards(tmp_path, docs):
    data_dir = tmp_path / "base_data"
    dataset.write_shards(docs, str(data_dir), docs_per_shard=150, val_docs=40, row_group_size=16)
    return data_dir  # shard_00000, shard_00001 (train), shard_00002 (val)


# -----------------------------------------------------------------------------
# 1. corrupt shards

def garbage(path):
    path.write_bytes(bytes(random.Random(1).getrandbits(8) for _ in range(3000)) + b"PAR1")


def empty(path):
    path.write_bytes(b"")


def no_text_column(path):
    pq.write_table(pa.table({"body": ["a", "b"]}), path)


@pytest.mark.parametrize("damage", [garbage, empty, no_text_column])
def test_corrupt_shard_is_a_one_line_error_and_nothing_is_touched(shards, tok, damage):
    bad = shards / "shard_00001.parquet"
    damage(bad)
    before = snapshot(shards)
    expected = r"no 'text' column \(columns: body\)" if damage is no_text_column else "not a readable parquet shard"
    with pytest.raises(ValueError, match=expected) as exc:
        DataLoader(tok, 2, 32, "train", data_dir=str(shards))
    assert str(bad) in one_line(exc) and "python -m nanochat.dataset" in str(exc.value)
    with pytest.raises(ValueError, match=expected) as exc:
        list(shards_module.iter_documents("train", str(shards)))
    assert str(bad) in one_line(exc)
    with pytest.raises(ValueError, match=expected):
        shards_module.read_row_group(str(bad), 0)
    assert snapshot(shards) == before  # the bad shard and its neighbours, byte for byte


def test_damaged_pages_surface_from_next_without_hanging(shards, tok):
    dl = DataLoader(tok, 2, 32, "train", data_dir=str(shards), buffer_size=20)
    bad = shards / "shard_00000.parquet"
    data = bytearray(bad.read_bytes())
    data[4:404] = bytes(range(200)) * 2  # the first page headers: the footer still parses
    bad.write_bytes(bytes(data))
    before = snapshot(shards)
    result = {}

    def first_batch():
        try:
            next(dl)
        except Exception as e:  # noqa: BLE001 (handed to the test thread)
            result["error"] = e

    t = threading.Thread(target=first_batch, daemon=True)
    t.start()
    t.join(timeout=30)
    assert not t.is_alive(), "next(loader) hung on a corrupt shard"
    err = result.get("error")
    assert isinstance(err, ValueError) and str(bad) in str(err) and "\n" not in str(err), err
    assert "not a readable parquet shard" in str(err)
    assert dl.stream is None  # the read-ahead threads were shut down
    with pytest.raises(ValueError, match="not a readable parquet shard"):  # and a retry fails the same way
        next(dl)
    assert snapshot(shards) == before


# -----------------------------------------------------------------------------
# 2. damaged checkpoints (3. the vocab check uses the same fixture)

CONFIG = GPTConfig(sequence_len=32, vocab_size=300, n_layer=1, n_head=1, n_embd=16)


@pytest.fixture
def run_dir(tmp_path):
    """Two complete checkpoints (steps 1 and 2), written by hand: independent of the save path."""
    run = tmp_path / "run"
    for step in (1, 2):
        d = run / f"step_{step:06d}"
        d.mkdir(parents=True)
        torch.manual_seed(step)
        torch.save(build_model(CONFIG, "cpu").state_dict(), d / "model.pt")
        torch.save(None, d / "optimizer.pt")
        (d / "loaders.json").write_text("[]")
        (d / "meta.json").write_text(json.dumps({"step": step, "model_config": dataclasses.asdict(CONFIG)}))
    return run


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garble(path):
    path.write_bytes(b"\x00\xff" * 64)


DAMAGE = {  # (file, damage, the loader that reads it, expected message)
    "model.pt cut in half": ("model.pt", truncate, "model", "is truncated or corrupt"),
    "model.pt missing": ("model.pt", os.remove, "model", "is missing"),
    "meta.json garbled": ("meta.json", garble, "meta", "is truncated or corrupt"),
    "meta.json missing": ("meta.json", os.remove, "meta", "is missing"),
    "optimizer.pt garbled": ("optimizer.pt", garble, "training", "is truncated or corrupt"),
    "optimizer.pt missing": ("optimizer.pt", os.remove, "training", "is missing"),
    "loaders.json garbled": ("loaders.json", garble, "training", "is truncated or corrupt"),
}


@pytest.mark.parametrize("case", DAMAGE, ids=list(DAMAGE))
def test_damaged_checkpoint_names_file_and_fallback(run_dir, case):
    name, damage, which, expected = DAMAGE[case]
    newest, previous = run_dir / "step_000002", run_dir / "step_000001"
    damage(newest / name)
    before = {d: snapshot(d) for d in (newest, previous)}
    load = {"model": lambda: checkpoint.load_model(str(run_dir), "cpu"),
            "meta": lambda: checkpoint.load_meta(str(run_dir)),
            "training": lambda: checkpoint.load_training_state(str(run_dir), 2)}[which]
    with pytest.raises((ValueError, FileNotFoundError), match=expected) as exc:
        load()
    msg = one_line(exc)
    assert str(newest / name) in msg and f"delete {newest}" in msg
    assert {d: snapshot(d) for d in (newest, previous)} == before  # nothing deleted or rewritten
    model, meta = checkpoint.load_model(str(run_dir), "cpu", step=1)  # the fallback still loads
    assert meta["step"] == 1 and checkpoint.load_training_state(str(run_dir), 1) == (None, [])


# -----------------------------------------------------------------------------
# 3. tokenizer / model mismatch, damaged tokenizer

def test_vocab_mismatch_is_refused(run_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    model, _ = checkpoint.load_model(str(run_dir), "cpu", vocab_size=300)  # the matching tokenizer loads
    assert model.wte.weight.shape[0] == 300
    with pytest.raises(ValueError) as exc:
        checkpoint.load_model(str(run_dir), "cpu", vocab_size=512)
    assert one_line(exc) == (
        f"checkpoint {run_dir / 'step_000002'} was trained with a vocab of 300 tokens but the tokenizer at "
        f"{tmp_path / 'tokenizer' / 'tokenizer.json'} has 512: use the tokenizer the model was trained with")


@pytest.mark.parametrize("content", [b"", b'{"tokens": ["AA', b'{"pattern": "x"}', b'\xff\xfe garbage',
                                     b'{"pattern": "x", "special_tokens": [], "tokens": ["!!not base64!!"]}'])
def test_garbled_tokenizer_names_file_and_fix(tok, tmp_path, content):
    path = tok.save(str(tmp_path))
    with open(path, "wb") as f:
        f.write(content)
    with pytest.raises(ValueError) as exc:
        Tokenizer.load(str(tmp_path))
    msg = one_line(exc)
    assert path in msg and "python -m scripts.tok_train" in msg
    assert open(path, "rb").read() == content


# -----------------------------------------------------------------------------
# 4. full disk during a download

def test_full_disk_is_not_retried_and_keeps_the_partial(tmp_path, monkeypatch):
    calls = []

    def fetch(url, tmp, timeout):
        calls.append(url)
        with open(tmp, "ab") as f:
            f.write(b"PAR1 half a shard")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dataset, "_fetch", fetch)
    path = str(tmp_path / "shard_00000.parquet")
    with pytest.raises(RuntimeError) as exc:
        dataset.download_file("http://127.0.0.1:9/shard_00000.parquet", path, dataset._is_parquet,
                              retries=5, backoff=0.001)
    assert one_line(exc) == (f"no space left on device while writing {path}.partial: free space in {tmp_path} "
                             f"and run again (the partial download resumes)")
    assert len(calls) == 1  # retrying cannot help
    assert not os.path.exists(path)  # nothing under the final name
    assert open(path + ".partial", "rb").read() == b"PAR1 half a shard"  # kept for the resume


def test_other_os_errors_are_still_retried(tmp_path, monkeypatch):
    calls = []

    def fetch(url, tmp, timeout):
        calls.append(url)
        raise OSError(errno.ECONNRESET, "Connection reset by peer")

    monkeypatch.setattr(dataset, "_fetch", fetch)
    with pytest.raises(RuntimeError, match="after 3 attempts"):
        dataset.download_file("http://127.0.0.1:9/x", str(tmp_path / "x"), dataset._is_parquet,
                              retries=2, backoff=0.001)
    assert len(calls) == 3


# -----------------------------------------------------------------------------
# 5. incompatible base_train flags (the checks that exist today)

TINY = ["--depth", "1", "--head-dim", "16", "--max-seq-len", "32", "--device-batch-size", "4",
        "--eval-every", "0", "--core-every", "0", "--sample-every", "0", "--device-type", "cpu"]


@pytest.fixture
def base_dir(tmp_path, monkeypatch, docs, tok):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    dataset.write_shards(docs, str(tmp_path / "base_data"), docs_per_shard=200, val_docs=40, row_group_size=16)
    tok.save(str(tmp_path / "tokenizer"))
    return tmp_path


def test_total_batch_size_not_a_multiple_names_the_flags(base_dir, capsys):
    with pytest.raises(SystemExit) as exc:
        base_train.main(TINY + ["--num-iterations", "2", "--total-batch-size", "200"])
    msg = capsys.readouterr().err
    assert exc.value.code == 2 and msg.count("\n") == 1 and msg.startswith("python -m scripts.base_train: error: ")
    assert "--total-batch-size 200" in msg and "128" in msg and "--device-batch-size" in msg
    assert not os.path.exists(base_dir / "base_checkpoints")  # refused before anything was written


def test_resume_of_a_different_model_names_the_flag_and_keeps_the_checkpoint(base_dir):
    other = dataclasses.asdict(GPTConfig.from_depth(2, vocab_size=300, sequence_len=32, head_dim=16))
    step = base_dir / "base_checkpoints" / "x" / "step_000005"
    step.mkdir(parents=True)
    (step / "meta.json").write_text(json.dumps({"step": 5, "model_config": other}))
    (step / "model.pt").write_bytes(b"weights")
    before = snapshot(step)
    with pytest.raises(ValueError) as exc:
        base_train.main(TINY + ["--num-iterations", "2", "--total-batch-size", "128", "--model-tag", "x", "--resume"])
    msg = one_line(exc)
    assert msg.startswith("--resume:") and "different model" in msg and "--depth" in msg
    assert snapshot(step) == before


# -----------------------------------------------------------------------------
# 6. full disk during a checkpoint save; fsync before the rename (checkpoints and atomic_write)

class Tiny(torch.nn.Module):
    def __init__(self, value):
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((256, 256), float(value)))  # 256 KB


def save(run, step, value=1.0):
    return checkpoint.save_checkpoint(str(run), step, Tiny(value), None, {"model_config": {}}, [[]])


def test_full_disk_found_before_the_save_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    save(run, 1)
    before = snapshot(run / "step_000001")
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12, 1000))
    with pytest.raises(RuntimeError) as exc:
        save(run, 2, value=2.0)
    msg = one_line(exc)
    assert re.fullmatch(rf"no space left on /\S* \({run / 'step_000002'}\): need 0\.02 GB, have 0\.00 GB; "
                        rf"free space or point NANOCHAT_BASE_DIR elsewhere", msg), msg
    assert sorted(os.listdir(run)) == ["step_000001"]  # no .tmp left
    assert snapshot(run / "step_000001") == before


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
@pytest.mark.parametrize("failing", ["model.pt", "meta.json"])
def test_full_disk_during_the_write_removes_the_partial_save(tmp_path, monkeypatch, failing):
    run = tmp_path / "run"
    save(run, 1)
    before = snapshot(run / "step_000001")
    real_open = open

    def open_(path, mode="r", *args, **kwargs):  # the kernel's own full disk: writes to /dev/full fail
        full = str(path).endswith(failing) and ".tmp" in str(path)
        return real_open("/dev/full" if full else path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", open_)
    with pytest.raises(RuntimeError) as exc:
        save(run, 2, value=2.0)
    msg = one_line(exc)
    assert msg.startswith("no space left on ") and f"({run / 'step_000002'}): need 0.02 GB, have " in msg
    assert msg.endswith(" GB; free space or point NANOCHAT_BASE_DIR elsewhere")
    assert sorted(os.listdir(run)) == ["step_000001"]  # the partial step_000002.tmp is gone
    assert snapshot(run / "step_000001") == before
    monkeypatch.setattr("builtins.open", real_open)
    save(run, 2, value=2.0)  # space again: the save works
    assert checkpoint.list_steps(str(run)) == [1, 2]


def test_every_file_and_the_directory_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    synced, real_fsync = [], os.fsync

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        synced.append((os.path.relpath(path, tmp_path), (tmp_path / "run" / "step_000001").exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    save(tmp_path / "run", 1)
    tmp = os.path.join("run", "step_000001.tmp")
    files = [os.path.join(tmp, name) for name in ("model.pt", "optimizer.pt", "loaders.json", "meta.json")]
    # the files, their directory, then (after the rename) its parent
    assert synced == [(f, False) for f in files] + [(tmp, False), ("run", True)]


# -----------------------------------------------------------------------------
# 7. a retrained tokenizer of the same vocab size

@pytest.fixture
def other_tok(docs):
    return Tokenizer.train(iter(docs[::-1][:200]), vocab_size=300)


def test_fingerprint_is_stable_and_sees_any_change(tok, other_tok, tmp_path):
    assert len(tok.fingerprint()) == 16 and tok.fingerprint() == tok.fingerprint()
    assert Tokenizer.load(os.path.dirname(tok.save(str(tmp_path)))).fingerprint() == tok.fingerprint()
    assert other_tok.vocab_size == tok.vocab_size and other_tok.fingerprint() != tok.fingerprint()
    ranks = dict(tok.enc._mergeable_ranks)
    assert Tokenizer(ranks).fingerprint() == tok.fingerprint()
    assert Tokenizer(ranks, special_tokens=["<|bos|>"]).fingerprint() != tok.fingerprint()
    assert Tokenizer(ranks, pattern=r"\S+|\s+").fingerprint() != tok.fingerprint()


def test_checkpoint_of_another_tokenizer_is_refused_naming_both_files(run_dir, tok, other_tok, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    meta = json.loads((run_dir / "step_000002" / "meta.json").read_text())
    (run_dir / "step_000002" / "meta.json").write_text(json.dumps({**meta, "tokenizer": tok.fingerprint()}))
    path = other_tok.save(str(tmp_path / "tokenizer"))
    with pytest.raises(ValueError) as exc:
        checkpoint.load_model(str(run_dir), "cpu", tokenizer=other_tok)
    assert one_line(exc) == (
        f"checkpoint {run_dir / 'step_000002'} was trained with tokenizer {tok.fingerprint()} but {path} is "
        f"tokenizer {other_tok.fingerprint()}: put back the tokenizer.json the model was trained with, or use "
        f"another NANOCHAT_BASE_DIR")
    model, _ = checkpoint.load_model(str(run_dir), "cpu", tokenizer=tok)  # the right one loads
    assert model.wte.weight.shape[0] == 300


def test_checkpoint_without_fingerprint_warns_and_loads(run_dir, tok):
    with pytest.warns(UserWarning, match="does not record its tokenizer"):
        _, meta = checkpoint.load_model(str(run_dir), "cpu", tokenizer=tok)
    assert meta["step"] == 2


def test_base_eval_refuses_a_retrained_tokenizer(base_dir, other_tok, tok):
    from scripts import base_eval
    run = base_dir / "base_checkpoints" / "d1"
    d = run / "step_000003"
    d.mkdir(parents=True)
    torch.save(build_model(CONFIG, "cpu").state_dict(), d / "model.pt")
    (d / "meta.json").write_text(json.dumps({"step": 3, "model_config": dataclasses.asdict(CONFIG),
                                             "tokenizer": tok.fingerprint()}))
    other_tok.save(str(base_dir / "tokenizer"))  # tok_train --force, say: same vocab size, other ids
    with pytest.raises(ValueError, match="was trained with tokenizer") as exc:
        base_eval.main(["--device-type", "cpu", "--bpb-tokens", "0", "--samples", "0"])
    assert str(d) in one_line(exc) and str(base_dir / "tokenizer" / "tokenizer.json") in str(exc.value)
    assert not (run / "base_eval.json").exists()


def test_atomic_write_fsyncs_the_file_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    from nanochat import common
    synced, real_fsync = [], os.fsync

    def fsync(fd):
        synced.append((os.path.basename(os.readlink(f"/proc/self/fd/{fd}")), (tmp_path / "f.json").exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with common.atomic_write(str(tmp_path / "f.json")) as tmp, open(tmp, "w") as f:
        f.write("{}")
    assert synced == [(os.path.basename(tmp), False), (tmp_path.name, True)]
