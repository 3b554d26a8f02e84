"""
Shared plumbing: where files live, which device and dtype to compute in,
distributed setup from the torchrun environment, and rank-0 printing.
"""
import ctypes
import datetime
import os
import signal
from contextlib import contextmanager

import torch
import torch.distributed as dist

from nanochat.cli import BadInput


def get_base_dir():
    """Everything a run produces lives here: shards, tokenizer, checkpoints, report."""
    given = os.environ.get("NANOCHAT_BASE_DIR")
    base = given or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    try:
        os.makedirs(base, exist_ok=True)
    except OSError as e:  # under a regular file, on a read-only disk, without permission
        where = f"NANOCHAT_BASE_DIR={given}" if given else f"the default base dir {base} (set NANOCHAT_BASE_DIR)"
        raise BadInput(f"{where}: cannot create it ({e.strerror}): point NANOCHAT_BASE_DIR at a writable "
                       f"directory") from None
    if not os.access(base, os.W_OK):
        raise BadInput(f"NANOCHAT_BASE_DIR={base}: not writable: point it at a writable directory")
    return base


def fsync_path(path):
    """Force a file's (or a directory's entries') data to the disk. Without it a rename can reach
    the disk before the data it points to, and a power cut leaves a complete-looking name over a
    truncated file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path):
    """Yield a temp path next to `path`; rename it over `path` only if the block succeeds.
    A crash, a power cut or an exception therefore never leaves a half-written file under the
    real name: the data is on disk (fsync) before the rename, and the rename before we return."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(os.path.dirname(os.path.abspath(path)))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def autodetect_device_type():
    """cuda > mps > cpu, unless NANOCHAT_DEVICE says otherwise. A machine with an NVIDIA driver
    whose torch cannot use CUDA is an error, not a quiet CPU run."""
    forced = os.environ.get("NANOCHAT_DEVICE")
    if forced:
        if forced not in ("cuda", "mps", "cpu"):
            raise BadInput(f"NANOCHAT_DEVICE={forced!r}: expected one of cuda, mps, cpu")
        return forced
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    driver = nvidia_driver_version()
    if driver is not None:  # a GPU node whose torch cannot use it: never train on CPU by accident
        raise SystemExit(f"a GPU driver is present but torch cannot use CUDA: {cuda_unusable_reason(driver)} "
                         f"(or pass --device-type cpu to run on the CPU anyway)")
    return "cpu"


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def compute_dtype(device_type):
    """The dtype matmuls run in. bf16 where the hardware has fast bf16 (CUDA SM80+),
    fp32 elsewhere (CPU bf16 is slow and MPS bf16 is patchy). NANOCHAT_DTYPE overrides."""
    forced = os.environ.get("NANOCHAT_DTYPE")
    if forced:
        if forced not in _DTYPES:
            raise BadInput(f"NANOCHAT_DTYPE={forced!r}: expected one of {', '.join(_DTYPES)}")
        return _DTYPES[forced]
    if device_type == "cuda" and torch.cuda.get_device_capability()[0] >= 8:
        return torch.bfloat16
    return torch.float32


def dist_info():
    """(is_distributed, rank, local_rank, world_size) read from the torchrun environment."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False, 0, 0, 1
    return True, int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"])


def get_rank():
    return dist.get_rank() if dist.is_initialized() else dist_info()[1]


def any_rank(flags, device):
    """True where any rank's flag is true: a bool, or a tuple of bools agreed in one collective.
    One process: the flags themselves, with no tensor and no device sync."""
    single = isinstance(flags, bool)
    flags = (flags,) if single else tuple(bool(f) for f in flags)
    if dist.is_initialized():
        t = torch.tensor([float(f) for f in flags], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        flags = tuple(bool(v) for v in t.tolist())
    return flags[0] if single else flags


def die_with_parent():
    """preexec_fn of a child process that must not outlive its parent (a training run launched by
    chaos or sweep): on Linux it gets SIGKILL when the parent dies, even by SIGKILL."""
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def print0(*args, **kwargs):
    """print on rank 0 only, so an 8-GPU run logs once."""
    if get_rank() == 0:
        print(*args, **kwargs, flush=True)


def keep_freed_memory():
    """CPU training allocates and frees the same large tensors (logits, activations) every step.
    glibc hands every block over its mmap threshold back to the OS on free, so each step pays
    page faults to get them back (measured: a 4-layer CPU step 1.5 s -> 1.1 s without that).
    Raise the mmap and trim thresholds so freed memory stays in the heap for reuse."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to tune
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


