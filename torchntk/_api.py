"""The public functions: :func:`ntk` and :func:`ntk_vp`."""

from __future__ import annotations

import numbers
import os
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from torch import Tensor, nn

from torchntk import _distributed
from torchntk._auto import Explanation, explain_problem, record_native_run
from torchntk._caller_state import caller_state_set_aside
from torchntk._module_state import model_kept_as_it_was
from torchntk._precision import in_kernel_precision
from torchntk._problem import Inputs, NTKProblem, ParamSelection, prepare
from torchntk._tiles import TileOptions, memory_budget, tile_bytes
from torchntk._warnings import warn
from torchntk.torch_native.jacobian_contraction import jacobian_contraction
from torchntk.torch_native.jacobian_contraction import minimum_bytes_per_example as jc_bytes_per_example
from torchntk.torch_native.ntk_vector_products import minimum_bytes_per_example as nvp_bytes_per_example
from torchntk.torch_native.ntk_vector_products import ntk_vector_product, ntk_vector_products


def _structured_derivatives(problem: NTKProblem, options: TileOptions) -> Tensor:
    from torchntk.bridge.torch_glue import structured_derivatives

    return structured_derivatives(problem, options)


IMPLEMENTATIONS: dict[str, Callable[..., Tensor]] = {
    "jacobian_contraction": jacobian_contraction,
    "ntk_vector_products": ntk_vector_products,
    "structured_derivatives": _structured_derivatives,
}


def _positive_int(value: int | None, name: str) -> None:
    if value is not None and (not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}.")


def bytes_option(max_memory: int | float | None) -> int | None:
    """``max_memory`` as an int: a whole number of bytes written as a float (``3e9``, as in the README) is taken."""
    if isinstance(max_memory, float) and max_memory.is_integer() and max_memory >= 1:
        return int(max_memory)
    _positive_int(max_memory, "max_memory")  # type: ignore[arg-type]
    return max_memory  # type: ignore[return-value]


def _check_options(implementation: str, chunk_size: int | None, max_memory: int | float | None = None) -> int | None:
    """Refuse bad options; ``max_memory`` as an int (:func:`bytes_option`)."""
    _positive_int(chunk_size, "chunk_size")
    max_memory = bytes_option(max_memory)
    if implementation != "auto" and implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown implementation {implementation!r}; choose one of 'auto', {', '.join(map(repr, IMPLEMENTATIONS))}."
        )
    return max_memory


