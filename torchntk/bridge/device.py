"""Where structured derivatives run, and how tensors cross between torch and JAX there.

* **Placement.** SD computes on the JAX device that *is* the torch model's device: for ``cuda:k``, the JAX GPU whose
  PCI bus id is that of torch's ``cuda:k`` when JAX reports bus ids, else the one whose CUDA ordinal
  (``local_hardware_id``) is ``k`` — the mapping JAX's own DLPack import uses. Inputs, parameters and kernel tiles
  cross by DLPack without a host copy. With no JAX GPU backend (the ``[cuda]`` extra not installed), or a GPU JAX
  does not see, SD warns once and computes on the CPU.
* **Precision.** Float32 products and convolutions run at torch's float32 matmul precision
  (:func:`jax_matmul_precision`; torch's default ``"highest"``: float32 throughout). JAX's own default on a GPU lets
  XLA multiply float32 in TF32: on an H200, float32 structured kernels were 0.3–1.3% off JC's.
* **Sharing one GPU with torch.** ``torchntk/__init__.py`` turns XLA's preallocation off (unless the user set it);
  :func:`make_room` releases torch's cached blocks before a call whose tiles would not otherwise fit, and
  :func:`retry_smaller_on_oom` retries a tile that ran out of device memory once, as two halves.
"""

from __future__ import annotations

import contextlib
import functools
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from torchntk._precision import matmul_precision
from torchntk._problem import NTKProblem
from torchntk._tiles import TileOptions, memory_budget, tile_bytes
from torchntk._warnings import warn

CUDA_EXTRA = "pip install 'torchntk[cuda]'"
# Names under which a JAX GPU device may report its PCI bus id (jaxlib's device attributes vary by version/plugin).
_BUS_ID_ATTRIBUTES = ("pci_bus_id", "pci_bus_id_str")
# Warnings already given in this process (one per cause and device).
_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warn(message)


def normalize_bus_id(text: Any) -> str | None:
    """``"domain:bus:device"`` in lowercase hex from any PCI address spelling (``0000:3B:00.0``,
    ``00000000:3b:00.0``, ``3b:00``); ``None`` when ``text`` is not one."""
    match = re.fullmatch(r"\s*(?:([0-9a-fA-F]+):)?([0-9a-fA-F]+):([0-9a-fA-F]+)(?:\.[0-9a-fA-F]+)?\s*", str(text))
    if match is None:
        return None
    domain, bus, device = (int(part, 16) if part else 0 for part in match.groups())
    return f"{domain:04x}:{bus:02x}:{device:02x}"


def torch_bus_id(index: int) -> str | None:
    """PCI bus id of torch's ``cuda:index`` (``None`` where torch does not know it)."""
    props = torch.cuda.get_device_properties(index)
    try:
        return f"{props.pci_domain_id:04x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}"
    except AttributeError:
        return None


def jax_bus_id(device: Any) -> str | None:
    """PCI bus id of a JAX device, where its plugin reports one."""
    for name in _BUS_ID_ATTRIBUTES:
        value = getattr(device, name, None)
        if value:
            return normalize_bus_id(value)
    return None


def jax_gpu_devices() -> list[Any]:
    """JAX's GPU devices; empty when JAX has no GPU backend (CPU-only install, or the plugin found no GPU)."""
    import jax

    try:
        return list(jax.devices("gpu"))
    except RuntimeError:
        return []


def match_gpu(index: int, bus_id: str | None, candidates: list[Any]) -> Any | None:
    """The JAX device among ``candidates`` that is torch's ``cuda:index`` (bus id ``bus_id``), or ``None``.

    By bus id when both sides report one; by CUDA ordinal (``local_hardware_id``) otherwise. When JAX reports bus
    ids and none is ours, the ordinal is not trusted either (the two processes' views of the GPUs differ).
    """
    reported = {id(d): jax_bus_id(d) for d in candidates}
    if bus_id is not None and any(reported.values()):
        return next((d for d in candidates if reported[id(d)] == bus_id), None)
    return next((d for d in candidates if getattr(d, "local_hardware_id", None) == index), None)


