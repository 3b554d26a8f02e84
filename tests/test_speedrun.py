"""The whole product, smoke-sized: the README's first command, `bash speedrun.sh`, exactly as written,
on a copy of the repo, with the data host unreachable. Without a GPU it must run every stage offline
on the demo data shipped in the package; with one it must download, and fail fast when it cannot."""
import json
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
        ".git", ".venv", "__pycache__", ".pytest_cache", "*.egg-info", "build", ".measure", ".data", ".whl"))
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
        NANOCHAT_DEPTH="2",  # compiled, as the demo is: a smaller graph compiles faster
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
    config = json.loads((base / "base_checkpoints" / "d2" / "config.json").read_text())
    assert config["depth"] == 2 and config["args"]["compile"] is True  # NANOCHAT_DEPTH; compiled, as the demo is
    assert re.search(r"CORE over 18\D+22 tasks", report)  # hellaswag (2 tasks), squad, coqa not in the bundle
    for label in ["arc_easy", "piqa", "winograd", "boolq", "lambada_openai"]:
        assert label in report
    for png in ["train_loss.png", "val_bpb.png", "core_tasks.png"]:
        path = base / "report" / png
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"report/{png}" in report

    # run again, as after a preemption once everything finished: each stage sees its output and skips;
    # this time in a given environment (NANOCHAT_PYTHON), where speedrun.sh makes and installs nothing
    shutil.rmtree(clone / ".venv")
    again = speedrun(clone, base, NANOCHAT_PYTHON=sys.executable, **smoke)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    for done in ["data: shards already in", "tokenizer: already trained", "training already complete",
                 "eval: already done"]:
        assert done in again.stdout
    assert f"speedrun: python {sys.executable}\n" in again.stdout and not (clone / ".venv").exists()

    # other data on the same base dir is refused in one line, not silently mixed with (or hidden by) the
    # demo's; here from an activated environment that has the project installed (python3 first on PATH)
    active = tmp_path / "active-env"
    active.mkdir()
    (active / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (active / "python3").chmod(0o755)
    other = speedrun(clone, base, path_prefix=active, NANOCHAT_DATA_SOURCE="climbmix", **smoke)
    assert f"speedrun: python {active / 'python3'}\n" in other.stdout and not (clone / ".venv").exists()
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


def fake_gpus(tmp_path, count, name="NVIDIA H100 80GB HBM3", memory_mb=81559, compute_cap="9.0"):
    """A bin dir whose nvidia-smi answers as a GPU node's does, for speedrun.sh's hardware block."""
    fake = tmp_path / "fakebin"
    fake.mkdir(parents=True)
    (fake / "nvidia-smi").write_text(
        f'#!/bin/sh\ncase "$*" in\n'
        f'  -L) for i in $(seq 0 {count - 1}); do echo "GPU $i: {name} (UUID: GPU-$i)"; done ;;\n'
        f'  *memory.total*) echo {memory_mb} ;;\n  *compute_cap*) echo {compute_cap} ;;\n  *name*) echo "{name}" ;;\n'
        f'esac\n')
    (fake / "nvidia-smi").chmod(0o755)
    return fake


def test_speedrun_gpu_node_without_network_stops_fast(clone, tmp_path):
    t0 = time.monotonic()
    out = speedrun(clone, tmp_path / "base", timeout=120, path_prefix=fake_gpus(tmp_path, 8))
    fail_fast(out, time.monotonic() - t0)
    assert "speedrun: 8 GPU(s)" in out.stdout and "data: source climbmix" in out.stdout
    assert " d24: 1536 wide" in out.stdout and "NANOCHAT_HOURS" not in out.stdout  # the record: no warning


def test_one_gpu_is_told_the_time_first_and_nanochat_hours_sizes_the_model(clone, tmp_path):
    from scripts import plan
    one_h100 = fake_gpus(tmp_path, 1)
    out = speedrun(clone, tmp_path / "base", timeout=120, path_prefix=one_h100)
    assert out.returncode == 1  # then stops at the unreachable data host, as any GPU node would
    hours = plan.main(["--depth", "24", "--target-param-data-ratio", "8", "--device-batch-size", "16", "--fp8",
                       "--gpus", "1", "--gpu", "h100"])["hours"]
    block = out.stdout[out.stdout.index("====="):out.stdout.index("data: source")]
    assert f"its training\n alone takes {hours:.2f} h" in block and "NANOCHAT_HOURS=4 bash speedrun.sh" in block
    assert "not to fit" not in block  # d24 fits an 80 GB card

    sized = speedrun(clone, tmp_path / "base2", timeout=120, path_prefix=one_h100, NANOCHAT_HOURS="4")
    depth = plan.main(["--hours", "4", "--target-param-data-ratio", "8", "--fp8", "--gpus", "1", "--gpu", "h100",
                       "--json"])["sized"]["depth"]
    assert depth < 24 and "<- chosen" in sized.stderr
    assert f"model                        d{depth}: " in sized.stdout and "=====" not in sized.stdout
    assert re.search(r"\ndevice batch +\d+ × 2048 \(auto\)\n", sized.stdout)  # the largest that fits, found at start

    unknown = speedrun(clone, tmp_path / "base3", timeout=120, path_prefix=fake_gpus(tmp_path / "x", 1, "NVIDIA TITAN V"),
                       NANOCHAT_HOURS="4")
    assert unknown.returncode == 1 and unknown.stderr.strip().splitlines()[-1].startswith(
        "error: NANOCHAT_HOURS: scripts.plan has no speed for the NVIDIA TITAN V; choose a depth instead, "
        "e.g. NANOCHAT_DEPTH=12")

    both = speedrun(clone, tmp_path / "base4", timeout=120, path_prefix=one_h100, NANOCHAT_DEPTH="12",
                    NANOCHAT_HOURS="4")
    assert both.returncode == 1 and both.stderr.strip().splitlines() == [
        "error: NANOCHAT_DEPTH and NANOCHAT_HOURS both size the model: set one of them"]


def test_speedrun_climbmix_requested_without_network_stops_fast(clone, tmp_path):
    t0 = time.monotonic()
    out = speedrun(clone, tmp_path / "base", timeout=120, NANOCHAT_DATA_SOURCE="climbmix")
    fail_fast(out, time.monotonic() - t0)


def test_a_given_python_that_lacks_the_project_is_refused_in_one_line(clone, tmp_path):
    out = speedrun(clone, tmp_path / "base", timeout=60, NANOCHAT_PYTHON="/usr/bin/false")
    assert out.returncode == 1 and out.stderr.strip().splitlines() == [
        "error: NANOCHAT_PYTHON=/usr/bin/false: cannot import the project's dependencies with it; install them "
        "into that environment (pip install -e .) or unset NANOCHAT_PYTHON to let speedrun.sh make .venv"]


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU machine would run the real recipe")
def test_ctrl_c_during_training_stops_speedrun_before_evaluation(clone, tmp_path):
    # Ctrl-C in a terminal sends SIGINT to the whole foreground process group: bash and training
    base = tmp_path / "base"
    env = {**{k: v for k, v in os.environ.items() if k not in ("NANOCHAT_DATA_SOURCE", "NANOCHAT_EVAL_BUNDLE",
                                                                 "PYTHONPATH")},
           "NANOCHAT_BASE_DIR": str(base), "NANOCHAT_DATA_URL": UNREACHABLE, "NANOCHAT_DEPTH": "2",
           "NANOCHAT_TRAIN_ARGS": "--no-compile --num-iterations 5000 --eval-every 0 --core-every 0 --sample-every 0"}
    proc = subprocess.Popen(["bash", "speedrun.sh"], cwd=clone, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    metrics = base / "base_checkpoints" / "d2" / "metrics.jsonl"
    deadline = time.time() + 600
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3) and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, 2)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out[-3000:]  # base_train's 128 + SIGINT, passed on by set -e
    assert "stopped by signal 2 at step" in out
    stages = [line.split("\t")[0] for line in (base / "speedrun_stages.tsv").read_text().splitlines()]
    assert stages[-1] == "train"  # evaluation never started
    assert not (base / "base_checkpoints" / "d2" / "base_eval.json").exists() and not (base / "report.md").exists()