@caller_state_set_aside
@in_kernel_precision
@model_kept_as_it_was
@_distributed.numbered_call
def ntk(
    model: nn.Module,
    x1: Inputs,
    x2: Inputs | None = None,
    *,
    implementation: str = "auto",
    trace_axes: int | Iterable[int] = (),
    diagonal_axes: int | Iterable[int] = (),
    params: ParamSelection = None,
    chunk_size: int | None = None,
    max_memory: int | float | None = None,
    progress: bool | None = None,
    out: Tensor | np.ndarray | str | os.PathLike | None = None,
    distributed: bool | None = None,
) -> Tensor:
    """The finite-width NTK Θ(x1, x2) = J(x1) J(x2)ᵀ of ``model``, J = ∂f(θ, x)/∂θ.

    Args:
        model: an ``nn.Module`` whose output for N examples is one tensor of shape ``(N, *out)``. Buffers are used as
            they are; the module is not modified. Training mode is refused when BatchNorm or Dropout are present.
        x1: ``Tensor[N1, ...]`` or a tuple of such tensors (multi-input models), floating point; or a map-style
            ``torch.utils.data.Dataset`` (or :class:`torchntk.DatasetInputs` for its options: ``input_key``,
            ``num_workers``, ``dtype``) read tile by tile, for inputs that do not fit in memory.
        x2: ``Tensor[N2, ...]``; ``None`` means ``x1`` against itself. Its examples may differ in shape from ``x1``'s
            (sequences of two lengths) where the model gives both one output shape; structured derivatives refuse
            that (they convert at one input shape), the torch-native methods compute it.
        implementation: ``"jacobian_contraction"`` (paper §3.2), ``"ntk_vector_products"`` (§3.3),
            ``"structured_derivatives"`` (§3.4, through JAX), or ``"auto"``: the fastest by estimated time (see
            :func:`explain`; logged at DEBUG level on the ``torchntk`` logger). Auto converts the model for
            structured derivatives (seconds, once per architecture) only when that pays: at once for a long call,
            else after its torch-native calls on the architecture have taken about as long as the conversion
            would. When the model cannot be converted or the interpreter fails, auto warns once and falls back to
            the best torch-native method; an explicit implementation never falls back.
        trace_axes: output axes (of ``(N, *out)``, negative allowed) contracted and **averaged** — divided by their
            size, as in neural-tangents, not summed as in the PyTorch NTK tutorial. The batch axis 0 cannot be traced.
        diagonal_axes: output axes of which only the diagonal is kept (appearing once in the kernel); axis 0 gives
            per-example kernels Θ(x1[n], x2[n]) and needs N1 == N2.
        params: which parameters are θ: ``None`` (all with ``requires_grad=True``), a list of names, a predicate
            ``(name, parameter) -> bool``, or a dict ``name -> Tensor`` of values to use instead of the module's own.
        chunk_size: examples per tile side; overrides ``max_memory``.
        max_memory: bytes that one tile's intermediates may take (the kernel itself not counted); ``None`` means half
            of the memory free on the device now. Too small for one example pair raises ``ValueError``.
        progress: show a tqdm bar; ``None`` shows one when the work is long.
        out: where to write the kernel: a tensor of the kernel's shape and dtype on the model's device; a numpy
            array / memmap of that shape and dtype (``np.lib.format.open_memmap(path, "w+", "float32", shape)``,
            then ``np.load(path, mmap_mode="r+")`` to resume); or a path ``"*.npy"`` / ``"*.zarr"`` (fsspec URLs
            too), created when missing, for a kernel larger than RAM. File stores journal finished tiles with
            checksums of their values, so that re-running the same call after an interruption computes only the
            missing tiles; a path store written for another model, inputs or layout is refused
            (:mod:`torchntk._store`).
        distributed: share the tiles among the ranks of torch.distributed's default process group (each rank calls
            ``ntk`` with the same arguments, as under ``torchrun``): ranks claim tiles from a counter in the group's
            store, so faster ranks take more. ``None`` (default): when a group of several ranks is initialised;
            ``True`` initialises one from torchrun's environment if needed; ``False``: this process alone. Every rank
            returns the whole kernel: with a file store ``out=`` that all ranks open (a ``.npy`` on a shared file
            system, a ``.zarr``, a file-backed memmap), each writes its tiles into it; otherwise one
            ``all_reduce`` at the end sends the kernel to every rank.

    Returns:
        The kernel in the output's dtype: on the model's device, or ``out`` itself; a CPU tensor view of a numpy
        array or ``.npy`` path; a ``.zarr`` kernel read into memory. Its axes are the two output shapes
        interleaved, axis by axis, traced axes removed and diagonal axes once: outputs ``(N, O)`` give
        ``Tensor[N1, N2, O, O]``;
        ``(N, d1, d2)`` give ``Tensor[N1, N2, d1, d1, d2, d2]``; ``trace_axes=(-1,)`` gives ``Tensor[N1, N2]``;
        ``diagonal_axes=(0,)`` gives ``Tensor[N, O, O]``. A float32 kernel is computed in float32 by every method
        (cuDNN's and XLA's TF32 off during the call) unless ``torch.set_float32_matmul_precision("high")`` or
        ``("medium")`` asked torch for less (:mod:`torchntk._precision`).
    """
    max_memory = _check_options(implementation, chunk_size, max_memory)
    if distributed is not None and not isinstance(distributed, bool):
        raise TypeError(f"distributed must be True, False or None (when a process group exists), got {distributed!r}.")
    problem = prepare(model, x1, x2, params=params, trace_axes=trace_axes, diagonal_axes=diagonal_axes)
    options = TileOptions(
        chunk_size=chunk_size, max_memory=max_memory, progress=progress, out=out, distributed=distributed
    )
    if implementation != "auto":
        check_memory(problem, options, [implementation])
        return IMPLEMENTATIONS[implementation](problem, options)
    check_memory(problem, options, list(IMPLEMENTATIONS))  # before auto's estimates, which may convert the model
    explanation = explain_problem(problem, options)
    start = time.perf_counter()
    kernel = _run_with_fallback(problem, options, explanation)
    if explanation.conversion_seconds is not None:  # a torch-native run instead of converting: count its seconds
        record_native_run(problem, time.perf_counter() - start)
    return kernel


