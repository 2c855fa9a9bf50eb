"""Device, precision, attention backend and compilation: shared by every command that runs
the model."""

from __future__ import annotations

import contextlib
import math
import os
import sys
from functools import lru_cache
from pathlib import Path

import torch

from bd3.choices import MODEL_PRECISIONS
from bd3.errors import Bd3Error


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise Bd3Error(f"Unknown device {name!r}; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise Bd3Error(f"--device {name} was asked for but CUDA is not available here; use --device cpu.")
    if device.type not in ("cpu", "cuda"):
        raise Bd3Error(f"Device type {device.type!r} is not supported; use cpu or cuda.")
    return device


def available_memory() -> int | None:
    """Bytes of memory this process can still take (MemAvailable, or the free pages); None
    where the system does not say."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


@lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), so autocast pays off."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` on CUDA and on CPUs with native bf16, else ``fp32``."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if cpu_has_bf16() else "fp32"
    if precision not in MODEL_PRECISIONS:
        raise Bd3Error(f"Unknown precision {precision!r}; choose auto, fp32 or bf16.")
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def configure_model(model, attn: str = "sdpa", compile: bool = False):
    """Set a DiT's attention backend (a resolved name: bd3.model.backends.resolve_attn) and,
    with ``compile``, compile each transformer block with ``torch.compile``. In place, so
    parameter names, checkpoints and the EMA are unchanged; blocks are where the time goes,
    and each compiles once and is reused by every layer of the same shape."""
    model.attn = attn
    if compile:
        for block in model.blocks:
            block.compile()
    return model


def available_cores() -> int:
    """CPU cores this process may use: its affinity mask, capped by a cgroup CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = cgroup_quota()
    return max(1, min(cores, math.ceil(quota))) if quota else max(1, cores)


def cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """Cores allowed by the cgroup (v2 cpu.max, else v1 cfs quota / period); None when unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota, period = (int((root / "cpu" / name).read_text()) for name in ("cpu.cfs_quota_us", "cpu.cfs_period_us"))
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def default_threads() -> int:
    """$OMP_NUM_THREADS when it is a positive integer, else the cores available to this process."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else available_cores()


def use_threads(threads: int | None, warn_if_loaded: bool = True) -> int:
    """Set torch's CPU threads to ``threads`` (--threads), else :func:`default_threads`; return
    the count. Without --threads, when the machine's 1-minute load average already exceeds
    its cores, say once on a terminal's stderr that more than one thread will be slow and how
    to set them (not in logs and pipes, whose readers did not start the command by hand)."""
    n = threads or default_threads()
    torch.set_num_threads(n)
    if threads is None and warn_if_loaded and n > 1 and os.environ.get("RANK", "0") == "0" and sys.stderr.isatty():
        load, cores = _load_average(), os.cpu_count() or 1
        if load > cores:
            print(
                f"Note: the load average ({load:.1f}) already exceeds this machine's {cores} cores, so {n} threads will wait on "
                "each other and this will be slow; --threads 1 (or the number of idle cores) is usually much faster.",
                file=sys.stderr,
            )
    return n


def _load_average() -> float:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0
