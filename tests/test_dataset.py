"""
Shard download, listing and building. Downloads are served by a local HTTP server that
can misbehave on request (drop the connection, send a truncated file, 404), so no network.
"""
import errno
import glob
import gzip
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import dataset, shards
from nanochat.cli import run

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO_ROOT), "shared")
FAST = dict(retries=3, backoff=0.001)


# -----------------------------------------------------------------------------
# a shard server whose behaviour each test picks

class ShardHandler(BaseHTTPRequestHandler):
    def do_GET(self):
        srv = self.server
        with srv.lock:
            srv.requests.append((self.path, self.headers.get("Range")))
            n = len(srv.requests)
        data = srv.files.get(self.path.rsplit("/", 1)[-1])
        if data is None:
            self.send_error(404)
            return
        start = int(self.headers["Range"][6:].rstrip("-")) if srv.honour_range and self.headers["Range"] else 0
        body = data[start:]
        if srv.truncate:
            body = body[: len(body) // 2]  # a short file that still matches its Content-Length
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if n <= srv.drops:
            self.wfile.write(body[: len(body) // 2])  # promised all of it, then hang up
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch, tmp_path):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), ShardHandler)
    srv.files, srv.requests, srv.lock = {}, [], threading.Lock()
    srv.drops, srv.honour_range, srv.truncate = 0, False, False
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()
    monkeypatch.setenv("NANOCHAT_DATA_URL", f"http://127.0.0.1:{srv.server_address[1]}/data")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    yield srv
    srv.shutdown()
    srv.server_close()


def make_shard_bytes(tmp_path, name, n_docs=3000):
    path = tmp_path / f"src_{name}"
    texts = [f"{name} document {i} " + "lorem ipsum " * (i % 7) for i in range(n_docs)]
    pq.write_table(pa.table({"text": texts}), path, row_group_size=256)
    return path.read_bytes()


def shard_names(data_dir):
    return sorted(n for n in os.listdir(data_dir) if n.startswith("shard_"))


# -----------------------------------------------------------------------------
# download_shard / download

def test_download_good_shard(server, tmp_path):
    server.files["shard_00003.parquet"] = src = make_shard_bytes(tmp_path, "a")
    path = dataset.download_shard(3, **FAST)
    assert path == os.path.join(shards.get_data_dir(), "shard_00003.parquet")
    assert open(path, "rb").read() == src
    assert shard_names(shards.get_data_dir()) == ["shard_00003.parquet"]  # no temp file left over


def test_dropped_connection_once_restarts_when_server_ignores_range(server, tmp_path):
    server.files["shard_00000.parquet"] = src = make_shard_bytes(tmp_path, "a")
    server.drops = 1
    path = dataset.download_shard(0, **FAST)
    assert open(path, "rb").read() == src
    assert len(server.requests) == 2


def test_dropped_connection_resumes_with_range(server, tmp_path):
    server.files["shard_00000.parquet"] = src = make_shard_bytes(tmp_path, "a")
    server.drops, server.honour_range = 1, True
    path = dataset.download_shard(0, **FAST)
    assert open(path, "rb").read() == src
    assert server.requests[0][1] is None
    assert server.requests[1][1] == f"bytes={len(src) // 2}-"  # continued from where it stopped


def test_dropped_connection_always_fails_cleanly(server, tmp_path):
    server.files["shard_00000.parquet"] = make_shard_bytes(tmp_path, "a")
    server.drops = 10**9
    with pytest.raises(RuntimeError) as exc:
        dataset.download_shard(0, **FAST)
    msg = str(exc.value)
    assert os.environ["NANOCHAT_DATA_URL"] + "/shard_00000.parquet" in msg and "dropped" in msg
    assert "\n" not in msg
    assert len(server.requests) == FAST["retries"] + 1
    assert not os.path.exists(os.path.join(shards.get_data_dir(), "shard_00000.parquet"))


def test_truncated_file_fails_verification(server, tmp_path):
    server.files["shard_00001.parquet"] = make_shard_bytes(tmp_path, "a")
    server.truncate = True
    with pytest.raises(RuntimeError, match="corrupt or truncated"):
        dataset.download_shard(1, **FAST)
    assert len(server.requests) == FAST["retries"] + 1
    assert shard_names(shards.get_data_dir()) == []  # neither the final name nor a bad temp file


