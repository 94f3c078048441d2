"""The precision float32 kernels are computed in: float32 throughout, unless the user asked torch for less.

torch multiplies float32 in float32 by default but lets cuDNN convolve float32 in TF32
(``torch.backends.cudnn.conv.fp32_precision == "tf32"``; legacy ``allow_tf32``). For an NTK that is a silent error of
percents: on an H200, resnet18's float32 kernel at 32×32 by Jacobian contraction and by NTK-vector products was 2.3%
off the float64 one with torch's default, 1.4e-6 in float32 (``benchmarks/results/gpu/precision_check.json``). So
every method computes float32 kernels in float32, unless the user asked for reduced precision of products with
``torch.set_float32_matmul_precision("high")`` (TF32) or ``("medium")`` (bfloat16), or the ``fp32_precision``
settings of CUDA's or oneDNN's products: then torch's settings are left as they are, and structured derivatives
follow the same choice (:func:`torchntk.bridge.device.jax_matmul_precision`). The caller's ``torch.autocast`` is off
during a call: the kernel is the model's own function's, in the model's dtype.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, TypeVar

import torch

from torchntk._shared_override import SharedOverride

F = TypeVar("F", bound=Callable)


# torch's float32 precision settings (torch >= 2.9: ``torch.backends.<backend>[.<op>].fp32_precision``), each
# "ieee" (float32), "tf32", "bf16" or "none" (its parent's: the backend's, then torch.backends'; "ieee" at the top).
# The leaves a kernel's computation reads: products on CUDA, convolutions (and RNNs) by cuDNN and by oneDNN (the
# CPU), oneDNN's products. torch also keeps the legacy flags (``set_float32_matmul_precision``, ``cudnn.allow_tf32``)
# and checks them against these: its own code reads the legacy ones (aten's convolution asks ``cudnn.allow_tf32``),
# which raise where the two disagree ("you have used a mix of the legacy and new APIs"; torch.export failed so
# inside a call that had set only the new ones). So both are set, and read here only where torch allows.
_LEAVES = (
    ("cuda", "matmul"),
    ("cudnn", "conv"),
    ("cudnn", "rnn"),
    ("mkldnn", "matmul"),
    ("mkldnn", "conv"),
    ("mkldnn", "rnn"),
)
_NODES = ((), ("cudnn",), ("mkldnn",), *_LEAVES)
# The products' leaves: where the user's float32 matmul precision lives.
_PRODUCTS = (("cuda", "matmul"), ("mkldnn", "matmul"))


def _node(path: tuple[str, ...]) -> Any:
    node = torch.backends
    for name in path:
        node = getattr(node, name)
    return node


# torch's legacy flags as (getter, setter), in the order they are restored: the global matmul precision first, then
# the per-backend flags it also writes.
_LEGACY: dict[str, tuple[Callable[[], Any], Callable[[Any], None]]] = {
    "matmul": (lambda: torch.get_float32_matmul_precision(), lambda v: torch.set_float32_matmul_precision(v)),
    "cuda matmul": (
        lambda: torch.backends.cuda.matmul.allow_tf32,
        lambda v: setattr(torch.backends.cuda.matmul, "allow_tf32", v),
    ),
    "cudnn": (lambda: torch.backends.cudnn.allow_tf32, lambda v: setattr(torch.backends.cudnn, "allow_tf32", v)),
}


class Snapshot(NamedTuple):
    """torch's float32 precision settings as written, and the legacy flags torch let be read (where the user wrote
    the new settings so that the two disagree, torch refuses to read a legacy flag: it is not restored)."""

    settings: dict[tuple[str, ...], str]
    legacy: dict[str, Any]


def snapshot() -> Snapshot:
    legacy = {}
    for name, (read, _) in _LEGACY.items():
        with contextlib.suppress(RuntimeError):
            legacy[name] = read()
    return Snapshot({path: _node(path).fp32_precision for path in _NODES}, legacy)


def restore(saved: Snapshot) -> None:
    """The legacy flags that were read, then every setting exactly as written (``"none"`` stays ``"none"``) where the
    legacy flags did not already put it back: a setting written needlessly counts, for torch, as the new API used
    beside the legacy one, after which ``torch.get_float32_matmul_precision()`` raised (a user's "medium")."""
    for name, value in saved.legacy.items():
        read, write = _LEGACY[name]
        with contextlib.suppress(RuntimeError):  # a getter that raises: the flag is written
            if read() == value:
                continue
        write(value)
    for path, value in saved.settings.items():
        if _node(path).fp32_precision != value:
            _node(path).fp32_precision = value


def effective_precision(backend: str, op: str) -> str:
    """What ``torch.backends.<backend>.<op>`` computes float32 in: ``"ieee"``, ``"tf32"`` or ``"bf16"``."""
    for level in (_node((backend, op)), _node((backend,)), torch.backends):
        value = getattr(level, "fp32_precision", "none")
        if value != "none":
            return value
    return "ieee"


def matmul_precision() -> str:
    """The least precise of the float32 products the user allowed torch (``set_float32_matmul_precision``, or the
    ``fp32_precision`` settings of CUDA's and oneDNN's products): ``"ieee"``, ``"tf32"`` or ``"bf16"``."""
    allowed = {effective_precision(*leaf) for leaf in _PRODUCTS}
    return next((p for p in ("bf16", "tf32") if p in allowed), "ieee")


def float32_settings() -> str:
    """What each backend computes float32 products, convolutions and RNNs in (``"cuda.matmul=ieee cudnn.conv=tf32
    ..."``): a float32 kernel's values depend on it (a store's tiles taken under TF32 convolutions differ from full
    precision ones by ~1e-3)."""
    return " ".join(f"{backend}.{op}={effective_precision(backend, op)}" for backend, op in _LEAVES)


def reduced_precision_requested() -> bool:
    """Whether the user let torch multiply float32 in less than float32."""
    return matmul_precision() != "ieee"


def in_float32_everywhere() -> bool:
    """Whether torch now multiplies and convolves float32 in float32 on every backend of :data:`_LEAVES`."""
    return all(effective_precision(*leaf) == "ieee" for leaf in _LEAVES)


def _float32_everywhere() -> Snapshot:
    """Sets the legacy flags and every leaf of :data:`_LEAVES` to float32, consistently; returns what they were."""
    saved = snapshot()
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    for path in _LEAVES:
        _node(path).fp32_precision = "ieee"
    return saved


# torch's settings are process-wide: overlapping calls (two threads) share one override.
_FLOAT32 = SharedOverride(_float32_everywhere, restore)


def float32_throughout() -> contextlib.AbstractContextManager:
    """Within: torch multiplies and convolves float32 in float32 (the legacy flags and every leaf of
    :data:`_LEAVES` say so, consistently); after, the settings as they were (:func:`restore`), by the last of
    overlapping calls to leave.

    torch's settings are process-wide: another thread's float32 convolutions meanwhile run in float32 too (slower,
    not wrong).
    """
    return _FLOAT32.scope()


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


def running_under(context: Callable[[], contextlib.AbstractContextManager]) -> Callable[[F], F]:
    """A decorator: the function runs inside ``context()``."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with context():
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


#: For a public entry point (``ntk``, ``ntk_vp``, ``explain``, the ``linalg`` functions): it runs under
#: :func:`kernel_precision` from its first probe of the model on (the probe sets the kernel's dtype).
in_kernel_precision = running_under(kernel_precision)
#: For a conversion: under :func:`autocast_off` (torch.export traced the caller's autocast into the graph).
without_autocast = running_under(autocast_off)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums of ``dtype`` values are taken in: float32 for float16/bfloat16, whose kernel sums over
    parameters and traced axes overflow (a traced float16 kernel of mean 1.8e4 was ``inf``) or lose their digits, and
    which torch's eigensolvers refuse; results are returned in ``dtype``. (torch's own ``mean`` of float16 does so.)"""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
