"""Where and how the inference engine computes: the device, the precision and the host's memory.

:func:`resolve_device` and :func:`resolve_precision` turn the settings' ``auto`` into a device
and an autocast dtype (bf16 on a CPU only where it has native bf16: :func:`cpu_supports_bf16`);
:func:`default_channels_last` and :func:`default_batch_size` are the engine's per-device
defaults; :func:`retain_freed_memory` and :func:`one_malloc_arena` keep glibc from returning
large freed buffers to the OS (page-fault churn); :func:`as_device_tensor` uploads an array once
(pinned and asynchronous on CUDA).
"""

from __future__ import annotations

import numpy as np
import torch

from gum_ray.errors import InputError
from gum_ray.tiling import Precision


def cpu_supports_bf16() -> bool:
    """True where the CPU has native bf16 arithmetic (AVX512-BF16 or AMX), so autocast pays."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # noqa: BLE001 - older torch builds
        return False


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"device {device!r}: not a device; use auto, cpu, cuda or cuda:N", param="device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device}: no CUDA GPU is visible here; use the cpu device", param="device")
    return dev


def resolve_precision(precision: Precision, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None = plain fp32)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device.type != "cuda":
            raise InputError("precision fp16 needs a CUDA GPU; on the CPU use bf16 or fp32", param="precision")
        return torch.float16
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_supports_bf16() else None
    raise InputError(f"precision {precision!r}: use auto, fp32, bf16 or fp16", param="precision")


def default_channels_last(device: torch.device, autocast_dtype: torch.dtype | None) -> bool:
    """Channels_last (with BN folded into the convs) unless told otherwise: oneDNN and cuDNN run it
    faster in every precision (measured: docs/performance.md). It changes fp32 rounding against
    mmseg's NCHW path, so the seed settings turn it off (``InferenceSettings.seed``)."""
    return True


def default_batch_size(device: torch.device) -> int:
    """Crops per forward when the settings leave it open: a GPU's batch fills it; on a CPU one crop
    already makes large GEMMs, and bigger batches only make bigger buffers (page faults)."""
    return 32 if device.type == "cuda" else 1


_MALLOC_TUNED = False


def retain_freed_memory(limit_bytes: int = 1 << 30) -> None:
    """Keep freed heap memory in the process (glibc): no page-fault churn for per-crop buffers.

    A network's activations (17-34 MB a crop) are above glibc's mmap threshold, so each is mapped
    and unmapped, and every page faults in again on every forward (millions of minor faults, seconds
    of system time). Raising the mmap and trim thresholds serves them from the heap, reused; peak
    RSS stays the working set. Linux/glibc only; elsewhere this does nothing.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, ctypes.c_int(limit_bytes // 4))  # M_MMAP_THRESHOLD
        libc.mallopt(-1, ctypes.c_int(limit_bytes))  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


_ONE_ARENA = False


def one_malloc_arena() -> None:
    """Have threads started from now on allocate from glibc's main heap, not arenas of their own.

    A model actor's reader threads allocate each cell's compressed objects and arrays (tens of MB)
    and free them a cell later. In a thread's own arena those live in heaps that glibc unmaps as
    soon as they are empty, so every cell's memory faults in afresh: 11,000-19,000 minor faults and
    68-117 against 44-56 ms a cell on one reader thread (the synthetic world; docs/performance.md),
    host time a GPU is not fed in. The main heap keeps freed memory (:func:`retain_freed_memory`). Few, large
    allocations per cell: the one arena's lock is not contended. Linux/glibc only; elsewhere this
    does nothing.
    """
    global _ONE_ARENA
    if _ONE_ARENA:
        return
    _ONE_ARENA = True
    retain_freed_memory()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-8, ctypes.c_int(1))  # M_ARENA_MAX
    except (OSError, AttributeError):  # not glibc
        pass


def as_device_tensor(a: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Upload ``a`` (pinned and asynchronous on CUDA); a tensor already there is returned as is. An
    array of one value broadcast (every stride 0: a cached part of only its fill value) is made a
    fill on the device, nothing copied."""
    if isinstance(a, np.ndarray) and a.size and not any(a.strides):
        return torch.full(a.shape, a.reshape(-1)[0].item(), dtype=torch.from_numpy(np.empty(0, a.dtype)).dtype,
                          device=device)
    t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