def test_404_does_not_retry(server):
    with pytest.raises(RuntimeError) as exc:
        dataset.download_shard(7, **FAST)
    assert str(exc.value) == f"could not download {dataset.shard_url(7)}: HTTP Error 404: Not Found"
    assert len(server.requests) == 1


def test_unreachable_host(monkeypatch, tmp_path):
    with socket.socket() as s:  # grab a free port, then close it so nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("NANOCHAT_DATA_URL", f"http://127.0.0.1:{port}")
    t0 = time.monotonic()
    with pytest.raises(dataset.HostUnreachable) as exc:  # refused: no retry (the default backoff waits 62 s)
        dataset.download_shard(0, data_dir=str(tmp_path))
    assert time.monotonic() - t0 < 5
    assert str(exc.value).startswith(f"could not download http://127.0.0.1:{port}/shard_00000.parquet: "
                                     f"cannot reach 127.0.0.1:{port} (Connection refused); offline, run with")
    assert os.listdir(tmp_path) == []


def test_unresolvable_host_fails_fast_with_one_line(monkeypatch, tmp_path, capsys):
    # what a machine without network sees: the name of the data host does not resolve
    monkeypatch.setenv("NANOCHAT_DATA_URL", "http://nanochat-data.invalid/data")
    t0 = time.monotonic()
    assert run(dataset.main, ["-n", "8", "--out", str(tmp_path / "d")]) == 1  # default retries and backoff
    assert time.monotonic() - t0 < 10  # was 9 shards x 6 attempts, ~3 minutes
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: could not download http://nanochat-data.invalid/data/shard_")
    for part in ["cannot reach nanochat-data.invalid (", "NANOCHAT_DATA_SOURCE=demo", "NANOCHAT_DATA_SOURCE=path/to/texts",
                 "NANOCHAT_EVAL_BUNDLE=path/to/eval_bundle", "NANOCHAT_DATA_URL"]:
        assert part in err[0]
    assert not shards._shard_paths(str(tmp_path / "d"))


