"""The whole product, smoke-sized: speedrun.sh in CPU mode on the shared corpus and eval bundle."""
import os
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared")


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED, "corpus")), reason="../shared/corpus not present")
@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU machine would run the real recipe")
def test_speedrun_cpu_smoke(tmp_path):
    env = {**os.environ,
           "NANOCHAT_BASE_DIR": str(tmp_path),
           "NANOCHAT_DATA_SOURCE": os.path.join(SHARED, "corpus"),
           "NANOCHAT_EVAL_BUNDLE": os.path.join(SHARED, "eval_bundle"),
           # smoke sizes, as environment overrides of the same script users run
           "NANOCHAT_TRAIN_ARGS": "--num-iterations 4 --eval-every 2 --eval-tokens 8192 --sample-every 4 "
                                  "--core-every 4 --core-max-per-task 2",
           "NANOCHAT_EVAL_ARGS": "--max-per-task 2 --bpb-tokens 8192"}
    speedrun = lambda: subprocess.run(["bash", os.path.join(REPO, "speedrun.sh")], env=env,  # noqa: E731
                                      capture_output=True, text=True, timeout=900)
    out = speedrun()
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = (tmp_path / "report.md").read_text()
    assert "val bpb" in report
    assert "CORE over 18/22 tasks" in report  # hellaswag (2 tasks), squad, coqa absent from the bundle
    for label in ["arc_easy", "piqa", "winograd", "boolq", "lambada_openai"]:
        assert label in report
    for png in ["train_loss.png", "val_bpb.png", "core_tasks.png"]:
        path = tmp_path / "report" / png
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"report/{png}" in report

    # run again, as after a preemption once everything finished: each stage sees its output and skips
    again = speedrun()
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    for done in ["data: shards already in", "tokenizer: already trained", "training already complete",
                 "eval: already done"]:
        assert done in again.stdout
