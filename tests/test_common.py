import os
import subprocess
import sys
import textwrap

import pytest
import torch

from nanochat import common
from nanochat.cli import BadInput


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


def test_an_unknown_gpu_reports_no_mfu_unless_given_its_peak(monkeypatch):
    monkeypatch.delenv("NANOCHAT_PEAK_TFLOPS", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA TITAN V")
    cuda = torch.device("cuda", 0)
    assert common.get_peak_flops(cuda) is None  # not a wrong number
    assert common.unknown_peak_note(cuda) == ("MFU n/a (unknown peak for the NVIDIA TITAN V): give its dense bf16 "
                                              "TFLOP/s with --peak-tflops or NANOCHAT_PEAK_TFLOPS")
    assert common.get_peak_flops(cuda, 110.0) == 110e12 and common.unknown_peak_note(cuda, 110.0) is None
    monkeypatch.setenv("NANOCHAT_PEAK_TFLOPS", "125")
    assert common.get_peak_flops(cuda) == 125e12 and common.unknown_peak_note(cuda) is None
    assert common.get_peak_flops(cuda, 110.0) == 110e12  # the flag wins
    monkeypatch.setenv("NANOCHAT_PEAK_TFLOPS", "fast")
    with pytest.raises(BadInput, match="NANOCHAT_PEAK_TFLOPS='fast': expected the GPU's dense bf16 TFLOP/s"):
        common.get_peak_flops(cuda)
    assert common.unknown_peak_note(torch.device("cpu"), None) is None  # CPUs have no MFU to miss


# -----------------------------------------------------------------------------
# CUDA asked for but unusable (typically: the torch wheel is built for a newer CUDA than the
# node's driver): one line with the driver, torch's CUDA version and the build to install


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.delenv("NANOCHAT_DEVICE", raising=False)
    return monkeypatch


def fake_nvidia_smi(monkeypatch, tmp_path, driver):
    smi = tmp_path / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\necho {driver}\necho {driver}\n")  # one line per GPU
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")


def test_driver_version_from_nvidia_smi(no_cuda, tmp_path):
    no_cuda.setenv("PATH", str(tmp_path))  # no nvidia-smi at all
    assert common.nvidia_driver_version() is None
    fake_nvidia_smi(no_cuda, tmp_path, "550.54.15")
    assert common.nvidia_driver_version() == "550.54.15"


@pytest.mark.parametrize("driver,fix", [
    ("570.124.06", "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"),
    ("560.35.03", "whl/cu126"),
    ("550.54.15", "whl/cu124"),
    ("470.82.01", "upgrade the driver to 580 or newer"),
])
def test_old_driver_fails_with_one_line_naming_driver_cuda_and_fix(no_cuda, tmp_path, driver, fix):
    fake_nvidia_smi(no_cuda, tmp_path, driver)
    with pytest.raises(SystemExit) as exc:
        common.compute_init("cuda")
    msg = str(exc.value)
    assert "\n" not in msg and f"driver {driver}" in msg and "CUDA 13.0" in msg and ">= 580.65" in msg
    assert fix in msg


def test_other_reasons_cuda_is_unusable(no_cuda, tmp_path):
    no_cuda.setenv("PATH", str(tmp_path))
    assert "no NVIDIA driver found" in common.cuda_unusable_reason()
    fake_nvidia_smi(no_cuda, tmp_path, "580.82.07")  # new enough: then it is the visibility
    assert "CUDA_VISIBLE_DEVICES" in common.cuda_unusable_reason()
    no_cuda.setattr(torch.version, "cuda", None)
    assert "CPU-only build" in common.cuda_unusable_reason()


def test_gpu_node_never_autodetects_cpu(no_cuda, tmp_path):
    no_cuda.setattr(torch.backends.mps, "is_available", lambda: False)
    no_cuda.setenv("PATH", str(tmp_path))
    assert common.autodetect_device_type() == "cpu"  # a machine without a driver: CPU is right
    fake_nvidia_smi(no_cuda, tmp_path, "570.124.06")
    with pytest.raises(SystemExit, match="driver 570.124.06 .*cu128.*--device-type cpu"):
        common.autodetect_device_type()
    no_cuda.setenv("NANOCHAT_DEVICE", "cpu")  # asked for explicitly: fine
    assert common.autodetect_device_type() == "cpu"


def test_tf32_setting_leaves_the_legacy_getters_working():
    """torch.backends.cuda.matmul.fp32_precision = "tf32" would make both getters raise on
    torch 2.13; inductor's max-autotune and the profilers call them."""
    try:
        common.set_matmul_precision()
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.backends.cuda.matmul.allow_tf32 is True
    finally:
        torch.set_float32_matmul_precision("highest")
    assert torch.backends.cuda.matmul.allow_tf32 is False


@pytest.mark.parametrize("name, key", [("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA H100 PCIe", "H100 PCIe"),
                                       ("NVIDIA GH200 480GB", "GH200"), ("NVIDIA H200", "H200"),
                                       ("NVIDIA GeForce RTX 4090", "RTX 4090")])
def test_peak_flops_takes_the_most_specific_name(name, key):
    from nanochat.common import PEAK_BF16_FLOPS, peak_flops_for
    assert peak_flops_for(name) == PEAK_BF16_FLOPS[key]
    assert peak_flops_for("Some Unknown GPU") is None
