"""Device, precision, attention backend and compilation: shared by every command that runs
the model."""

from __future__ import annotations

import contextlib
import os
from functools import lru_cache
from pathlib import Path

import torch

from bd3.config import PRECISIONS
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


MODEL_PRECISIONS = tuple(p for p in PRECISIONS if p != "auto")  # what `auto` resolves to: fp32, bf16 (autocast)


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
