"""
Shard download, listing and building. Downloads are served by a local HTTP server that
can misbehave on request (drop the connection, send a truncated file, 404), so no network.
"""
import json
import os
import socket
import subprocess
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import dataset

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
    assert path == os.path.join(dataset.get_data_dir(), "shard_00003.parquet")
    assert open(path, "rb").read() == src
    assert shard_names(dataset.get_data_dir()) == ["shard_00003.parquet"]  # no temp file left over


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
    assert not os.path.exists(os.path.join(dataset.get_data_dir(), "shard_00000.parquet"))


def test_truncated_file_fails_verification(server, tmp_path):
    server.files["shard_00001.parquet"] = make_shard_bytes(tmp_path, "a")
    server.truncate = True
    with pytest.raises(RuntimeError, match="corrupt or truncated"):
        dataset.download_shard(1, **FAST)
    assert len(server.requests) == FAST["retries"] + 1
    assert shard_names(dataset.get_data_dir()) == []  # neither the final name nor a bad temp file


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
    with pytest.raises(RuntimeError, match=f"could not download http://127.0.0.1:{port}/shard_00000.parquet"):
        dataset.download_shard(0, data_dir=str(tmp_path), **FAST)
    assert os.listdir(tmp_path) == []


def test_download_then_rerun_is_a_no_op(server, tmp_path, capsys):
    for i in (0, 1, dataset.MAX_SHARD):
        server.files[f"shard_{i:05d}.parquet"] = make_shard_bytes(tmp_path, str(i), n_docs=300)
    dataset.download(2, **FAST)
    assert len(server.requests) == 3
    assert [os.path.basename(p) for p in dataset.list_shards("train")] == ["shard_00000.parquet", "shard_00001.parquet"]
    assert [os.path.basename(p) for p in dataset.list_shards("val")] == ["shard_06542.parquet"]
    assert len(capsys.readouterr().out.strip().splitlines()) == 1 + 3  # header + one line per shard
    dataset.download(2, **FAST)
    assert len(server.requests) == 3


def test_download_reports_first_error_after_the_rest(server, tmp_path):
    for i in (0, dataset.MAX_SHARD):  # shard 1 is missing upstream
        server.files[f"shard_{i:05d}.parquet"] = make_shard_bytes(tmp_path, str(i), n_docs=300)
    with pytest.raises(RuntimeError, match="shard_00001.parquet: HTTP Error 404"):
        dataset.download(2, **FAST)
    assert shard_names(dataset.get_data_dir()) == ["shard_00000.parquet", "shard_06542.parquet"]


# -----------------------------------------------------------------------------
# list_shards / iter_documents

def test_list_shards_errors(tmp_path):
    with pytest.raises(ValueError, match="'test'"):
        dataset.list_shards("test", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="python -m nanochat.dataset -n 8") as exc:
        dataset.list_shards("train", str(tmp_path))
    assert str(tmp_path) in str(exc.value)
    dataset.write_shards(["a", "b"], str(tmp_path), docs_per_shard=5, val_docs=1)
    os.remove(tmp_path / "shard_00000.parquet")  # only the val shard left: no train split
    (tmp_path / "shard_00007.parquet.partial").write_bytes(b"junk")  # temp files never count
    with pytest.raises(FileNotFoundError, match="found 1 shard"):
        dataset.list_shards("val", str(tmp_path))


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
    assert dataset.list_shards("val", out) == [paths[-1]]
    rows = [pq.ParquetFile(p).metadata.num_rows for p in paths]
    assert rows == [20, 20, 20, 8, 7]
    meta = pq.ParquetFile(paths[0]).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [8, 8, 4]
    train, val = list(dataset.iter_documents("train", out)), list(dataset.iter_documents("val", out))
    assert Counter(train + val) == Counter(docs)
    assert not set(val) <= set(docs[:30])  # shuffled: val is not just the head of the first file
    # a second build into the same dir would mix two datasets: refused
    with pytest.raises(ValueError, match="already holds shards"):
        dataset.build_local([str(src)], out)


def test_iter_documents_ranks_partition_the_data(local_corpus, tmp_path):
    src, _ = local_corpus
    out = str(tmp_path / "out")
    dataset.build_local([str(src)], out, docs_per_shard=20, row_group_size=4)
    everything = list(dataset.iter_documents("train", out))
    r0 = list(dataset.iter_documents("train", out, rank=0, world_size=2))
    r1 = list(dataset.iter_documents("train", out, rank=1, world_size=2))
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
    assert result.stderr.splitlines() == [f"error: {csv}: unknown file type, expected .jsonl, .txt, .parquet or a directory"]


def test_cli_local_build(local_corpus, tmp_path, capsys):
    src, _ = local_corpus
    out = tmp_path / "o"
    assert dataset.main(["--local", str(src), "--out", str(out), "--docs-per-shard", "40"]) == 0
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
    found = list(dataset.iter_documents("train", out)) + list(dataset.iter_documents("val", out))
    assert Counter(found) == Counter(docs)
    assert found != docs  # shuffled


def test_build_hf_missing_column(hf_dir, tmp_path):
    src, _ = hf_dir
    with pytest.raises(ValueError, match=r"no column 'body' \(columns: text\)"):
        dataset.build_hf(str(src), str(tmp_path / "out"), text_column="body")
    assert not os.path.exists(tmp_path / "out") or os.listdir(tmp_path / "out") == []