def jax_device_for(device: torch.device) -> Any:
    """The JAX device to compute on for a model on ``device``: the same GPU when JAX has it, else the CPU."""
    import jax

    cpu = jax.devices("cpu")[0]
    if device.type != "cuda":
        return cpu
    gpus = jax_gpu_devices()
    if not gpus:
        _warn_once(
            "no-gpu-backend",
            f"torchntk: the model is on {device} but JAX has no GPU backend, so structured derivatives copy inputs "
            f"and parameters to the host and compute on the CPU; install JAX's CUDA backend with {CUDA_EXTRA}.",
        )
        return cpu
    index = device.index if device.index is not None else torch.cuda.current_device()
    match = match_gpu(index, torch_bus_id(index), gpus)
    if match is None:
        _warn_once(
            f"unmatched:{index}",
            f"torchntk: JAX sees the GPUs {gpus} but not the model's cuda:{index} (check CUDA_VISIBLE_DEVICES and "
            "JAX's jax_cuda_visible_devices); structured derivatives compute on the CPU.",
        )
        return cpu
    return match


# torch's float32 matmul precision (``torchntk._precision.matmul_precision``) as JAX's default matmul precision.
_JAX_MATMUL_PRECISION = {"ieee": "highest", "tf32": "high", "bf16": "default"}


def jax_matmul_precision() -> str:
    """JAX's precision for float32 products and convolutions that matches torch's float32 matmul precision:
    ``"highest"`` (float32, no TF32) for torch's default, ``"high"`` (TF32 allowed) for ``"high"``, and JAX's own
    ``"default"`` (TF32 on a GPU) for ``"medium"``. XLA:CPU multiplies float32 in float32 whatever it is told; on a
    GPU this decides TF32. It is baked into a program when traced, so compiled programs are keyed by it
    (:func:`torchntk.bridge.torch_glue._signature`, ``compile_cache.compile_persisted``)."""
    return _JAX_MATMUL_PRECISION[matmul_precision()]


def jax_platform_for(device: torch.device) -> str:
    """``"gpu"`` when structured derivatives for a model on ``device`` run on a JAX GPU, else ``"cpu"``."""
    return "cpu" if jax_device_for(device).platform == "cpu" else "gpu"


def to_jax_array(tensor: Tensor, target: Any) -> Any:
    """``tensor`` as a JAX array on the JAX device ``target`` (what :func:`jax_scope` yields), by DLPack.

    Zero-copy when ``tensor`` already is on ``target`` (a CUDA tensor on its own GPU, a CPU tensor on the CPU); a
    CUDA tensor for a CPU target is copied to the host first. ``target`` may also be a platform name, ``"cpu"`` or
    ``"gpu"`` (the GPU that holds ``tensor``).
    """
    import jax

    if isinstance(target, str):
        target = jax.devices("cpu")[0] if target == "cpu" else None
    refuse_wide_integers(tensor)
    tensor = tensor.detach().resolve_neg()  # DLPack and numpy refuse a lazily negated view
    if target is not None and target.platform == "cpu" and tensor.device.type != "cpu":
        tensor = tensor.cpu()
    tensor = row_major(tensor)
    lent_tensors().append(tensor)  # our own object (detach made it), held until JAX lets go: wait_until_returned
    return jax.dlpack.from_dlpack(tensor, device=target)


def jax_x64_enabled() -> bool:
    """Whether JAX computes in 64 bits here (:func:`jax_scope` of a float64 problem)."""
    import jax

    return bool(jax.config.jax_enable_x64)


#: 64-bit integer dtypes and the range JAX without x64 keeps of them (it imports them as 32-bit ones).
_NARROWED = {torch.int64: (-(2**31), 2**31 - 1), torch.uint64: (0, 2**32 - 1)}


def refuse_wide_integers(tensor: Tensor) -> None:
    """Where JAX computes without x64 (a float32 model's :func:`jax_scope`), it imports int64 as int32 (uint64 as
    uint32), silently wrapping values beyond: ids of 2**33 + 5 picked row 5 of a table (a kernel 2.0 off). Refused,
    naming the fixes."""
    if tensor.dtype not in _NARROWED or not tensor.numel() or jax_x64_enabled():
        return
    low, high = _NARROWED[tensor.dtype]
    values = tensor.detach().cpu().numpy()  # torch has no min/max of uint64
    smallest, largest = int(values.min()), int(values.max())
    if smallest < low or largest > high:
        from torchntk.converters import ConversionError

        raise ConversionError(
            f"an {str(tensor.dtype).removeprefix('torch.')} input holds values beyond the 32-bit range ({smallest} to "
            f"{largest}), which JAX computes in 32 bits for a float32 model, wrapping them. Map them into int32 (ids "
            "% buckets before the call), compute the model in float64 (model.double()), or use "
            "implementation='jacobian_contraction' or 'ntk_vector_products' (auto falls back to them)."
        )