# The oldest Linux driver each CUDA version of a torch build runs on: the "Toolkit Driver
# Version" column of the CUDA Toolkit release notes (docs.nvidia.com/cuda/cuda-toolkit-release-notes,
# table "CUDA Toolkit and Corresponding Driver Versions", GA releases). Newest first.
MIN_DRIVER_FOR_CUDA = {"13.0": (580, 65), "12.9": (575, 51), "12.8": (570, 26), "12.6": (560, 28),
                       "12.4": (550, 54), "12.1": (530, 30)}


def nvidia_driver_version():
    """The NVIDIA driver version nvidia-smi reports, e.g. "570.124.06", or None without one."""
    import shutil
    import subprocess
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.split()
    return lines[0] if out.returncode == 0 and lines else None


def _driver_tuple(version):
    return tuple(int(part) for part in version.split(".")[:2])


def cuda_unusable_reason(driver=None):
    """One line saying why torch cannot use CUDA here and how to fix it. The usual cause on a
    rented node: the torch wheel was built for a newer CUDA than the node's driver supports.
    driver: the version nvidia_driver_version() already read (it runs nvidia-smi, up to 30 s)."""
    driver, built = driver or nvidia_driver_version(), torch.version.cuda
    install = "pip install torch=={v} --index-url https://download.pytorch.org/whl/cu{c}"
    version = torch.__version__.split("+")[0]
    if built is None:
        return (f"torch {torch.__version__} is a CPU-only build; install a CUDA build, e.g. "
                + install.format(v=version, c="130"))
    if driver is None:
        return (f"no NVIDIA driver found (nvidia-smi missing or failing); torch {version} is built for CUDA "
                f"{built}: install the driver, or pass --device-type cpu")
    need = MIN_DRIVER_FOR_CUDA.get(built)
    if need is not None and _driver_tuple(driver) < need:
        fits = [c for c, d in MIN_DRIVER_FOR_CUDA.items() if _driver_tuple(driver) >= d]
        fix = (install.format(v=version, c=fits[0].replace(".", "")) if fits
               else f"upgrade the driver to {need[0]} or newer")
        return (f"NVIDIA driver {driver} is too old for torch {version}, built for CUDA {built} (needs driver "
                f">= {need[0]}.{need[1]}); fix: {fix}")
    return (f"torch {version} (CUDA {built}) sees no GPU although NVIDIA driver {driver} is loaded: check "
            f"CUDA_VISIBLE_DEVICES and that nvidia-smi lists the GPUs")


def set_matmul_precision():
    """fp32 matmuls (rare here: everything big runs in bf16) may use tf32 tensor cores. Set through
    the legacy setter on purpose: torch 2.13's newer per-backend flag
    (torch.backends.cuda.matmul.fp32_precision) makes torch.get_float32_matmul_precision() and
    torch.backends.cuda.matmul.allow_tf32 raise, and inductor's max-autotune and the profilers read them."""
    torch.set_float32_matmul_precision("high")


# How long a rank waits at a collective before the process group gives up. It must exceed the longest
# stretch one rank can work while another waits for it. The longest in base_train: a CORE eval,
# all-reduced once per task (so a real wait is one task's share on one rank), and even a full CORE
# (all 52,400 items of the bundle) on ONE rank at ~20 ms per item (an estimate until a GPU measures
# it) is ~17 minutes; rank 0 writing a checkpoint (~12 GB at d24: a minute or two) and ranks compiling
# at different speeds are shorter. Samples run on every rank, so nobody waits for them. 30 minutes
# covers all of these, while a real hang still dies (and frees 8 GPUs) within the half hour.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=30)


