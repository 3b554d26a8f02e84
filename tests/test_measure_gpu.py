"""scripts/measure_gpu.sh: every stage runs under one deadline, so a device call that runs out of
time still returns what finished. (The stages themselves: a dry run with MEASURE_TINY=1, docs/PERF.md.)"""
import os
import subprocess
import sys


def test_stages_past_the_deadline_are_skipped_and_named(tmp_path):
    env = {**os.environ, "NANOCHAT_PYTHON": sys.executable, "NANOCHAT_BASE_DIR": str(tmp_path),
           "MEASURE_SECONDS": "20"}  # under every stage's 30 s minimum
    out = subprocess.run(["bash", "scripts/measure_gpu.sh"], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    skipped = [line.split(":")[0] for line in out.stdout.splitlines() if "skipped" in line]
    assert skipped == ["=== gpu_check", "=== rank_of_8", "=== rank_of_8_bf16_head", "=== speedrun",
                       "=== whole_d12", "=== regional_d12", "=== gpu_check_compile", "=== whole_d24"]
    assert out.stdout.splitlines()[-1].startswith("measure_gpu: done in ")
    assert (tmp_path / "measure").is_dir()