def row_major(tensor: Tensor) -> Tensor:
    """``tensor`` in row-major order with row-major strides on its size-1 axes too (zero-copy where its elements
    already are in that order). torch calls a channels_last ``(O, I, 1, 1)`` weight contiguous, strides
    ``(I, 1, I, I)``; DLPack passes those strides and JAX imported the array with another layout, so that a program
    compiled for one model's weights refused the same architecture's in the default memory format."""
    tensor = tensor.contiguous()
    strides, step = [], 1
    for size in reversed(tensor.shape):
        strides.append(step)
        step *= max(size, 1)
    strides.reverse()
    if tensor.numel() == 0 or tuple(strides) == tensor.stride():
        return tensor
    return tensor.as_strided(tensor.shape, strides)


# torch tensors lent to JAX zero-copy by to_jax_array. XLA releases a computation's inputs on its worker thread
# just after the outputs are ready; the last release runs torch's DLPack deleter, which takes the GIL. Where that
# happens while the interpreter is finalizing (a script that ends right after torchntk.ntk), the thread exits under
# C++ frames and the process aborts ("terminate called without an active exception", 1 cold process in 2 on a
# loaded machine). Each call therefore waits for its lent tensors to come back before it returns. Per thread: a
# call waits for its own tensors, not for another thread's call in flight.
_LENT = threading.local()


def lent_tensors() -> list[Tensor]:
    """This thread's tensors lent to JAX and not yet seen back."""
    if not hasattr(_LENT, "tensors"):
        _LENT.tensors = []
    return _LENT.tensors


def _held_by_jax(lent: list[Tensor], index: int) -> bool:
    """Whether JAX still holds ``lent[index]``: torch keeps a tensor's Python object referenced while a DLPack
    export of it is alive, so references beyond the list's and the argument's are JAX's hold."""
    return sys.getrefcount(lent[index]) > 2


