"""Mixed precision: bf16 autocast on CPUs that support it, fp16 with a gradient scaler on
CUDA, fp32 otherwise."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 arithmetic (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def resolve_precision(requested: str, device: torch.device) -> str:
    """``auto`` → fp16 on CUDA, bf16 on a CPU with native bf16, else fp32. An explicit
    choice is honoured (bf16 on a CPU without native support is slow but correct)."""
    if requested != "auto":
        if requested == "fp16" and device.type != "cuda":
            raise ValueError("fp16 training needs a CUDA device; use bf16 or fp32 on CPU")
        return requested
    if device.type == "cuda":
        return "fp16"
    return "bf16" if cpu_supports_bf16() else "fp32"


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[object]:
    """The autocast context for ``precision`` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling is needed for fp16 only; elsewhere the scaler is a pass-through."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