def _structured_bytes_per_example(problem: NTKProblem) -> float:
    from torchntk.bridge.memory_plan import bytes_per_example, minimum_rows_for

    # output blocking brings structured derivatives down to its fewest cotangent rows per example
    return bytes_per_example(problem, minimum_rows_for(problem))


# Bytes each method's tile needs per example (one forward at most to know; no conversion), cheapest to ask first.
BYTES_PER_EXAMPLE: dict[str, Callable[[NTKProblem], float]] = {
    "jacobian_contraction": jc_bytes_per_example,
    "ntk_vector_products": nvp_bytes_per_example,
    "structured_derivatives": _structured_bytes_per_example,
}


def one_pair_bytes(problem: NTKProblem, implementation: str) -> float:
    """Memory of ``implementation``'s smallest tile (one example pair) for ``problem``, known without converting."""
    return tile_bytes(problem, BYTES_PER_EXAMPLE[implementation](problem), 1)


def check_memory(problem: NTKProblem, options: TileOptions, implementations: list[str]) -> None:
    """Refuse a ``max_memory`` too small for one example pair of every method in ``implementations``, before any
    work (auto's estimates would otherwise convert the model first, for seconds to minutes)."""
    if options.chunk_size is not None:
        return
    budget = memory_budget(problem, options.max_memory)
    needs = {}
    for implementation in implementations:
        needs[implementation] = one_pair_bytes(problem, implementation)
        if needs[implementation] <= budget:
            return
    listed = ", ".join(f"{name} {int(need):,}" for name, need in needs.items())
    raise ValueError(
        f"max_memory={budget:,} bytes is too small for even one tile (bytes for one example pair: {listed}); raise "
        f"max_memory to at least {int(min(needs.values())):,}, select fewer parameters (params=...), or trace output "
        "axes (trace_axes=(-1,))"
        + (", or use implementation='auto' to pick a method that fits." if len(implementations) == 1 else ".")
    )


def _users_fault(error: BaseException) -> bool:
    """A ValueError/TypeError raised by torchntk's own checks (``out=``, memory, a resume journal): bad input that
    another method would refuse just the same, not a failure of the method."""
    if not isinstance(error, (ValueError, TypeError)):
        return False
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and Path(frames[-1].filename).resolve().parent == _PACKAGE


_PACKAGE = Path(__file__).resolve().parent


def _fallbacks(problem: NTKProblem, options: TileOptions, explanation: Explanation) -> list[str]:
    """The methods auto tries after its choice: the others by estimated time, then any not estimated, if they fit."""
    budget = memory_budget(problem, options.max_memory) if options.chunk_size is None else None
    estimated = sorted(explanation.estimates, key=lambda e: e.seconds)
    # Not estimated: structured derivatives while auto defers the conversion (not when it failed: then auto's
    # explanation carries a note saying why, and converting again would fail again).
    unestimated = [m for m in IMPLEMENTATIONS if m not in {e.implementation for e in estimated}]
    order = [e.implementation for e in estimated] + ([] if explanation.notes else unestimated)
    fits = {e.implementation: budget is None or e.memory_bytes <= budget for e in estimated}
    others = []
    for method in order:
        if method == explanation.choice:
            continue
        if fits.get(method, budget is None or one_pair_bytes(problem, method) <= budget):
            others.append(method)
    return others


