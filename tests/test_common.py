import os
import subprocess
import sys
import textwrap

import pytest
import torch

from nanochat import common


def test_base_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "nc"))
    assert common.get_base_dir() == str(tmp_path / "nc") and os.path.isdir(tmp_path / "nc")


def test_dtype_policy(monkeypatch):
    monkeypatch.delenv("NANOCHAT_DTYPE", raising=False)
    assert common.compute_dtype("cpu") == torch.float32
    monkeypatch.setenv("NANOCHAT_DTYPE", "bf16")
    assert common.compute_dtype("cpu") == torch.bfloat16
    monkeypatch.setenv("NANOCHAT_DTYPE", "float8")
    with pytest.raises(ValueError, match="NANOCHAT_DTYPE='float8'"):
        common.compute_dtype("cpu")


def test_device_override(monkeypatch):
    monkeypatch.setenv("NANOCHAT_DEVICE", "cpu")
    assert common.autodetect_device_type() == "cpu"
    monkeypatch.setenv("NANOCHAT_DEVICE", "tpu")
    with pytest.raises(ValueError, match="NANOCHAT_DEVICE='tpu'"):
        common.autodetect_device_type()


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("good")
    with pytest.raises(RuntimeError):
        with common.atomic_write(str(path)) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("crash mid-write")
    assert path.read_text() == "good" and os.listdir(tmp_path) == ["f.txt"]
    with common.atomic_write(str(path)) as tmp:
        open(tmp, "w").write("new")
    assert path.read_text() == "new"


def test_torchrun_gloo_init(tmp_path):
    # a real 2-process launch: the torchrun environment -> gloo process group -> all_reduce
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent("""
        import torch, torch.distributed as dist
        from nanochat.common import compute_init, compute_cleanup, print0
        is_ddp, rank, local_rank, world, device = compute_init("cpu")
        assert is_ddp and world == 2 and device.type == "cpu" and dist.get_backend() == "gloo"
        t = torch.tensor([rank + 1.0])
        dist.all_reduce(t)
        print0(f"sum={t.item()}")
        compute_cleanup()
    """))
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          "--standalone", str(script)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("sum=3.0") == 1  # printed once, by rank 0 only


def test_peak_flops_table_and_mfu(monkeypatch):
    assert common.get_peak_flops("cpu") is None and common.mfu(1e6, 1e9, None) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert common.get_peak_flops("cuda") == 989e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert common.get_peak_flops("cuda") == 756e12  # the more specific name wins
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    assert common.get_peak_flops("cuda") == 312e12
    # the speedrun anchor: 983K tok/s on 8 GPUs at 4.78e9 FLOPs/token is ~59% of 8 × 989 TFLOP/s
    assert common.mfu(983e3 / 8, 4.78e9, 989e12) == pytest.approx(0.594, abs=1e-3)
