"""
Tests for scripts/base_eval.py: the eval bundle download (served from 127.0.0.1: a good zip,
a 404, a transient 503, a truncated zip) and an end-to-end run on a tiny checkpoint.
"""
import dataclasses
import http.server
import io
import json
import math
import os
import shutil
import threading
import zipfile

import pytest
import torch

from nanochat import core_eval, report
from nanochat.checkpoint import get_run_dir, save_checkpoint
from nanochat.dataset import write_shards
from nanochat.gpt import GPTConfig, build_model
from nanochat.tokenizer import Tokenizer, get_tokenizer_dir
from scripts import base_eval
from conftest import error_line

BUNDLE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "eval_bundle")
TASK_FILES = ["commonsense_reasoning/copa.jsonl", "language_understanding/winograd_wsc.jsonl"]
pytestmark = pytest.mark.skipif(not os.path.isdir(BUNDLE), reason="shared/eval_bundle not present")


def bundle_zip():
    """eval_bundle.zip as released (one top-level eval_bundle/ dir), with two of the task files."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name in ["core.yaml", "eval_meta_data.csv"] + [f"eval_data/{f}" for f in TASK_FILES]:
            z.write(os.path.join(BUNDLE, name), f"eval_bundle/{name}")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server():
    """A local HTTP server: `routes` maps a path to a list of (status, body) answers, the last
    one repeated; every request is recorded in `hits`."""
    routes, hits = {}, []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            answers = routes.get(self.path, [(404, b"not found")])
            status, body = answers.pop(0) if len(answers) > 1 else answers[0]
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield url, routes, hits
    httpd.shutdown()


def test_download_unpacks_bundle(server, tmp_path):
    url, routes, _ = server
    routes["/good.zip"] = [(200, bundle_zip())]
    dest = tmp_path / "eval_bundle"
    assert base_eval.download_eval_bundle(str(dest), url + "/good.zip", backoff=0) == str(dest)
    tasks = core_eval.load_tasks(str(dest))
    assert len(tasks) == 22 and sum(t["data"] is not None for t in tasks) == 2
    assert os.listdir(tmp_path) == ["eval_bundle"]  # no temp zip or temp dir left behind


def test_download_retries_a_transient_error(server, tmp_path):
    url, routes, hits = server
    routes["/flaky.zip"] = [(503, b"busy"), (200, bundle_zip())]
    base_eval.download_eval_bundle(str(tmp_path / "eval_bundle"), url + "/flaky.zip", backoff=0)
    assert hits.count("/flaky.zip") == 2 and (tmp_path / "eval_bundle" / "core.yaml").exists()


def test_download_404_is_one_line_naming_url_and_fix(server, tmp_path):
    url, _, hits = server
    with pytest.raises(RuntimeError) as e:
        base_eval.download_eval_bundle(str(tmp_path / "eval_bundle"), url + "/missing.zip", backoff=0)
    msg = str(e.value)
    assert url + "/missing.zip" in msg and "404" in msg and "--eval-bundle" in msg and "\n" not in msg
    assert hits.count("/missing.zip") == 1  # a 404 is not retried
    assert os.listdir(tmp_path) == []


def test_truncated_zip_leaves_no_bundle(server, tmp_path):
    url, routes, hits = server
    data = bundle_zip()
    routes["/cut.zip"] = [(200, data[:len(data) // 2])]
    with pytest.raises(RuntimeError, match="cut.zip"):
        base_eval.download_eval_bundle(str(tmp_path / "eval_bundle"), url + "/cut.zip", retries=1, backoff=0)
    assert hits.count("/cut.zip") == 2  # a corrupt download is tried again
    assert os.listdir(tmp_path) == []


# -----------------------------------------------------------------------------
# End to end: a tiny checkpoint, tokenizer and shards in a temp base dir

@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    words = "to be or not that is the question whether tis nobler in mind suffer slings arrows 12 345".split()
    docs = [" ".join(words[(i * j + j // 3) % len(words)] for j in range(60 + i % 40)) for i in range(240)]
    write_shards(docs, str(tmp_path / "base_data"), docs_per_shard=100, val_docs=40, row_group_size=16)
    tok = Tokenizer.train(docs, 300)
    tok.save(get_tokenizer_dir())
    torch.manual_seed(0)
    cfg = GPTConfig(sequence_len=64, vocab_size=tok.vocab_size, n_layer=1, n_head=1, n_embd=64)
    model = build_model(cfg, "cpu")
    save_checkpoint(get_run_dir("d1"), 7, model, None, meta={"model_config": dataclasses.asdict(cfg)}, loader_states=[])
    return tmp_path


def test_main_end_to_end(base_dir, server, monkeypatch, capsys):
    url, routes, _ = server
    routes["/bundle.zip"] = [(200, bundle_zip())]
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE_URL", url + "/bundle.zip")
    res = base_eval.main(["--core-max-per-task", "2", "--bpb-tokens", "512", "--device-batch-size", "2",
                          "--samples", "2", "--device-type", "cpu"])
    assert (base_dir / "eval_bundle" / "core.yaml").exists()  # downloaded to the default place, then used
    with open(get_run_dir("d1") + "/base_eval.json") as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(res))
    assert saved["step"] == 7 and (saved["n_tasks"], saved["n_total"]) == (2, 22)
    assert saved["core_label"] == "CORE over 2/22 tasks, seeded subset of 2 items per task"
    assert (saved["rules"], saved["max_per_task"]) == (core_eval.RULES, 2)
    assert saved["model"] == "d1" and all(t["n_items"] == 2 for t in saved["tasks"].values())
    assert set(saved["tasks"]) == {"copa", "winograd"} and math.isfinite(saved["core"])
    # an untrained model predicts ~uniformly: bpb near log2(vocab) / bytes per token, certainly > 1
    assert math.isfinite(saved["bpb"]["val"]) and 1 < saved["bpb"]["val"] < 20 and math.isfinite(saved["bpb"]["train"])
    assert len(saved["samples"]) == 4 and saved["samples"][0].startswith("[greedy] The capital of France is")
    out = capsys.readouterr().out
    assert "CORE over 2/22 tasks, seeded subset of 2 items per task (rules: leaderboard, rev 1):" in out
    assert "val bpb" in out and "(data file missing)" in out
    # the report says which evaluator and which items produced the score
    with open(report.write_report(str(base_dir))) as f:
        md = f.read()
    assert "ours (d1), CORE over 2/22 tasks, seeded subset of 2 items per task" in md
    assert ("CORE rules: leaderboard, rev 1; items: the first 2 of each task's fixed shuffle, not comparable "
            "with a full score.") in md
    assert "GPT-2 rows do not compare" not in md


def test_main_404_exits_with_one_line(base_dir, server, monkeypatch, capsys):
    url, _, _ = server
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE_URL", url + "/nope.zip")
    msg = error_line(base_eval.main, ["--device-type", "cpu", "--bpb-tokens", "0"], capsys)
    assert url + "/nope.zip" in msg and "--eval-bundle" in msg
    assert not (base_dir / "eval_bundle").exists()


def test_main_uses_given_bundle_and_newest_tag(base_dir, tmp_path):
    cfg = GPTConfig(sequence_len=32, vocab_size=300, n_layer=1, n_head=1, n_embd=64)
    old = save_checkpoint(get_run_dir("d0"), 3, build_model(cfg, "cpu"), None,
                          meta={"model_config": dataclasses.asdict(cfg)}, loader_states=[])
    os.utime(os.path.dirname(old), (1e9, 1e9))  # an older run: not the default
    bundle = tmp_path / "my_bundle"
    only_copa = lambda d, names: [n for n in names if n.endswith(".jsonl") and n != "copa.jsonl"]  # noqa: E731
    shutil.copytree(BUNDLE, bundle, ignore=only_copa)
    res = base_eval.main(["--eval-bundle", str(bundle), "--core-max-per-task", "3", "--bpb-tokens", "0",
                          "--samples", "0", "--device-type", "cpu"])
    assert res["step"] == 7 and res["n_tasks"] == 1 and res["tasks"]["copa"]["n_items"] == 3
    assert res["bpb"] == {} and res["samples"] == []
    assert not (base_dir / "eval_bundle").exists()  # nothing downloaded


def test_missing_shards_fail_before_core(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))  # no shards, no checkpoint
    msg = error_line(base_eval.main, ["--eval-bundle", BUNDLE, "--device-type", "cpu"], capsys)
    assert msg.startswith("error: no manifest.json in") and "--bpb-tokens 0" in msg


def test_hf_path_excludes_our_checkpoint_flags(capsys):
    with pytest.raises(SystemExit):
        base_eval.main(["--hf-path", "openai-community/gpt2", "--model-tag", "d1"])
    assert "--hf-path evaluates a Hugging Face model" in capsys.readouterr().err