def compute_init(device_type=None):
    """Pick the device, seed, and join the process group when launched by torchrun
    (nccl on CUDA, gloo otherwise). Returns (is_ddp, rank, local_rank, world_size, device).
    CUDA asked for but unusable is an error with the reason, never a silent fall back to CPU."""
    device_type = device_type or autodetect_device_type()
    if device_type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device-type cuda: {cuda_unusable_reason()}")
    torch.manual_seed(42)
    if device_type == "cuda":
        set_matmul_precision()
    is_ddp, rank, local_rank, world_size = dist_info()
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_type)
        keep_freed_memory()
    if is_ddp and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device_type == "cuda" else None,
                                timeout=PROCESS_GROUP_TIMEOUT)
        dist.barrier()
    return is_ddp, rank, local_rank, world_size, device


def compute_cleanup():
    if dist.is_initialized():
        dist.barrier()  # every rank done talking before the group goes away (gloo aborts otherwise)
        dist.destroy_process_group()


# Dense bf16 tensor-core peaks (FLOP/s, datasheets, no sparsity), matched against the CUDA device
# name: the longest key it contains wins. Consumer (GeForce) cards: with fp32 accumulation, which
# they run at half the fp16-accumulate rate. A card missing here reports no MFU rather than a wrong
# one; --peak-tflops or NANOCHAT_PEAK_TFLOPS gives its peak.
PEAK_BF16_FLOPS = {
    "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12, "H20": 148e12,
    "B200": 2250e12, "B100": 1750e12, "A100": 312e12, "A40": 149.7e12, "L40S": 362e12, "L40": 181e12,
    "L4": 121e12, "RTX 6000 Ada": 364.2e12, "RTX A6000": 154.8e12,
    "RTX 5090": 209.5e12, "RTX 4090": 165.2e12, "RTX 4080": 97.5e12, "RTX 3090": 35.6e12,
}


def get_peak_flops(device, peak_tflops=None):
    """bf16 peak of a device in FLOP/s: the one given (peak_override), else the table's for a CUDA
    device, else None (CPU, MPS, a card the table does not know: MFU is then not reported, rather
    than reported wrong)."""
    given = peak_override(peak_tflops)
    if given:
        return given
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return peak_flops_for(torch.cuda.get_device_name(device))


def peak_override(peak_tflops=None):
    """A peak the user gave, in FLOP/s: --peak-tflops, else NANOCHAT_PEAK_TFLOPS, else None."""
    given = peak_tflops or os.environ.get("NANOCHAT_PEAK_TFLOPS")
    try:
        return float(given) * 1e12 if given else None
    except ValueError:
        raise BadInput(f"NANOCHAT_PEAK_TFLOPS={given!r}: expected the GPU's dense bf16 TFLOP/s, e.g. 165") from None


def unknown_peak_note(device, peak_tflops=None):
    """The line a CUDA device gets when no peak is known for it (MFU is then not reported), else None."""
    if device.type != "cuda" or get_peak_flops(device, peak_tflops):
        return None
    return (f"MFU n/a (unknown peak for the {torch.cuda.get_device_name(device)}): give its dense bf16 TFLOP/s "
            f"with --peak-tflops or NANOCHAT_PEAK_TFLOPS")


def peak_flops_for(name):
    """The table's entry for a device name: the longest key it contains, so "NVIDIA GH200 480GB"
    finds GH200 (not H200) and "H100 PCIe" is not taken for the SXM H100."""
    keys = [key for key in PEAK_BF16_FLOPS if key in name]
    return PEAK_BF16_FLOPS[max(keys, key=len)] if keys else None


def mfu(tokens_per_sec, flops_per_token, peak_flops):
    """Model FLOPs utilization: achieved model FLOP/s over the hardware's peak (None if unknown)."""
    return None if not peak_flops else tokens_per_sec * flops_per_token / peak_flops
