"""The precision float32 kernels are computed in: float32 throughout, unless the user asked torch for less.

torch multiplies float32 in float32 by default (``torch.get_float32_matmul_precision() == "highest"``) but lets
cuDNN convolve float32 in TF32 (``torch.backends.cudnn.allow_tf32``, default True). For an NTK that is a silent
error of percents: on an H200, resnet18's float32 kernel at 32×32 by Jacobian contraction and by NTK-vector
products was 2.3% off the float64 one with the flag as torch sets it, 1.4e-6 with it off
(``benchmarks/results/gpu/precision_check.json``). So every method computes float32 kernels in float32, unless the
user asked for reduced precision with ``torch.set_float32_matmul_precision("high")`` (TF32) or ``("medium")``
(bfloat16): then torch's flags are left as they are, and structured derivatives follow the same setting
(:func:`torchntk.bridge.device.jax_matmul_precision`). The caller's ``torch.autocast`` is off during a call: the
kernel is the model's own function's, in the model's dtype.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable)


def reduced_precision_requested() -> bool:
    """Whether the user let torch multiply float32 in less than float32 (``set_float32_matmul_precision``)."""
    return torch.get_float32_matmul_precision() != "highest"


# Calls in flight under float32_throughout, and torch's flags as the first of them found them: torch's flags are
# process-wide, so two overlapping calls (two threads) restore them once, when the last one leaves; each restoring
# its own copy would leave TF32 on under the other's computation, or off for good.
_LOCK = threading.Lock()
_DEPTH = 0
_SAVED: tuple[str, bool] = ("highest", True)


@contextlib.contextmanager
def float32_throughout() -> Iterator[None]:
    """Within: torch multiplies and convolves float32 in float32 (no TF32); both flags restored after, by the last
    of overlapping calls to leave.

    torch's flags are process-wide: another thread's float32 convolutions meanwhile run in float32 too (slower, not
    wrong). No effect on the CPU, where torch computes float32 in float32 anyway.
    """
    global _DEPTH, _SAVED
    with _LOCK:
        if _DEPTH == 0:
            _SAVED = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
        _DEPTH += 1
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        with _LOCK:
            _DEPTH -= 1
            if _DEPTH == 0:
                torch.set_float32_matmul_precision(_SAVED[0])
                torch.backends.cudnn.allow_tf32 = _SAVED[1]


# Where torch may autocast; the ones this build has are turned off where on (turning one off that torch cannot
# autocast on warns).
_AUTOCAST_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu")


def autocast_off() -> contextlib.ExitStack:
    """Within: no autocast (of the calling thread's, which autocast's state is). A kernel taken under the caller's
    ``torch.autocast`` was the NTK of a bfloat16-rounded function, or failed deep inside ``torch.func`` with
    ``expected scalar type BFloat16 but found Float``."""
    stack = contextlib.ExitStack()
    for device_type in _AUTOCAST_DEVICE_TYPES:
        if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
            stack.enter_context(torch.autocast(device_type, enabled=False))
    return stack


@contextlib.contextmanager
def kernel_precision() -> Iterator[None]:
    """What a kernel's computation runs under: no autocast (:func:`autocast_off`), and :func:`float32_throughout`
    unless the user asked torch for reduced precision (:func:`reduced_precision_requested`: then torch's flags are
    as they are)."""
    with autocast_off(), contextlib.nullcontext() if reduced_precision_requested() else float32_throughout():
        yield


def in_kernel_precision(fn: F) -> F:
    """``fn`` (a public entry point: ``ntk``, ``ntk_vp``, ``explain``, the ``linalg`` functions) run under
    :func:`kernel_precision`, from its first probe of the model on: the probe sets the kernel's dtype."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with kernel_precision():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