def _run_with_fallback(problem: NTKProblem, options: TileOptions, explanation: Explanation) -> Tensor:
    """Auto's choice; when it raises inside torch or JAX, the next method that fits, with one warning.

    Bad input (:func:`_users_fault`) is raised at once; when every method fails, the choice's error is raised.
    """
    try:
        return IMPLEMENTATIONS[explanation.choice](problem, options)
    except Exception as error:
        if _users_fault(error):
            raise
        failures = [(explanation.choice, error)]
    for method in _fallbacks(problem, options, explanation):
        try:
            kernel = IMPLEMENTATIONS[method](problem, options)
        except Exception as error:
            if _users_fault(error):
                raise
            failures.append((method, error))
            continue
        failed = "; ".join(f"{name} failed ({type(e).__name__}: {str(e)[:300]})" for name, e in failures)
        warn(f"torchntk: {failed}; implementation='auto' falls back to {method}.")
        return kernel
    raise failures[0][1]


@caller_state_set_aside
@in_kernel_precision
@model_kept_as_it_was
def explain(
    model: nn.Module,
    x1: Inputs,
    x2: Inputs | None = None,
    *,
    trace_axes: int | Iterable[int] = (),
    diagonal_axes: int | Iterable[int] = (),
    params: ParamSelection = None,
    chunk_size: int | None = None,
    max_memory: int | float | None = None,
) -> Explanation:
    """What ``ntk(model, x1, x2, implementation="auto", ...)`` would do, without computing the kernel.

    Returns an :class:`Explanation`: ``choice`` (the implementation), ``estimates`` (per method: multiply-adds for
    the whole kernel, bytes of one tile, and predicted seconds — the paper's Table 1 with a counted forward pass for
    the torch-native methods, XLA's cost analysis for structured derivatives, both through a time model fitted to
    benchmarks), ``reason``, ``route`` (the converter route used, when the model was converted), and
    ``conversion_seconds`` (the estimated conversion while auto still waits for it to pay off;
    ``None`` once converted). Explaining may convert the model, as the call itself would.
    """
    max_memory = _check_options("auto", chunk_size, max_memory)
    problem = prepare(model, x1, x2, params=params, trace_axes=trace_axes, diagonal_axes=diagonal_axes)
    options = TileOptions(chunk_size=chunk_size, max_memory=max_memory)
    check_memory(problem, options, list(IMPLEMENTATIONS))  # as ntk does, before anything converts
    return explain_problem(problem, options)


@caller_state_set_aside
@in_kernel_precision
@model_kept_as_it_was
def ntk_vp(
    model: nn.Module,
    x1: Inputs,
    x2: Inputs | None,
    v: Tensor,
    *,
    params: ParamSelection = None,
    chunk_size: int | None = None,
    progress: bool | None = None,
) -> Tensor:
    """Θ(x1, x2) · v without building Θ (paper §L): a VJP through ``x2`` then a JVP through ``x1``.

    ``v: Tensor[N2, *out]`` gives ``Tensor[N1, *out]`` with ``out[n, a] = Σ_{m, b} Θ[n, m, a, b] v[m, b]``;
    ``v: Tensor[K, N2, *out]`` gives ``Tensor[K, N1, *out]`` (K vectors at once). ``x2=None`` means ``x1``.
    ``params``, ``chunk_size`` and ``progress`` are as in :func:`ntk`; no axis is traced or diagonal here.
    """
    _check_options("auto", chunk_size)
    problem = prepare(model, x1, x2, params=params, trace_axes=(), diagonal_axes=())
    return ntk_vector_product(problem, v, chunk_size=chunk_size, progress=progress)
