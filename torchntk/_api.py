"""The public functions: :func:`ntk` and :func:`ntk_vp`."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable

import numpy as np
from torch import Tensor, nn

from torchntk._auto import Explanation, explain_problem, record_native_run
from torchntk._problem import Inputs, NTKProblem, ParamSelection, prepare
from torchntk._tiles import TileOptions, memory_budget
from torchntk.torch_native.jacobian_contraction import jacobian_contraction
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
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}.")


def _check_options(implementation: str, chunk_size: int | None, max_memory: int | None = None) -> None:
    _positive_int(chunk_size, "chunk_size")
    _positive_int(max_memory, "max_memory")
    if implementation != "auto" and implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown implementation {implementation!r}; choose one of 'auto', {', '.join(map(repr, IMPLEMENTATIONS))}."
        )


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
    max_memory: int | None = None,
    progress: bool | None = None,
    out: Tensor | np.ndarray | None = None,
    distributed: bool | None = None,
) -> Tensor:
    """The finite-width NTK Θ(x1, x2) = J(x1) J(x2)ᵀ of ``model``, J = ∂f(θ, x)/∂θ.

    Args:
        model: an ``nn.Module`` whose output for N examples is one tensor of shape ``(N, *out)``. Buffers are used as
            they are; the module is not modified. Training mode is refused when BatchNorm or Dropout are present.
        x1: ``Tensor[N1, ...]`` or a tuple of such tensors (multi-input models), floating point; or a map-style
            ``torch.utils.data.Dataset`` (or :class:`torchntk.DatasetInputs` for its options: ``input_key``,
            ``num_workers``, ``dtype``) read tile by tile, for inputs that do not fit in memory.
        x2: ``Tensor[N2, ...]`` (same per-example shapes as ``x1``); ``None`` means ``x1`` against itself.
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
        out: where to write the kernel: a tensor of the kernel's shape and dtype on the model's device, or a numpy
            array / memmap of that shape and dtype (e.g. ``np.lib.format.open_memmap(path, "w+", "float32",
            shape)``) for a kernel larger than RAM. With a file-backed memmap, finished tiles are recorded in
            ``<path>.torchntk-tiles.json``, so that re-running the same call after an interruption skips them.
        distributed: share the tiles among the ranks of torch.distributed's default process group (each rank calls
            ``ntk`` with the same arguments, as under ``torchrun``): ranks claim tiles from a counter in the group's
            store, so faster ranks take more. ``None`` (default): when a group of several ranks is initialised;
            ``True`` initialises one from torchrun's environment if needed; ``False``: this process alone. Every rank
            returns the whole kernel: with a file-backed memmap ``out=`` that all ranks open, each writes its tiles
            into the file; otherwise one ``all_reduce`` at the end sends the kernel to every rank.

    Returns:
        The kernel (``out`` itself, or a tensor view of it when it is a numpy array) on the model's device, in the
        output's dtype. Its axes are the two output shapes interleaved, axis by axis, traced axes removed and
        diagonal axes once: outputs ``(N, O)`` give ``Tensor[N1, N2, O, O]``;
        ``(N, d1, d2)`` give ``Tensor[N1, N2, d1, d1, d2, d2]``; ``trace_axes=(-1,)`` gives ``Tensor[N1, N2]``;
        ``diagonal_axes=(0,)`` gives ``Tensor[N, O, O]``.
    """
    _check_options(implementation, chunk_size, max_memory)
    if distributed is not None and not isinstance(distributed, bool):
        raise TypeError(f"distributed must be True, False or None (when a process group exists), got {distributed!r}.")
    problem = prepare(model, x1, x2, params=params, trace_axes=trace_axes, diagonal_axes=diagonal_axes)
    options = TileOptions(
        chunk_size=chunk_size, max_memory=max_memory, progress=progress, out=out, distributed=distributed
    )
    if implementation != "auto":
        return IMPLEMENTATIONS[implementation](problem, options)
    explanation = explain_problem(problem, options)
    budget = memory_budget(problem, max_memory) if chunk_size is None else None
    if budget is not None and all(e.memory_bytes > budget for e in explanation.estimates):
        needs = ", ".join(f"{e.implementation} {int(e.memory_bytes):,}" for e in explanation.estimates)
        raise ValueError(
            f"max_memory={budget:,} bytes is too small for even one tile of any method (bytes for one example pair: "
            f"{needs}); raise max_memory, select fewer parameters (params=...), or trace output axes."
        )
    if explanation.conversion_seconds is not None:  # a torch-native run instead of converting: count its seconds
        start = time.perf_counter()
        kernel = IMPLEMENTATIONS[explanation.choice](problem, options)
        record_native_run(problem, time.perf_counter() - start)
        return kernel
    try:
        return IMPLEMENTATIONS[explanation.choice](problem, options)
    except Exception as error:
        if explanation.choice != "structured_derivatives":
            raise
        fallback = min(
            (e for e in explanation.estimates if e.implementation != "structured_derivatives"), key=lambda e: e.seconds
        )
        warnings.warn(
            f"torchntk: structured derivatives failed on this model ({type(error).__name__}: {str(error)[:400]}); "
            f"implementation='auto' falls back to {fallback.implementation}.",
            RuntimeWarning,
            stacklevel=2,
        )
        return IMPLEMENTATIONS[fallback.implementation](problem, options)


def explain(
    model: nn.Module,
    x1: Inputs,
    x2: Inputs | None = None,
    *,
    trace_axes: int | Iterable[int] = (),
    diagonal_axes: int | Iterable[int] = (),
    params: ParamSelection = None,
    chunk_size: int | None = None,
    max_memory: int | None = None,
) -> Explanation:
    """What ``ntk(model, x1, x2, implementation="auto", ...)`` would do, without computing the kernel.

    Returns an :class:`Explanation`: ``choice`` (the implementation), ``estimates`` (per method: multiply-adds for
    the whole kernel, bytes of one tile, and predicted seconds — the paper's Table 1 with a counted forward pass for
    the torch-native methods, XLA's cost analysis for structured derivatives, both through a time model fitted to
    benchmarks), ``reason``, ``route`` (the converter route used, when the model was converted), and
    ``conversion_seconds`` (the estimated conversion while auto still waits for it to pay off;
    ``None`` once converted). Explaining may convert the model, as the call itself would.
    """
    _check_options("auto", chunk_size, max_memory)
    problem = prepare(model, x1, x2, params=params, trace_axes=trace_axes, diagonal_axes=diagonal_axes)
    return explain_problem(problem, TileOptions(chunk_size=chunk_size, max_memory=max_memory))


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