def returning_lent_tensors(fn: Callable) -> Callable:
    """``fn``, then :func:`wait_until_returned` once its frame (and the JAX arrays in it) is gone. After an
    exception the traceback keeps the frame alive, so the tensors are only forgotten there, not waited for."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            result = fn(*args, **kwargs)
        except BaseException:
            wait_until_returned(timeout=0.0)
            raise
        wait_until_returned()
        return result

    return wrapper


def wait_until_returned(timeout: float = 2.0) -> bool:
    """Block (the GIL released) until JAX has let go of every tensor lent by :func:`to_jax_array`, at most
    ``timeout`` seconds; forget them. Returns whether all came back (call it once the JAX arrays made from them are
    gone: an array alive somewhere holds its tensor until then). Usually microseconds."""
    deadline = time.monotonic() + timeout
    lent = lent_tensors()
    while True:
        held = [i for i in range(len(lent)) if _held_by_jax(lent, i)]  # by index: a loop variable is a reference
        lent[:] = [lent[i] for i in held]
        if not lent:
            return True
        if time.monotonic() > deadline:
            lent.clear()  # an array kept elsewhere: its release is the main thread's, not a worker's
            return False
        time.sleep(0.0002)


def to_torch(array: Any, device: torch.device) -> Tensor:
    """A JAX array as a torch tensor on ``device`` (DLPack: zero-copy when the devices match).

    Waits for the array first, so that an error of the computation that produces it (an out-of-memory) is raised
    here, where :func:`retry_smaller_on_oom` sees it, not at some later use.
    """
    return torch.from_dlpack(array.block_until_ready()).to(device)


@contextlib.contextmanager
def jax_scope(problem: NTKProblem) -> Iterator[Any]:
    """x64 for float64 problems (weights or output), the model's own device as JAX's default and torch's float32
    matmul precision (:func:`jax_matmul_precision`), for this computation only (this thread's: JAX's configuration
    contexts are).

    Yields the JAX device to pass to :func:`to_jax_array`.
    """
    import jax

    target = jax_device_for(problem.device)
    # float64 weights with a float32 output (a .float() at the end) are float64 too: their steps were cut to float32
    dtypes = {problem.out_dtype, *(p.dtype for p in problem.params.values())}
    x64 = jax.enable_x64(torch.float64 in dtypes)
    with x64, jax.default_device(target), jax.default_matmul_precision(jax_matmul_precision()):
        yield target


# ----------------------------------------------------------------------------------------- sharing one GPU


def make_room(problem: NTKProblem, options: TileOptions, bytes_per_example: float) -> bool:
    """Release torch's cached CUDA blocks (``torch.cuda.empty_cache``) when the memory free on the device leaves this
    call less room than it could use and torch's cache holds some; returns whether it did.

    The room it could use: ``max_memory`` when given, else one tile holding the whole kernel, against the default
    budget (a fraction of the free memory, :func:`torchntk._tiles.memory_budget`). Only torch's *unused* cached
    blocks are released; no tensor moves.
    """
    device = problem.device
    if device.type != "cuda" or options.chunk_size is not None:
        return False
    if options.max_memory is not None:
        short = torch.cuda.mem_get_info(device)[0] < options.max_memory
    else:
        short = memory_budget(problem, None) < tile_bytes(problem, bytes_per_example, max(problem.n1, problem.n2))
    if not short or torch.cuda.memory_reserved(device) <= torch.cuda.memory_allocated(device):
        return False
    with torch.cuda.device(device):
        torch.cuda.empty_cache()
    return True


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is a device out-of-memory: XLA's ``RESOURCE_EXHAUSTED`` or torch's ``OutOfMemoryError``."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return type(error).__name__ in ("JaxRuntimeError", "XlaRuntimeError") and "RESOURCE_EXHAUSTED" in str(error)


def _batch(inputs: tuple[Any, ...]) -> int:
    return int(inputs[0].shape[0])


def _halves(inputs: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    half = (_batch(inputs) + 1) // 2
    return [tuple(x[:half] for x in inputs), tuple(x[half:] for x in inputs)]


def retry_smaller_on_oom(
    compute: Callable[[tuple[Any, ...], tuple[Any, ...]], Tensor],
    inputs1: tuple[Any, ...],
    inputs2: tuple[Any, ...],
    paired: bool,
    *,
    device: torch.device,
    max_memory: int | None,
) -> Tensor:
    """``compute(inputs1, inputs2)`` — one tile of the kernel, batch axes first — retried once as two halves when
    it runs out of device memory.

    The halves split the side with more examples (both sides together when ``paired``: the tile then has one batch
    axis) and are concatenated along that side's batch axis, so the tile is the same. A half that fails too, or a
    one-pair tile, raises ``torch.OutOfMemoryError`` naming ``max_memory``.
    """
    try:
        return compute(inputs1, inputs2)
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        first_error = error
    n1, n2 = _batch(inputs1), _batch(inputs2)
    if device.type == "cuda":  # the failed attempt's buffers are gone; give torch's unused cache back too
        with torch.cuda.device(device):
            torch.cuda.empty_cache()
    try:
        if paired and n1 > 1:
            parts = [compute(a, b) for a, b in zip(_halves(inputs1), _halves(inputs2), strict=True)]
            return torch.cat(parts, dim=0)
        if not paired and max(n1, n2) > 1:
            if n1 >= n2:
                return torch.cat([compute(half, inputs2) for half in _halves(inputs1)], dim=0)
            return torch.cat([compute(inputs1, half) for half in _halves(inputs2)], dim=1)
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        raise _out_of_memory(device, max_memory, n1, n2, "and again for half of it", error) from error
    raise _out_of_memory(device, max_memory, n1, n2, "the smallest tile there is", first_error) from first_error


def _out_of_memory(
    device: torch.device, max_memory: int | None, n1: int, n2: int, retried: str, error: BaseException
) -> torch.OutOfMemoryError:
    budget = "unset: half of the free device memory" if max_memory is None else f"{max_memory:,} bytes"
    return torch.OutOfMemoryError(
        f"structured derivatives ran out of memory on {device} for a tile of {n1}×{n2} examples ({retried}); "
        f"max_memory is {budget}: pass a smaller max_memory= (or chunk_size=), free memory on the device, select "
        f"fewer parameters (params=...), or trace output axes (trace_axes=(-1,)). XLA said: {str(error)[:300]}"
    )
