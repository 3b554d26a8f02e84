"""scripts.gpu_check in CPU mode: every check that makes sense on a CPU passes, and a broken
kernel or a wrong collective stops it with one line naming the check and the fix."""
import os
import subprocess
import sys

import pytest
import torch

from nanochat import attention as attn
from scripts import gpu_check


def test_cpu_run_passes():
    out = subprocess.run([sys.executable, "-m", "scripts.gpu_check", "--cpu"], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    status = {line[6:30].strip(): line[:4].strip() for line in lines if line[:4] in ("PASS", "FAIL", "SKIP", "WARN")}
    for check in ["environment", "tf32 getters", "attention sdpa", "attention flex", "compile forward",
                  "compile optimizer step", "compile recompiles", "compile regional", "steps tiny", "collectives gloo"]:
        assert status.get(check) == "PASS", (check, out.stdout)
    assert status["attention fa3"] == status["attention fa4"] == "SKIP"  # they need a Hopper GPU
    assert status["compile optimizer"] == "SKIP"  # eager on CPU; tests/test_optim_compile.py compiles it
    assert "0 new graphs after 3 eval/sample rounds" in out.stdout
    assert "the sharded optimizer's update vs one process: rel err 0.0e+00" in out.stdout  # fp32 on CPU: exact
    assert "FAIL" not in status.values() and lines[-1].startswith("gpu_check: ") and "none failed" in lines[-1]


def test_wrong_attention_kernel_fails_with_one_line(monkeypatch, capsys):
    def off_by_a_bit(q, k, v, window):
        return attn.sdpa_attention(q, k, v, window) * 1.01  # 1 % off: far beyond fp32 rounding

    monkeypatch.setitem(attn.BACKENDS, "flex", ("FlexAttention", lambda device, dtype: off_by_a_bit))
    with pytest.raises(SystemExit) as exc:
        gpu_check.main(["--cpu", "--only", "attention"])
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("gpu_check FAILED (1 of 4 checks): attention flex: max rel err")
    assert "fix: avoid it: NANOCHAT_ATTN=sdpa" in msg
    assert "PASS  attention sdpa" in capsys.readouterr().out  # the other backends still ran


def test_wrong_collective_fails_with_one_line(monkeypatch):
    monkeypatch.setenv("NANOCHAT_GPU_CHECK_BREAK", "collectives")  # read by the spawned ranks
    with pytest.raises(SystemExit) as exc:
        gpu_check.main(["--cpu", "--only", "collectives"])
    msg = str(exc.value)
    assert "\n" not in msg and "collectives: ProcessRaisedException" in msg
    assert "wrong values from all-reduce (max error 1)" in msg and "fix: run NCCL_DEBUG=INFO" in msg


def test_unknown_check_names_the_flag(capsys):
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--only", "attention,speed"])
    assert "--only speed" in capsys.readouterr().err


def test_compare_backend_catches_a_wrong_gradient():
    def wrong_backward(q, k, v, window):  # right forward, gradient of v doubled
        out = attn.sdpa_attention(q, k, v, window)
        return out + (attn.sdpa_attention(q, k, v, window) - out.detach())
    cpu = torch.device("cpu")
    assert gpu_check.compare_backend(attn.sdpa_attention, cpu, torch.float32, 16, 64, 8, True) < 1e-6
    assert gpu_check.compare_backend(wrong_backward, cpu, torch.float32, 16, 64, 8, True) > 0.5


def test_a_kernel_that_loads_but_cannot_run_is_a_warning(monkeypatch, capsys):
    # flash-attn that imports on a Hopper GPU but fails its first call: training falls back (its trial
    # run), so gpu_check warns instead of stopping a paid run
    def broken(q, k, v, window):
        raise RuntimeError("window_size (8, 0) is not supported for head dim 16")

    monkeypatch.setitem(attn.BACKENDS, "fa4", ("flash-attn 4", lambda device, dtype: broken))
    gpu_check.main(["--cpu", "--only", "attention"])  # no SystemExit: nothing failed
    out = capsys.readouterr().out
    assert "WARN  attention fa4" in out and "loads but fails: RuntimeError: window_size (8, 0)" in out
    assert "training falls back to the next backend" in out


def test_a_failed_trial_run_shows_in_the_environment_check(monkeypatch):
    monkeypatch.setattr(attn, "_chosen", ("flex", attn.sdpa_attention))
    monkeypatch.setattr(attn, "trial_failures", {"fa4": "imports, but failed a trial run (RuntimeError: nope)"})
    results = {r.check: r for r in gpu_check.check_environment(torch.device("cpu"))}
    backend = results["attention backend"]
    assert backend.status == "WARN" and "fa4 imports, but failed a trial run (RuntimeError: nope)" in backend.detail