def test_unresolvable_eval_bundle_host_fails_fast(monkeypatch, tmp_path):
    from scripts.base_eval import download_eval_bundle
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE_URL", "http://nanochat-data.invalid/eval_bundle.zip")
    t0 = time.monotonic()
    with pytest.raises(RuntimeError) as exc:
        download_eval_bundle(str(tmp_path / "eval_bundle"))  # default retries and backoff
    assert time.monotonic() - t0 < 10
    msg = str(exc.value)
    assert "\n" not in msg and "cannot reach nanochat-data.invalid" in msg and "NANOCHAT_EVAL_BUNDLE_URL" in msg
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("error, transient", [
    (urllib.error.URLError(socket.timeout("timed out")), True),
    (TimeoutError("The read operation timed out"), True),
    (urllib.error.HTTPError("http://x", 503, "Service Unavailable", None, None), True),
    (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), True),
    (urllib.error.URLError(socket.gaierror(-2, "Name or service not known")), False),
    (urllib.error.URLError(ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")), False),
    (urllib.error.URLError(OSError(errno.ENETUNREACH, "Network is unreachable")), False),
])
def test_transient_errors_retry_unreachable_hosts_do_not(monkeypatch, tmp_path, error, transient):
    calls = []

    def fetch(url, tmp, timeout):
        calls.append(url)
        raise error

    monkeypatch.setattr(dataset, "_fetch", fetch)
    with pytest.raises(RuntimeError) as exc:
        dataset.download_file("http://mirror.example:8080/x", str(tmp_path / "x"), dataset._is_parquet,
                              retries=2, backoff=0.001)
    assert len(calls) == (3 if transient else 1)
    assert isinstance(exc.value, dataset.HostUnreachable) != transient
    if not transient:
        assert "cannot reach mirror.example:8080 (" in str(exc.value)


def test_download_then_rerun_is_a_no_op(server, tmp_path, capsys):
    for i in (0, 1, dataset.MAX_SHARD):
        server.files[f"shard_{i:05d}.parquet"] = make_shard_bytes(tmp_path, str(i), n_docs=300)
    dataset.download(2, **FAST)
    assert len(server.requests) == 3
    assert [os.path.basename(p) for p in shards.list_shards("train")] == ["shard_00000.parquet", "shard_00001.parquet"]
    assert [os.path.basename(p) for p in shards.list_shards("val")] == ["shard_06542.parquet"]
    assert shards.read_manifest(shards.get_data_dir()) == {
        "source": "climbmix", "train": ["shard_00000.parquet", "shard_00001.parquet"],
        "val": ["shard_06542.parquet"],
        "docs": {"shard_00000.parquet": 300, "shard_00001.parquet": 300, "shard_06542.parquet": 300}}
    assert len(capsys.readouterr().out.strip().splitlines()) == 1 + 3  # header + one line per shard
    dataset.download(2, **FAST)
    assert len(server.requests) == 3


def test_download_reports_first_error_after_the_rest(server, tmp_path):
    for i in (0, dataset.MAX_SHARD):  # shard 1 is missing upstream
        server.files[f"shard_{i:05d}.parquet"] = make_shard_bytes(tmp_path, str(i), n_docs=300)
    with pytest.raises(RuntimeError, match="shard_00001.parquet: HTTP Error 404"):
        dataset.download(2, **FAST)
    assert shard_names(shards.get_data_dir()) == ["shard_00000.parquet", "shard_06542.parquet"]


def test_download_refuses_old_local_shards_without_manifest(server, tmp_path, capsys):
    for i in (0, 1, dataset.MAX_SHARD):
        server.files[f"shard_{i:05d}.parquet"] = make_shard_bytes(tmp_path, str(i), n_docs=300)
    data_dir = shards.get_data_dir()
    dataset.write_shards([f"local doc {i}" for i in range(30)], data_dir, docs_per_shard=10, val_docs=5)
    os.remove(os.path.join(data_dir, "manifest.json"))  # built by a version from before manifests
    before = {n: open(os.path.join(data_dir, n), "rb").read() for n in shard_names(data_dir)}
    with pytest.raises(ValueError) as exc:
        dataset.download(2, **FAST)
    assert str(exc.value).startswith(f"{data_dir} holds 4 shards with no manifest.json and no ClimbMix val shard "
                                     f"shard_06542.parquet, so they are not an interrupted ClimbMix download")
    assert f"or delete {data_dir} to download" in str(exc.value) and "\n" not in str(exc.value)
    # nothing fetched, nothing relabelled as ClimbMix
    assert server.requests == [] and not os.path.exists(os.path.join(data_dir, "manifest.json"))
    assert {n: open(os.path.join(data_dir, n), "rb").read() for n in shard_names(data_dir)} == before
    assert run(dataset.main, ["-n", "2"]) == 1
    assert "so they are not an interrupted ClimbMix download" in capsys.readouterr().err
    # an interrupted download (the val shard comes first, so it is there) still resumes
    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    dataset.download_shard(dataset.MAX_SHARD, resumed, **FAST)
    dataset.download(2, resumed, **FAST)
    assert shards.read_manifest(resumed)["train"] == ["shard_00000.parquet", "shard_00001.parquet"]


def test_download_fetches_the_val_shard_before_any_train_shard(server, tmp_path):
    for i in (0, 1, 2, dataset.MAX_SHARD):
        server.files[f"shard_{i:05d}.parquet"] = make_shard_bytes(tmp_path, str(i), n_docs=300)
    dataset.download(3, workers=3, **FAST)
    assert server.requests[0][0].endswith("/" + dataset.VAL_SHARD)


# -----------------------------------------------------------------------------
# list_shards / iter_documents

def test_list_shards_errors(tmp_path):
    with pytest.raises(ValueError, match="'test'"):
        shards.list_shards("test", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="python -m nanochat.dataset -n 8") as exc:
        shards.list_shards("train", str(tmp_path))
    assert str(tmp_path) in str(exc.value)
    dataset.write_shards(["a", "b"], str(tmp_path), docs_per_shard=5, val_docs=1)
    os.remove(tmp_path / "shard_00000.parquet")  # only the val shard left: no train split
    (tmp_path / "shard_00007.parquet.partial").write_bytes(b"junk")  # temp files never count
    with pytest.raises(FileNotFoundError) as exc:
        shards.list_shards("val", str(tmp_path))  # any missing shard, whichever split is asked for
    assert str(exc.value) == (f"{tmp_path / 'shard_00000.parquet'}: this train shard (listed in manifest.json) "
                              f"is missing; delete {tmp_path} and build it again from write_shards")
    os.remove(tmp_path / "manifest.json")
    with pytest.raises(FileNotFoundError, match=r"no manifest.json in .* \(it holds 1 shards of an unfinished"):
        shards.list_shards("val", str(tmp_path))


def test_missing_val_shard_is_an_error_not_a_train_shard_promoted(tmp_path):
    dataset.write_shards([f"doc {i}" for i in range(30)], str(tmp_path), docs_per_shard=10, val_docs=5)
    assert shards.read_manifest(str(tmp_path)) == {
        "source": "write_shards", "train": [f"shard_{i:05d}.parquet" for i in range(3)],
        "val": ["shard_00003.parquet"], "docs": {"shard_00000.parquet": 10, "shard_00001.parquet": 10,
                                                 "shard_00002.parquet": 5, "shard_00003.parquet": 5}}
    os.remove(tmp_path / "shard_00003.parquet")
    for split in ("val", "train"):  # before manifests, val silently became shard_00002, a train shard
        with pytest.raises(FileNotFoundError) as exc:
            shards.list_shards(split, str(tmp_path))
        assert str(exc.value).startswith(f"{tmp_path / 'shard_00003.parquet'}: this val shard (listed in "
                                         f"manifest.json) is missing; delete {tmp_path} and build it again")
    # the same for downloaded shards, whose fix is to download the missing one again
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "source": "climbmix"}))
    with pytest.raises(FileNotFoundError, match=r"this val shard .* is missing; run `python -m nanochat.dataset -n 8`"):
        shards.list_shards("train", str(tmp_path))


