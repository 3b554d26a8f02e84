"""The whole product, smoke-sized: the README's first command, `bash speedrun.sh`, exactly as written,
on a copy of the repo, with the data host unreachable. Without a GPU it must run every stage offline
on the demo data shipped in the package; with one it must download, and fail fast when it cannot."""
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNREACHABLE = "http://nanochat-data.invalid"  # .invalid never resolves (RFC 6761)


@pytest.fixture
def clone(tmp_path):
    """A copy of the repo whose .venv is this interpreter, so speedrun.sh installs nothing."""
    repo = tmp_path / "nanochat"
    shutil.copytree(REPO, repo, ignore=shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", ".pytest_cache", "*.egg-info", "build"))
    (repo / ".venv" / "bin").mkdir(parents=True)
    python = repo / ".venv" / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    (repo / ".venv" / ".installed").touch()  # newer than pyproject.toml: no pip install
    (repo / ".venv" / ".installed-gpu").touch()  # nor of the gpu extra on a (fake) GPU node
    return repo


def speedrun(repo, base_dir, timeout=900, path_prefix=None, **env):
    env = {**{k: v for k, v in os.environ.items()
              if k not in ("NANOCHAT_DATA_SOURCE", "NANOCHAT_EVAL_BUNDLE", "PYTHONPATH")},
           "NANOCHAT_BASE_DIR": str(base_dir), "NANOCHAT_DATA_URL": UNREACHABLE,
           "NANOCHAT_EVAL_BUNDLE_URL": f"{UNREACHABLE}/eval_bundle.zip", **env}
    if path_prefix:
        env["PATH"] = f"{path_prefix}:{env['PATH']}"
    return subprocess.run(["bash", "speedrun.sh"], cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU machine would run the real recipe")
def test_speedrun_cpu_smoke(clone, tmp_path):
    base = tmp_path / "base"
    smoke = dict(  # smoke sizes, as environment overrides of the same script users run
        NANOCHAT_TRAIN_ARGS="--num-iterations 4 --eval-every 2 --bpb-tokens 8192 --final-bpb-tokens 8192 "
                            "--sample-every 4 --core-every 4 --core-max-per-task 2",
        NANOCHAT_EVAL_ARGS="--core-max-per-task 2 --bpb-tokens 8192")
    out = speedrun(clone, base, **smoke)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "data: source demo" in out.stdout and "downloading" not in out.stdout + out.stderr
    assert not (base / "eval_bundle").exists()  # the shipped demo bundle was used
    assert '"source": "demo"' in (base / "base_data" / "manifest.json").read_text()
    report = (base / "report.md").read_text()
    assert "val bpb" in report
    assert re.search(r"CORE over 18\D+22 tasks", report)  # hellaswag (2 tasks), squad, coqa not in the bundle
    for label in ["arc_easy", "piqa", "winograd", "boolq", "lambada_openai"]:
        assert label in report
    for png in ["train_loss.png", "val_bpb.png", "core_tasks.png"]:
        path = base / "report" / png
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"report/{png}" in report

    # run again, as after a preemption once everything finished: each stage sees its output and skips
    again = speedrun(clone, base, **smoke)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    for done in ["data: shards already in", "tokenizer: already trained", "training already complete",
                 "eval: already done"]:
        assert done in again.stdout

    # other data on the same base dir is refused in one line, not silently mixed with (or hidden by) the demo's
    other = speedrun(clone, base, NANOCHAT_DATA_SOURCE="climbmix", **smoke)
    assert other.returncode == 1
    assert other.stderr.strip().splitlines() == [
        f"error: {base / 'base_data'} holds shards built from demo, not climbmix: set NANOCHAT_BASE_DIR to "
        f"another dir (or --out), or delete {base / 'base_data'} to download"]


def fail_fast(out, seconds):
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    assert seconds < 60  # seconds, not 9 shards x 6 attempts with backoff (~3 minutes)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot reach nanochat-data.invalid (" in errors[0], out.stderr
    assert "NANOCHAT_DATA_SOURCE=demo" in errors[0] and "NANOCHAT_DATA_URL" in errors[0]


def test_speedrun_gpu_node_without_network_stops_fast(clone, tmp_path):
    fake = tmp_path / "fakebin"  # a GPU node as speedrun.sh sees it: nvidia-smi answers
    fake.mkdir()
    (fake / "nvidia-smi").write_text(
        '#!/bin/sh\ncase "$*" in\n'
        '  -L) for i in 0 1 2 3 4 5 6 7; do echo "GPU $i: NVIDIA H100 80GB HBM3 (UUID: GPU-$i)"; done ;;\n'
        '  *memory.total*) echo 81559 ;;\n  *compute_cap*) echo 9.0 ;;\n  *name*) echo "NVIDIA H100 80GB HBM3" ;;\n'
        'esac\n')
    (fake / "nvidia-smi").chmod(0o755)
    t0 = time.monotonic()
    out = speedrun(clone, tmp_path / "base", timeout=120, path_prefix=fake)
    fail_fast(out, time.monotonic() - t0)
    assert "speedrun: 8 GPU(s)" in out.stdout and "data: source climbmix" in out.stdout


def test_speedrun_climbmix_requested_without_network_stops_fast(clone, tmp_path):
    t0 = time.monotonic()
    out = speedrun(clone, tmp_path / "base", timeout=120, NANOCHAT_DATA_SOURCE="climbmix")
    fail_fast(out, time.monotonic() - t0)


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU machine would run the real recipe")
def test_ctrl_c_during_training_stops_speedrun_before_evaluation(clone, tmp_path):
    # Ctrl-C in a terminal sends SIGINT to the whole foreground process group: bash and training
    base = tmp_path / "base"
    env = {**{k: v for k, v in os.environ.items() if k not in ("NANOCHAT_DATA_SOURCE", "NANOCHAT_EVAL_BUNDLE",
                                                                 "PYTHONPATH")},
           "NANOCHAT_BASE_DIR": str(base), "NANOCHAT_DATA_URL": UNREACHABLE,
           "NANOCHAT_TRAIN_ARGS": "--num-iterations 5000 --eval-every 0 --core-every 0 --sample-every 0"}
    proc = subprocess.Popen(["bash", "speedrun.sh"], cwd=clone, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    metrics = base / "base_checkpoints" / "d4" / "metrics.jsonl"
    deadline = time.time() + 600
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3) and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, 2)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out[-3000:]  # base_train's 128 + SIGINT, passed on by set -e
    assert "stopped by signal 2 at step" in out
    stages = [line.split("\t")[0] for line in (base / "speedrun_stages.tsv").read_text().splitlines()]
    assert stages[-1] == "train"  # evaluation never started
    assert not (base / "base_checkpoints" / "d4" / "base_eval.json").exists() and not (base / "report.md").exists()
