"""``to_jax``: a PyTorch model as a pure JAX function of its weights, for one example.

Pipeline: select parameters -> fingerprint -> (memory cache | disk cache of ONNX bytes | params-as-inputs ONNX
export) -> route (``ModelProto -> g(*params, *inputs) -> [outputs]`` at batch size 1) -> ``JaxModel``. A fresh
conversion is checked once against torch on the first example; a disagreement raises instead of returning a
silently wrong function.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import hashlib
import importlib
import importlib.util
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import jax
import numpy as np
import onnx
import torch

from torchntk._lru import LRUCache
from torchntk._precision import without_autocast

from . import cache
from ._params import ParamSpec, select_params
from .check import compare_with_torch, forget_check_programs, torch_reference, x64_scope
from .errors import ConversionError, NonFiniteCheckError, RouteFellBack
from .loop_convolutions import fast_convolutions
from .onnx_export import batch_one, check_eval_mode, computes_in_float64, export_onnx

RouteFn = Callable[[onnx.ModelProto], Callable[..., list]]
ROUTES = ("onnx-tf", "onnx-jax")
# The order route="auto" tries, fastest first by benchmarks/results/routes.json (2 cores, torchvision at 32x32):
# onnx-jax converted faster on 4 of 5 models (resnet18 4.1 s vs 8.3 s, convnext_tiny 5.3 s vs 13.7 s; it needs
# no TensorFlow import, ~4 s) and its structured NTK ran faster on 4 of 5 (convnext_tiny 0.94 s vs 3.32 s).
# tests/test_routes_default.py re-derives this order from that JSON.
AUTO_ORDER = ("onnx-jax", "onnx-tf")
# The onnx-jax route traces each run of repeated blocks (a ResNet or ConvNeXt stage, a ViT's layers) as one
# lax.scan, which structured derivatives keep rolled: what XLA compiles stops growing with depth
# (benchmarks/results/sd_rolled.json). False: every block unrolled, as before (benchmarks compare the two).
ROLL_BLOCKS = True
_FLOATS = (torch.float32, torch.float64)
_MEMORY: LRUCache[tuple] = LRUCache(16)  # converted functions, by conversion key
# onnx2tf conversion patches module attributes, the working directory and fd 2 for its duration: one at a time.
_CONVERT_LOCK = threading.RLock()


def _load_route(name: str) -> RouteFn:
    """Routes are imported on first use: onnx-tf pulls in TensorFlow, onnx-jax may not be installed."""
    if name == "onnx-tf":
        missing = [m for m in ("tensorflow", "onnx2tf", "tf2jax") if importlib.util.find_spec(m) is None]
        if missing:  # installed without the [tf] extra: route "auto" goes on to onnx-jax
            raise ConversionError(f"Route 'onnx-tf' needs {', '.join(missing)}: pip install 'torchntk[tf]'.")
        from .onnx_tf import onnx_tf_to_jax

        return onnx_tf_to_jax
    if name == "onnx-jax":
        if importlib.util.find_spec(f"{__package__}.onnx_jax") is None:
            raise ConversionError("Route 'onnx-jax' is not available in this torchntk build; use route='onnx-tf'.")
        return importlib.import_module(f"{__package__}.onnx_jax").onnx_to_jax
    raise ValueError(f"route must be 'auto' or one of {ROUTES}, got {name!r}.")


def _run_route(name: str, proto: onnx.ModelProto) -> Callable[..., list]:
    try:
        return _load_route(name)(proto, roll=True) if _rolls(name) else _load_route(name)(proto)
    except (ConversionError, ValueError) as err:
        if isinstance(err, ConversionError):
            raise
        raise ConversionError(f"Route {name!r} cannot convert this model: {err}") from err


@dataclass(frozen=True)
class JaxModel:
    """A converted model. ``fn(params, *inputs)`` is pure JAX for ONE example.

    Attributes:
        fn: ``fn(params, *inputs) -> jax.Array``; ``params`` maps names in ``param_names`` to arrays in torch layout,
            ``inputs[i]`` has shape ``input_shapes[i]`` (no batch axis), the result has shape ``output_shape`` (no
            batch axis). vmap it over examples. Other input shapes raise ``ValueError``: call ``to_jax`` again with
            examples of the new shape (each shape is converted once and cached).
        params: the model's current values of the selected parameters (torch names, torch layout, JAX arrays).
        param_names: the selected parameter names, in ``model.named_parameters()`` order; tied parameters once.
        route: ``"onnx-tf"`` or ``"onnx-jax"``: the route that produced ``fn``.
        timings: seconds spent per stage (``export``, ``onnx2tf``, ``tf2jax``, ``check``... or ``cache``).
        input_shapes, input_dtypes, output_shape: per-example signature of ``fn``.
        x64: True for float64 models: ``fn`` traces under ``jax.enable_x64(True)`` (the process-wide setting is left
            alone). Pass it numpy arrays, or JAX arrays made under ``jax.enable_x64(True)``: ``jnp.asarray`` outside
            that scope silently rounds float64 to float32.
        key: the conversion cache key (the model's fingerprint, inputs, selection, requested route).
        loops: ``fn`` runs a network's repeated blocks as ``lax.scan`` loops (the onnx-jax route rolls them): a
            program differentiating ``fn`` should be jitted through
            :func:`torchntk.converters.loop_convolutions.fast_convolutions` (``fn``'s own convolutions already are)
            to keep XLA:CPU's fast convolutions inside the loops.
        function_key: names ``fn`` itself (the key, the route used and the converted graph's hash): what caches of
            programs built from ``fn`` must be keyed by. Two models under one *uncertain* key (an attribute the
            fingerprint cannot see into) share ``key`` but not ``function_key`` unless their graphs are the same.
    """

    fn: Callable[..., jax.Array]
    params: dict[str, jax.Array]
    param_names: tuple[str, ...]
    route: str
    timings: dict[str, float] = field(default_factory=dict)
    input_shapes: tuple[tuple[int, ...], ...] = ()
    input_dtypes: tuple[str, ...] = ()
    output_shape: tuple[int, ...] = ()
    x64: bool = False
    key: str = ""
    function_key: str = ""
    loops: bool = False

    def convert_params(self, values: torch.nn.Module | Mapping[str, torch.Tensor]) -> dict[str, jax.Array]:
        """JAX copies of new values for ``param_names`` (from a module or a ``name -> tensor`` mapping), e.g. after
        an optimizer step: the conversion itself never has to be redone for new weights."""
        source = dict(values.named_parameters()) if isinstance(values, torch.nn.Module) else values
        missing = [n for n in self.param_names if n not in source]
        if missing:
            raise KeyError(f"No values for parameters {missing[:5]}.")
        return _to_jax_arrays({n: source[n] for n in self.param_names}, self.x64)


def _to_jax_arrays(tensors: Mapping[str, torch.Tensor], x64: bool) -> dict[str, jax.Array]:
    # A copy, not DLPack sharing: torch optimizers update weights in place, JAX assumes arrays never change.
    with x64_scope(x64):
        # device_put rather than jnp.array: the latter compiles a conversion per dtype, eagerly and every process.
        return {n: jax.device_put(t.detach().resolve_neg().cpu().numpy().copy()) for n, t in tensors.items()}


def _make_fn(
    g: Callable[..., list], names: tuple[str, ...], shapes, dtypes, x64: bool, loops: bool
) -> Callable[..., jax.Array]:
    """``JaxModel.fn``: one example through the route's function ``g``, its convolutions inside loops (``loops``:
    :func:`_has_loops`) in XLA:CPU's fast layout."""
    fn = _per_example(g, names, shapes, x64)
    return fast_convolutions(fn) if loops else fn


def _has_loops(g: Callable[..., list], x64: bool) -> bool:
    """Whether the route's function runs repeated blocks as ``lax.scan`` loops (:class:`JaxModel`'s ``loops``)."""
    with x64_scope(x64):
        return bool(getattr(g, "has_loops", lambda: False)())


def _per_example(g: Callable[..., list], names: tuple[str, ...], shapes, x64: bool) -> Callable[..., jax.Array]:
    def fn(params: Mapping[str, jax.Array], *inputs: jax.Array) -> jax.Array:
        if len(inputs) != len(shapes):
            raise ValueError(f"fn takes {len(shapes)} input(s) (one example each), got {len(inputs)}.")
        for i, (x, shape) in enumerate(zip(inputs, shapes, strict=True)):
            if tuple(np.shape(x)) != shape:
                raise ValueError(
                    f"inputs[{i}] has shape {tuple(np.shape(x))}, but this conversion is for one example of shape "
                    f"{shape} (no batch axis; vmap over examples). For another input shape call to_jax again "
                    "with examples of that shape: each shape is converted once and cached."
                )
        with x64_scope(x64):
            args = [params[n] for n in names] + [jax.numpy.asarray(x)[None] for x in inputs]
            return g(*args)[0][0]

    return fn


def _check_dtypes(values: Mapping[str, torch.Tensor], inputs: Sequence[torch.Tensor]) -> bool:
    """Return whether the model is float64; refuse mixed or non-float32/64 floating dtypes."""
    floats = {t.dtype for t in [*values.values(), *inputs] if t.is_floating_point()}
    if not floats <= set(_FLOATS) or len(floats) > 1:
        raise ConversionError(
            f"Floating dtypes {sorted(map(str, floats))} are not supported together: convert the model and inputs "
            "to one of float32 or float64 (model.float() / model.double())."
        )
    return floats == {torch.float64}


def _check_finite(model: torch.nn.Module, values: Mapping[str, torch.Tensor], inputs: Sequence[torch.Tensor]) -> None:
    """Refuse NaN/Inf in the weights, buffers or the first example: the check against torch needs finite outputs."""
    tensors = [
        *(("weight", n, t) for n, t in values.items()),
        *(("parameter", n, p) for n, p in model.named_parameters() if n not in values),
        *(("buffer", n, b) for n, b in model.named_buffers()),
        *(("example", f"inputs[{i}][0]", x[0]) for i, x in enumerate(inputs)),
    ]
    floating = [(kind, name, t) for kind, name, t in tensors if t.is_floating_point() and t.numel()]
    # This runs on every call: one sum per tensor (NaN and Inf propagate through it) and one synchronisation,
    # 1.4 ms for resnet18 against 16 ms for isfinite per tensor; a sum that merely overflows is checked exactly.
    if not floating or bool(torch.isfinite(torch.stack([t.detach().sum().float() for _, _, t in floating])).all()):
        return
    bad = [(kind, name) for kind, name, t in floating if not bool(torch.isfinite(t).all())]
    if bad:
        where = ", ".join(f"{kind} {name!r}" for kind, name in bad[:5]) + (", ..." if len(bad) > 5 else "")
        raise NonFiniteCheckError(
            f"NaN/Inf values in {where}: a converted function is checked against torch on the first example, which "
            "needs finite weights, buffers and first example. Fix the values (e.g. a diverged training step), or "
            "use a torch-native implementation ('jacobian_contraction' or 'ntk_vector_products')."
        )


def to_jax(
    model: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    *,
    params: ParamSpec = None,
    route: str = "auto",
    copy_params: bool = True,
) -> JaxModel:
    """Convert ``model`` to a pure JAX function of its selected parameters, for one example.

    Args:
        model: an ``nn.Module`` in eval mode returning a single tensor ``(N, *out)``.
        example_inputs: a tuple of tensors ``(N, *in_i)`` with a batch axis (N >= 1), or one tensor. Only their
            per-example shapes and dtypes matter (and the first example, used for a one-time check).
        params: ``None`` (every parameter with ``requires_grad``), a list of names, or a dict ``name -> tensor``
            whose values are used for ``JaxModel.params``.
        route: ``"onnx-tf"``, ``"onnx-jax"`` or ``"auto"`` (``AUTO_ORDER``: onnx-jax, the faster by measurement,
            then onnx-tf when onnx-jax fails).
        copy_params: ``False`` leaves ``JaxModel.params`` empty when the conversion comes from the cache, for callers
            that pass their own values to ``fn`` (it saves copying every weight on each call).

    Returns:
        A :class:`JaxModel`. Conversions are cached in memory and on disk by architecture, buffer values, input
        shapes/dtypes, selection and route; new weight values reuse the cached conversion. Inputs of a new shape
        give a new conversion.

    Raises:
        ConversionError: training mode, unsupported ops or patterns (naming the op and torch module), dtypes.
    """
    converted, _ = _to_jax(model, example_inputs, params, route, copy_params, defer=False)
    return converted


@contextlib.contextmanager
def to_jax_while_checking(
    model: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    *,
    params: ParamSpec = None,
    route: str = "auto",
    copy_params: bool = True,
    check_batch: int = 1,
) -> Iterator[JaxModel]:
    """:func:`to_jax` whose check against torch finishes while the body runs, for a caller that next compiles a
    program of ``fn`` (structured derivatives): XLA:CPU compiles on one core, so on two the converted side of the
    check (tracing, compiling and running ``fn``'s value and JVP on the first example: 3-7 s for a deep model at
    32×32) costs little beside it. torch's side runs first, here (it runs the model).

    On exit the check is awaited (also when the body raised an ``Exception``); a disagreement raises its
    :class:`ConversionError` there, and the conversion enters the memory and disk caches only once it passed.
    **Use nothing computed from ``fn`` in the body unless the block exits normally** (compile in it; run after).
    With ``route="auto"`` a refused onnx-jax conversion is followed on exit by the next route, converted and checked
    in line; where that passes it is cached and :class:`RouteFellBack` raised: what the body compiled is of the
    refused function, call :func:`to_jax` (answered from the cache) and compile again. The onnx-tf route's check
    stays in line (tf2jax's functions are not known to trace safely from two threads); so do conversions answered
    from the memory cache. ``check_batch > 1``: the check's program vmapped over that many examples is compiled
    beside the body too, for the caller's comparison on all its examples (``converters.check.checked_program``).
    """
    converted, finish = _to_jax(model, example_inputs, params, route, copy_params, defer=True, check_batch=check_batch)
    finish = without_autocast(finish)  # a fallback route converts and checks on exit
    try:
        yield converted
    except Exception:  # not on KeyboardInterrupt: the user is not kept waiting for a check whose result is dropped
        with contextlib.suppress(ConversionError):
            finish()
        raise
    finish()


@without_autocast  # the conversion is of the model's own function: under autocast export failed on bfloat16
def _to_jax(
    model, example_inputs, params, route, copy_params, defer: bool, check_batch: int = 1
) -> tuple[JaxModel, Callable[[], None]]:
    """``to_jax``'s work; with ``defer``, a fresh onnx-jax conversion's check is left running: the returned
    ``finish()`` awaits it (raising its error, caching the conversion once it passed). Without: ``finish`` does
    nothing."""
    if route != "auto" and route not in ROUTES:
        raise ValueError(f"route must be 'auto' or one of {ROUTES}, got {route!r}.")
    check_eval_mode(model)
    names, values = select_params(model, params)
    inputs = batch_one(example_inputs)
    x64 = _check_dtypes(values, inputs)
    shapes = tuple(tuple(x.shape[1:]) for x in inputs)
    dtypes = tuple(str(x.dtype).removeprefix("torch.") for x in inputs)
    jax_params = _to_jax_arrays(values, x64) if copy_params else {}

    _check_finite(model, values, inputs)  # on every call: the outcome must not depend on what is cached
    t0 = time.perf_counter()
    fingerprint = cache.conversion_key(model, inputs, names, route)
    key = fingerprint.digest
    # An uncertain key (an attribute the fingerprint cannot see into) may name another model's function: never
    # reused, from memory or disk. A check on one example did not tell (a kink active on other examples only).
    hit = _MEMORY.get(key) if fingerprint.certain else None
    if hit is not None:
        g, used, out_shape, function_key, loops = hit
        fn = _make_fn(g, names, shapes, dtypes, x64, loops)
        timings = {"cache": time.perf_counter() - t0}
        converted = JaxModel(
            fn, jax_params, names, used, timings, shapes, dtypes, out_shape, x64, key, function_key, loops
        )
        return converted, _done

    with _CONVERT_LOCK:
        jax_params = jax_params or _to_jax_arrays(values, x64)  # a fresh conversion is checked with them
        # An uncertain key is neither read from the caches nor written to them: under a caller's torch mode it is
        # uncertain for this call only, and what it converted must not reach a later call of the same digest.
        certain = fingerprint.certain
        args = (model, inputs, names, values, jax_params, key, route, shapes, dtypes, x64, certain, defer)
        return _convert(*args, batch=check_batch)


def forget(converted: JaxModel) -> None:
    """Drop ``converted`` from the memory cache and its graph from the disk cache: found computing another function
    than the model's (its key missed a change), so that the next :func:`to_jax` converts afresh."""
    _MEMORY.pop(converted.key, None)
    _drop_disk_entry(converted.key)


def from_memory(converted: JaxModel) -> bool:
    """Whether ``converted`` was served from this process's memory cache (not exported or loaded by this call)."""
    return "cache" in converted.timings


def _done() -> None:
    """Nothing left to await."""


def is_converted(
    model: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    *,
    params: ParamSpec = None,
    route: str = "auto",
) -> bool:
    """Whether :func:`to_jax` with these arguments would be answered from the memory cache (no export, no route)."""
    if not len(_MEMORY):  # nothing converted yet: skip the fingerprint (its first use reads package metadata)
        return False
    names, _ = select_params(model, params)
    key = cache.conversion_key(model, batch_one(example_inputs), names, route)
    return key.certain and _MEMORY.get(key.digest) is not None  # an uncertain key is converted afresh


def _convert(
    model, inputs, names, values, jax_params, key, route, shapes, dtypes, x64, cached, defer, use_disk=None, batch=1
) -> tuple[JaxModel, Callable[[], None]]:
    """The cache-miss path of ``to_jax``: ONNX graph (disk cache or export), then the routes in turn
    (:func:`_first_passing`)."""
    timings: dict[str, float] = {}
    use_disk = cached if use_disk is None else use_disk
    proto, checked, looped = _load_or_export(model, inputs, names, key, timings, use_disk)
    if not x64 and computes_in_float64(proto):
        raise ConversionError(
            "The model computes some steps in float64 (a .double() or a float64 constant inside forward) while its "
            "weights and inputs are float32; a converted function is float32 or float64 throughout, and those "
            "steps would lose their precision (a saturated tanh: 30% off). Use model.double() with float64 inputs, "
            "or implementation='jacobian_contraction' or 'ntk_vector_products' (they run the model as it is)."
        )
    candidates = AUTO_ORDER if route == "auto" else (route,)
    from_disk = "disk_cache" in timings
    graph = _Graph(proto, proto.SerializeToString(), checked, looped, _output_shape(proto), from_disk)
    job = _Job(model, names, values, jax_params, key, inputs, shapes, dtypes, x64, graph, timings, cached, batch)
    try:
        return _first_passing(candidates, job, defer=defer)
    except ConversionError:
        if not from_disk:
            raise
    # A disk entry that torch disagrees with (written under a caller's state its key does not hold, or by a process
    # whose model its key did not tell apart): dropped and exported afresh, never a refusal that outlives it.
    _drop_disk_entry(key)
    args = (model, inputs, names, values, jax_params, key, route, shapes, dtypes, x64, cached, defer)
    return _convert(*args, use_disk=False, batch=batch)


def _drop_disk_entry(key: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        cache.entry_path(key).unlink()


class _Graph(NamedTuple):
    proto: onnx.ModelProto
    data: bytes
    checked: tuple[str, ...]  # the routes whose derivative was checked on it (disk cache)
    looped: tuple[str, ...]  # those of them whose function runs loops (disk cache)
    out_shape: tuple[int, ...]
    from_disk: bool  # read from the disk cache (not exported by this call)


class _Job(NamedTuple):
    """What converting one model's graph by a route and checking it needs (the same for every route tried)."""

    model: torch.nn.Module
    names: tuple[str, ...]
    values: Mapping[str, torch.Tensor]
    jax_params: dict[str, jax.Array]
    key: str
    inputs: tuple[torch.Tensor, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    x64: bool
    graph: _Graph
    timings: dict[str, float]
    cached: bool  # a certain key: the conversion enters the memory and disk caches once it passed
    check_batch: int = 1  # examples the check's program is also compiled for, vmapped (a deferred check only)


def _first_passing(candidates: tuple[str, ...], job: _Job, *, defer: bool) -> tuple[JaxModel, Callable[[], None]]:
    """The first of ``candidates`` (routes) whose conversion of ``job.graph`` passes the check against torch, cached
    once it passed; with ``defer``, an onnx-jax conversion returns with its check running and a ``finish`` that
    awaits it, falling back to the remaining routes (in line) where it fails (:class:`RouteFellBack`)."""
    errors = []
    graph, timings = job.graph, job.timings
    for i, candidate in enumerate(candidates):
        try:
            t = time.perf_counter()
            g = _run_route(candidate, graph.proto)
            timings.update(getattr(g, "timings", {}) or {candidate: time.perf_counter() - t})
            # Stored with the graph once checked: learning it walks the whole graph (0.18 s of a warm resnet18 call).
            loops = candidate in graph.looped if candidate in graph.checked else _has_loops(g, job.x64)
            fn = _make_fn(g, job.names, job.shapes, job.dtypes, job.x64, loops)
            t = time.perf_counter()
            # A graph from the disk cache had its derivative checked on this route before it was stored; its value
            # is checked again (a stale or foreign file), its JVP not: torch's side of it costs a warm process
            # seconds (JAX's side shares the value's program, loaded from the persistent cache).
            reference = torch_reference(job.model, job.values, job.inputs, derivative=candidate not in graph.checked)
            torch_side = time.perf_counter() - t
            program = _function_key(job.key, candidate, graph.data)
            batch = job.check_batch if defer and candidate == "onnx-jax" else 1  # beside the caller's compile only
            compare = functools.partial(
                compare_with_torch, fn, job.jax_params, reference, job.x64, candidate, program=program, batch=batch
            )
            converted = JaxModel(
                fn,
                job.jax_params,
                job.names,
                candidate,
                timings,
                job.shapes,
                job.dtypes,
                graph.out_shape,
                job.x64,
                job.key,
                program,
                loops,
            )
            publish = functools.partial(_publish, converted, g, graph) if job.cached else _done
            if defer and candidate == "onnx-jax":
                left = candidates[i + 1 :]
                rest = functools.partial(_first_passing, left, job, defer=False) if left else None
                if graph.from_disk:  # refused: the graph goes, and the next conversion exports afresh
                    rest = functools.partial(_refused_from_disk, job.key)
                future = _checks().submit(_timed, compare)
                return converted, _awaiting(future, timings, torch_side, publish, rest)
            compare()
            timings["check"] = time.perf_counter() - t
            publish()
            return converted, _done
        except ConversionError as err:
            errors.append(err)
    if len(errors) == 1:
        raise errors[0]
    raise ConversionError(" | ".join(f"{r}: {e}" for r, e in zip(candidates, errors, strict=False))) from errors[-1]


def _refused_from_disk(key: str) -> tuple[JaxModel, Callable[[], None]]:
    """After a disk-cached graph's check refused it (deferred): drop the entry and have the caller convert again."""
    _drop_disk_entry(key)
    raise RouteFellBack("The disk cache's graph disagreed with torch and was dropped: convert again (exported afresh).")


def _publish(converted: JaxModel, g: Callable[..., list], graph: _Graph) -> None:
    """Cache a conversion that passed its check: on disk (once per route whose derivative was checked: a refused
    graph must not be served to the next process) and in memory."""
    if converted.route not in graph.checked:
        looped = (*graph.looped, converted.route) if converted.loops else graph.looped
        cache.write_entry(converted.key, graph.data, (*graph.checked, converted.route), looped)
    _MEMORY[converted.key] = (g, converted.route, converted.output_shape, converted.function_key, converted.loops)


_CHECKS: list[concurrent.futures.ThreadPoolExecutor] = []


def _checks() -> concurrent.futures.ThreadPoolExecutor:
    """The thread that runs checks left running by :func:`to_jax_while_checking` (one at a time)."""
    with _CONVERT_LOCK:
        if not _CHECKS:
            _CHECKS.append(concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="torchntk-check"))
        return _CHECKS[0]


def _timed(compare: Callable[[], None]) -> float:
    start = time.perf_counter()
    compare()
    return time.perf_counter() - start


def _awaiting(
    future: concurrent.futures.Future,
    timings: dict[str, float],
    torch_side: float,
    publish: Callable[[], None],
    rest: Callable[[], tuple[JaxModel, Callable[[], None]]] | None,
) -> Callable[[], None]:
    """``finish()`` of a check left running: waits for it; passed, records its seconds (``check``: torch's side and
    the converted side's own; ``check_wait``: how long the caller waited for it) and publishes the conversion.
    Failed, with routes left (``rest``), converts by them in line; one that passes is cached and
    :class:`RouteFellBack` raised (what the caller compiled is of the refused function: convert again, from the
    cache); none: the check's error, and theirs. A graph from the disk cache that failed is dropped instead
    (``rest``: :func:`_refused_from_disk`), and :class:`RouteFellBack` raised: converting again exports afresh."""

    def finish() -> None:
        wait = time.perf_counter()
        try:
            converted_side = future.result()
        except ConversionError as refused:
            if rest is None:
                raise
            try:
                with _CONVERT_LOCK:  # the onnx-tf route patches process-wide state while it converts
                    fallback, _ = rest()
            except RouteFellBack:  # a disk-cached graph refused: dropped, to be exported afresh
                raise
            except ConversionError as error:
                raise ConversionError(f"onnx-jax: {refused} | {error}") from error
            raise RouteFellBack(
                f"The onnx-jax conversion was refused by its check ({refused}); route {fallback.route!r} passed "
                "and is cached: convert again."
            ) from refused
        timings["check_wait"] = time.perf_counter() - wait
        timings["check"] = torch_side + converted_side
        publish()

    return finish


def _function_key(key: str, route: str, graph_bytes: bytes) -> str:
    """What names the converted function itself: the conversion key, the route (and whether it rolls repeated
    blocks) and the graph's bytes."""
    variant = f"{route}+rolled" if _rolls(route) else route
    return hashlib.sha256(f"{key}:{variant}:".encode() + hashlib.sha256(graph_bytes).digest()).hexdigest()


def _rolls(route: str) -> bool:
    """Whether ``route`` runs a network's repeated blocks as one ``lax.scan`` (:data:`ROLL_BLOCKS`)."""
    return route == "onnx-jax" and ROLL_BLOCKS


def _output_shape(proto: onnx.ModelProto) -> tuple[int, ...]:
    if len(proto.graph.output) != 1:
        raise ConversionError(f"The model has {len(proto.graph.output)} outputs; return a single tensor.")
    dims = proto.graph.output[0].type.tensor_type.shape.dim
    return tuple(d.dim_value for d in dims[1:])


def _load_or_export(
    model, inputs, names, key: str, timings: dict[str, float], use_disk: bool
) -> tuple[onnx.ModelProto, tuple[str, ...], tuple[str, ...]]:
    """The ONNX graph for ``key``, the routes whose derivative was checked on it and those of them that run loops:
    from the disk cache when a valid entry exists (and ``use_disk``), else exported (no route checked yet; stored
    by the caller once checked)."""
    t = time.perf_counter()
    entry = cache.read_entry(key) if use_disk else None
    if entry is not None:
        try:
            proto = onnx.load_from_string(entry.onnx_bytes)
            timings["disk_cache"] = time.perf_counter() - t
            return proto, entry.derivative_checked, entry.looped
        except Exception:  # noqa: BLE001 - a parseable header with unparseable bytes is just a corrupt entry
            pass
    proto = export_onnx(model, inputs, names)
    if len(proto.graph.output) != 1:
        raise ConversionError(
            f"The model returns {len(proto.graph.output)} tensors; torchntk converters need a single tensor "
            "output. Wrap the model so that forward returns one tensor."
        )
    timings["export"] = time.perf_counter() - t
    return proto, (), ()


def clear_memory_cache() -> None:
    """Forget in-memory conversions and their checks' programs (the disk caches are kept)."""
    _MEMORY.clear()
    forget_check_programs()