def test_shards_without_manifest(tmp_path):
    # built by hand, or an interrupted download: nothing says which shard is val, so nothing is
    # guessed, not even ClimbMix's last shard by its index
    for name in ("shard_00000.parquet", "shard_00001.parquet", "shard_06542.parquet"):
        pq.write_table(pa.table({"text": ["x"]}), tmp_path / name)
    with pytest.raises(FileNotFoundError) as exc:
        shards.list_shards("val", str(tmp_path))
    assert str(exc.value).startswith(f"no manifest.json in {tmp_path} (it holds 3 shards of an unfinished build")
    assert "python -m nanochat.dataset --local PATH" in str(exc.value) and "-n 8" in str(exc.value)
    (tmp_path / "manifest.json").write_text('{"source": "x"}')
    with pytest.raises(ValueError, match="manifest.json: not a valid shard manifest; delete"):
        shards.list_shards("val", str(tmp_path))


# -----------------------------------------------------------------------------
# local sources

@pytest.fixture
def local_corpus(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    jsonl = [f"json doc {i}\nwith a second line" for i in range(30)]
    (src / "a.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(jsonl)))
    txt = [f"paragraph {i} line one\nparagraph {i} line two" for i in range(20)]
    (src / "b.txt").write_text("\n\n  \n".join(txt) + "\n\n\n")
    pqt = [f"parquet doc {i}" for i in range(25)]
    pq.write_table(pa.table({"text": pqt, "n": list(range(25))}), src / "sub" / "c.parquet", row_group_size=10)
    (src / "README.md").write_text("not a document source; skipped inside directories")
    return src, jsonl + txt + pqt


def test_read_local_documents(local_corpus):
    src, docs = local_corpus
    assert Counter(dataset.read_local_documents([str(src)])) == Counter(docs)
    assert list(dataset.read_local_documents([str(src / "b.txt")]))[:2] == docs[30:32]


def test_build_local(local_corpus, tmp_path):
    src, docs = local_corpus
    out = str(tmp_path / "out")
    paths = dataset.build_local([str(src)], out, docs_per_shard=20, row_group_size=8)
    # 75 docs: val keeps 75 // 10 = 7, the other 68 make shards of 20, 20, 20, 8
    assert [os.path.basename(p) for p in paths] == [f"shard_{i:05d}.parquet" for i in range(5)]
    assert shards.list_shards("val", out) == [paths[-1]]
    rows = [pq.ParquetFile(p).metadata.num_rows for p in paths]
    assert rows == [20, 20, 20, 8, 7]
    meta = pq.ParquetFile(paths[0]).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [8, 8, 4]
    train, val = list(shards.iter_documents("train", out)), list(shards.iter_documents("val", out))
    assert Counter(train + val) == Counter(docs)
    assert not set(val) <= set(docs[:30])  # shuffled: val is not just the head of the first file
    # a second build into the same dir would mix two datasets: refused
    with pytest.raises(ValueError, match="already holds shards"):
        dataset.build_local([str(src)], out)


def test_gzipped_files_are_read_as_they_are(local_corpus, tmp_path):
    src, docs = local_corpus
    for name in ("a.jsonl", "b.txt"):
        with open(src / name, "rb") as f, gzip.open(tmp_path / (name + ".gz"), "wb") as g:
            g.write(f.read())
    assert list(dataset.read_local_documents([str(tmp_path / "a.jsonl.gz"), str(tmp_path / "b.txt.gz")])) == docs[:50]


def test_other_source_on_built_shards_is_refused_in_one_line(local_corpus, tmp_path, capsys):
    src, _ = local_corpus
    out = tmp_path / "o"
    assert run(dataset.main, ["--local", str(src / "a.jsonl"), str(src / "b.txt"), "--out", str(out)]) == 0
    first = f"{src / 'a.jsonl'}, {src / 'b.txt'}"
    assert shards.read_manifest(str(out))["source"] == first
    capsys.readouterr()
    # the same source again (speedrun.sh re-run): kept as it is, each shard opened to check it
    before = {n: os.path.getmtime(out / n) for n in os.listdir(out)}
    assert run(dataset.main, ["--local", str(src / "a.jsonl"), str(src / "b.txt"), "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"data: shards already in {out} (built from {first})\n"
    assert {n: os.path.getmtime(out / n) for n in os.listdir(out)} == before
    # other data on the same dir: said in one line with the fix, nothing touched
    for argv, new in [(["--local", str(src / "sub")], str(src / "sub")), (["--demo"], "demo")]:
        assert run(dataset.main, argv + ["--out", str(out)]) == 1
        assert capsys.readouterr().err.splitlines() == [
            f"error: {out} already holds shards from {first}, not from {new}: set NANOCHAT_BASE_DIR to another "
            f"dir (or pass --out), or delete {out}"]
    with pytest.raises(ValueError, match=f"{out} holds shards built from {src}.*not climbmix: set NANOCHAT_BASE_DIR"):
        dataset.download(2, str(out))
    assert {n: os.path.getmtime(out / n) for n in os.listdir(out)} == before
    # shards with no manifest (an older version) are not taken for any source either
    os.remove(out / "manifest.json")
    assert run(dataset.main, ["--local", str(src / "a.jsonl"), str(src / "b.txt"), "--out", str(out)]) == 1
    assert "already holds shards from another source (no manifest.json)" in capsys.readouterr().err


def test_iter_documents_ranks_partition_the_data(local_corpus, tmp_path):
    src, _ = local_corpus
    out = str(tmp_path / "out")
    dataset.build_local([str(src)], out, docs_per_shard=20, row_group_size=4)
    everything = list(shards.iter_documents("train", out))
    r0 = list(shards.iter_documents("train", out, rank=0, world_size=2))
    r1 = list(shards.iter_documents("train", out, rank=1, world_size=2))
    assert r0 and r1 and not set(r0) & set(r1)
    assert Counter(r0 + r1) == Counter(everything) and len(everything) == 68


def test_write_shards_leaves_nothing_on_failure(tmp_path):
    def texts():
        yield from (f"doc {i}" for i in range(30))
        raise ValueError("source broke")
    with pytest.raises(ValueError, match="source broke"):
        dataset.write_shards(texts(), str(tmp_path), docs_per_shard=5, val_docs=3)
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="need more than val_docs=3"):
        dataset.write_shards(["a", "b", "c"], str(tmp_path), val_docs=3)


def test_local_source_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: no 'text' field"):
        list(dataset.read_local_documents([str(bad)]))
    nocol = tmp_path / "nocol.parquet"
    pq.write_table(pa.table({"body": ["x"]}), nocol)
    with pytest.raises(ValueError, match=r"nocol\.parquet: no 'text' column \(columns: body\)"):
        list(dataset.read_local_documents([str(nocol)]))


def test_cli_unknown_extension(tmp_path):
    csv = tmp_path / "data.csv"
    csv.write_text("text\nhello\n")
    result = subprocess.run([sys.executable, "-m", "nanochat.dataset", "--local", str(csv), "--out", str(tmp_path / "o")],
                            cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"error: {csv}: unknown file type, expected .jsonl, .txt, .parquet, .jsonl.gz, .txt.gz or a directory"]


def test_cli_local_build(local_corpus, tmp_path, capsys):
    src, _ = local_corpus
    out = tmp_path / "o"
    assert run(dataset.main, ["--local", str(src), "--out", str(out), "--docs-per-shard", "40"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"done: 2 train shard(s) + 1 val shard in {out}"


# -----------------------------------------------------------------------------
# Hugging Face `datasets`, offline on a local directory of .jsonl files

@pytest.fixture
def hf_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    pytest.importorskip("datasets")
    src = tmp_path / "hf_src"
    src.mkdir()
    docs = [f"hf doc {i}" for i in range(60)]
    for part in range(2):
        with open(src / f"part{part}.jsonl", "w") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in docs[part * 30:(part + 1) * 30])
    return src, docs


def test_build_hf(hf_dir, tmp_path):
    src, docs = hf_dir
    out = str(tmp_path / "out")
    paths = dataset.build_hf(str(src), out, docs_per_shard=20, val_docs=10, row_group_size=8)
    assert len(paths) == 4 and pq.ParquetFile(paths[-1]).metadata.num_rows == 10
    found = list(shards.iter_documents("train", out)) + list(shards.iter_documents("val", out))
    assert Counter(found) == Counter(docs)
    assert found != docs  # shuffled


def test_build_hf_missing_column(hf_dir, tmp_path):
    src, _ = hf_dir
    with pytest.raises(ValueError, match=r"no column 'body' \(columns: text\)"):
        dataset.build_hf(str(src), str(tmp_path / "out"), text_column="body")
    assert not os.path.exists(tmp_path / "out") or os.listdir(tmp_path / "out") == []


# -----------------------------------------------------------------------------
# the demo data shipped in the package

DEMO_TASKS = 18  # hellaswag (used by 2 tasks), squad and coqa are not in the bundle: 18 of 22 tasks


def test_demo_build(tmp_path, capsys):
    out = tmp_path / "base_data"
    assert run(dataset.main, ["--demo", "--out", str(out)]) == 0
    manifest = shards.read_manifest(str(out))
    assert manifest["source"] == "demo"
    assert (manifest["train"], manifest["val"]) == (["shard_00000.parquet"], ["shard_00001.parquet"])
    # 780 web pages + 7,222 blank-line-separated Shakespeare passages; 10% of them are val
    assert manifest["docs"] == {"shard_00000.parquet": 7202, "shard_00001.parquet": 800}
    found = list(shards.iter_documents("train", str(out))) + list(shards.iter_documents("val", str(out)))
    assert Counter(found) == Counter(dataset.read_local_documents([dataset.DEMO_CORPUS]))
    assert capsys.readouterr().out.splitlines()[-1] == f"done: 1 train shard(s) + 1 val shard in {out}"
    # automatic row groups: 64 in the train shard, 8 in the val shard (with 1,024 documents per row
    # group, as before, it had 8 and 1, and the README's d12 run, 16 data streams, stopped at once)
    groups = {name: [g.num_rows for g in map(pq.read_metadata(str(out / name)).row_group,
                                              range(pq.read_metadata(str(out / name)).num_row_groups))]
              for name in manifest["docs"]}
    assert [len(groups["shard_00000.parquet"]), len(groups["shard_00001.parquet"])] == [64, 8]
    assert max(groups["shard_00000.parquet"]) == 113 and max(groups["shard_00001.parquet"]) == 100


def test_demo_shards_feed_every_data_stream_of_the_readme_commands(tmp_path, monkeypatch):
    # `python -m scripts.base_train --depth 12` on one process: 16 micro-steps, so 16 train streams;
    # 8 GPUs × 8 micro-steps: 64. Every stream must get row groups; val is read by one stream per process.
    from nanochat.dataloader import DataLoader
    from nanochat.recipe import derive
    from nanochat.tokenizer import Tokenizer
    assert derive(depth=12, vocab_size=8192, sequence_len=2048, processes=1, device_batch_size=16).grad_accum_steps == 16
    out = tmp_path / "base_data"
    dataset.build_local([dataset.DEMO_CORPUS], str(out), source="demo")
    tok = Tokenizer.train(iter(list(shards.iter_documents("train", str(out)))[:50]), vocab_size=300)
    for split, streams in (("train", 64), ("val", 8)):
        loader = DataLoader(tok, 2, 32, split, data_dir=str(out), rank=streams - 1, world_size=streams)
        x, _ = next(loader)
        loader.close()
        assert x.shape == (2, 32)
    with pytest.raises(ValueError, match="data stream 8 of 9 gets no row group of the 'val' shards"):
        DataLoader(tok, 2, 32, "val", data_dir=str(out), rank=8, world_size=9)


def test_explicit_row_group_size_is_kept(tmp_path):
    paths = dataset.write_shards([f"doc {i}" for i in range(300)], str(tmp_path), docs_per_shard=200, val_docs=50,
                                 row_group_size=128)
    assert [pq.read_metadata(p).num_row_groups for p in paths] == [2, 1, 1]  # 200 = 128 + 72, 50, 50


def test_demo_eval_bundle():
    from nanochat.core_eval import load_tasks
    tasks = load_tasks(dataset.DEMO_EVAL_BUNDLE)
    assert len(tasks) == 22
    present = {t["label"]: len(t["data"]) for t in tasks if t["data"] is not None}
    assert len(present) == DEMO_TASKS
    assert present.pop("bigbench_repeat_copy_logic") == 32  # the whole task file is 32 items
    assert set(present.values()) == {50}
    notice = open(os.path.join(dataset.DEMO_DIR, "NOTICE")).read()
    for source in ["MIT License", "public domain", "Apache License 2.0", "web_dclm.jsonl.gz", "tinyshakespeare.txt.gz"]:
        assert source in notice
    for t in tasks:
        if t["data"] is not None:
            assert os.path.basename(t["path"])[:-len(".jsonl")] in notice


def test_demo_data_is_small_and_has_no_share_alike_corpus():
    files = [os.path.join(root, n) for root, _, names in os.walk(dataset.DEMO_DIR) for n in names]
    assert sum(os.path.getsize(f) for f in files) < 3_000_000
    corpus = sorted(os.listdir(dataset.DEMO_CORPUS))
    assert corpus == ["tinyshakespeare.txt.gz", "web_dclm.jsonl.gz"]  # not the WikiText file: CC BY-SA


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED, "eval_bundle")), reason="../shared not present")
def test_demo_data_is_reproducible_from_shared(tmp_path):
    from nanochat.make_demo_data import make_demo_data
    make_demo_data(SHARED, str(tmp_path))
    shipped = dataset.DEMO_DIR
    rebuilt = sorted(os.path.relpath(os.path.join(r, n), tmp_path) for r, _, names in os.walk(tmp_path) for n in names)
    assert rebuilt == sorted(os.path.relpath(os.path.join(r, n), shipped)
                             for r, _, names in os.walk(shipped) for n in names if n != "NOTICE")
    for rel in rebuilt:
        read = gzip.open if rel.endswith(".gz") else open  # compare contents: zlib versions may differ in bytes
        with read(os.path.join(tmp_path, rel), "rb") as a, read(os.path.join(shipped, rel), "rb") as b:
            assert a.read() == b.read(), rel


def test_make_demo_data_without_shared_is_a_one_line_usage_error(tmp_path, capsys):
    from nanochat import make_demo_data
    with pytest.raises(SystemExit) as exc:
        make_demo_data.main(["--shared", str(tmp_path), "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert capsys.readouterr().err == (f"python -m nanochat.make_demo_data: error: {tmp_path / 'corpus'} not found: "
                                       f"pass --shared DIR (see --help)\n")
    assert not os.path.exists(tmp_path / "out")


def test_demo_data_ships_with_the_package():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(os.path.join(REPO_ROOT, "pyproject.toml"), "rb") as f:
        patterns = tomllib.load(f)["tool"]["setuptools"]["package-data"]["nanochat"]
    package = os.path.join(REPO_ROOT, "nanochat")
    shipped = {p for pattern in patterns for p in glob.glob(os.path.join(package, pattern))}
    files = {os.path.join(r, n) for r, _, names in os.walk(dataset.DEMO_DIR) for n in names if "__pycache__" not in r}
    assert files and files == shipped
