"""The check of a converted function against torch: its value and its derivative on the first example.

Equal values do not make equal derivatives: where the function has a kink (``relu6`` at 0 and 6, ``clamp``, max
pooling over ties) torch picks one derivative by convention, and a conversion that picks another computes the
NTK of another function — silently, since the outputs agree. Exact ties are common (mobilenet_v2's depthwise
windows of ReLU6 zeros: its structured kernel was 9.6% off). So besides the output, one Jacobian-vector product in
a fixed random direction of the parameters is compared, projected on up to 16 output directions: torch's, with J
from its reverse mode as the NTK takes it (:func:`_reverse_mode_projections`), against the converted function's
``jax.jvp`` (JAX's reverse mode is the transpose of its forward mode), on the first example, in one compiled program
(persisted like the others) that gives the value too. A JVP rather than a VJP on the JAX side: its program compiles
in about half the time (convnext_small at 32×32: check 9.2 s vs 16.3 s; the value alone 2.8 s). A backward ``0 · ∞``
that forward mode cannot see is refused when it reaches a kernel (``bridge.nonfinite.refuse_nan``).
The derivative is checked once per export and route: the disk cache stores a graph only after it passed, with
the routes checked; a graph loaded from it for one of those routes has its value checked only (a stale graph
changes the output). Under an uncertain fingerprint nothing cached is reused: a check on one example did not
tell two models apart whose difference shows on other examples only.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import numpy as np
import torch

from torchntk._lru import LRUCache
from torchntk._precision import float32_throughout
from torchntk._problem import functional_forward, parameter_aliases

from .compile_cache import FAST_COMPILE_OPTIONS, compile_persisted, persistent_compilation
from .errors import ConversionError, NonFiniteCheckError

_LOG = logging.getLogger("torchntk")

#: Relative tolerances (to the largest entry) of the value and of the derivative, float32 / float64. A float32
#: JVP of a deep network cancels: resnet50 at 224×224 agrees to 4.6e-4 (float64: 2e-15), the onnx-tf route to 1.3e-3;
#: the kink mismatch that made mobilenet_v2's kernel 9.6% off gave 0.50 (float32 catches gross mismatches only).
#: float64 to 1e-10 (was 1e-9 and 1e-7): a constant the ONNX export rounded to float32 that met only the derivative
#: (a LeakyReLU slope of 1/3 at 0) left a float64 kernel 4e-8 off, silently; one under a large output offset (a
#: regression head's bias of 1000 hides a value error relative to the largest output) passed a JVP check at 1e-9
#: with a kernel 1e-8 off. float64 agrees to 2e-15 on resnet50.
VALUE_TOL = {False: 1e-4, True: 1e-10}
DERIVATIVE_TOL = {False: 1e-2, True: 1e-10}


def _other_route(route: str, x64: bool) -> str:
    """Advice naming the other route where it can take the model (onnx-tf builds float32 ops only)."""
    return "" if route == "onnx-tf" or x64 else ", or try route='onnx-tf'"


def x64_scope(x64: bool) -> contextlib.AbstractContextManager:
    return jax.enable_x64(True) if x64 else contextlib.nullcontext()


@dataclass(frozen=True)
class TorchReference:
    """torch's half of the check, on the first example: its output ``expected``, and ``U J v``
    (``expected_tangent``, :func:`_reverse_mode_projections`) along the direction ``tangents`` (numpy; ``None``: the
    value is checked alone). ``example`` holds copies of the first example (numpy), the converted function's input."""

    example: tuple[np.ndarray, ...]
    expected: np.ndarray
    tangents: dict[str, np.ndarray] | None
    expected_tangent: np.ndarray | None


def torch_reference(
    model: torch.nn.Module,
    values: Mapping[str, torch.Tensor],
    inputs: Sequence[torch.Tensor],
    *,
    derivative: bool = True,
) -> TorchReference:
    """torch's side of the check (:class:`TorchReference`). It runs the model (with copies of ``values``), so it
    runs where the caller does; what it returns is the check's own: :func:`compare_with_torch` may run in another
    thread."""
    tangents = random_direction(values) if derivative else None
    with float32_throughout():  # it checks the converted function, not a precision (cuDNN's default is TF32)
        expected, expected_tangent = _torch_value_and_derivative(model, values, tangents, inputs)
    example = tuple(x[0].detach().resolve_neg().cpu().numpy().copy() for x in inputs)
    direction = None if tangents is None else {n: t.detach().cpu().numpy() for n, t in tangents.items()}
    return TorchReference(example, expected, direction, expected_tangent)


def compare_with_torch(
    fn: Callable,
    params: Mapping[str, Any],
    reference: TorchReference,
    x64: bool,
    route: str,
    *,
    program: str | None = None,
    batch: int = 1,
) -> None:
    """The converted side of the check: ``fn``'s value (and JVP along ``reference.tangents``) on the first example,
    traced, compiled and run, compared with torch's; a disagreement raises :class:`ConversionError`. It touches no
    torch module: only ``fn``, the JAX arrays ``params`` and the reference's own tensors. Passed, its program is kept
    under the name ``program``, and with ``batch > 1`` that program vmapped over ``batch`` examples is compiled (or
    loaded) too, here, beside the caller's own compile: the call's comparison on every example runs it next
    (:func:`checked_program`)."""
    tangents, expected, expected_tangent = reference.tangents, reference.expected, reference.expected_tangent

    # compiled (and persisted), not op by op: seconds less; float32 products in float32 (XLA's default on a GPU is
    # TF32: resnets' outputs then differed from torch's by 1e-4 to 7e-4, refused although converted right)
    def attempt(fast: bool) -> tuple[Any, Callable, dict | None, list[Any]]:
        with x64_scope(x64), jax.default_matmul_precision("highest"), persistent_compilation() as persisted:
            example = [jax.device_put(x) for x in reference.example]

            def value_and_jvp(p: Any, v: Any, *example: Any) -> Any:
                return jax.jvp(lambda q: fn(q, *example), (p,), (v,))

            if tangents is None and not persisted:  # nothing to load: the value's program alone compiles fastest
                run = _compiled(fn, params, *example, fast=fast)
                got, got_tangent = np.asarray(run(params, *example)), None
                zeros = None
            else:
                # One program for the value and the JVP, also where only the value is checked (zero tangents): a
                # warm process loads the executable the first one persisted instead of compiling a value-only
                # program, and the first compiles one program, not two (convnext_small at 32×32: the value's alone
                # took 2.8 of 9.2 s).
                zeros = {n: np.zeros(np.shape(p), dtype=p.dtype) for n, p in params.items()}
                v = {n: jax.device_put(t) for n, t in (tangents or zeros).items()}
                # both read back (a result left in flight aborted the interpreter at exit)
                name = None if program is None else f"check:{program}"
                run = _compiled(value_and_jvp, dict(params), v, *example, name=name, fast=fast)
                got, tangent = (np.asarray(a) for a in run(dict(params), v, *example))
                got_tangent = None if tangents is None else tangent
        # tolerances by the least precise dtype in play: float64 weights under a float32 output round as float32
        precise = x64 and np.asarray(expected).dtype == np.float64
        err = _relative_error(got, expected)
        hint = narrowed_integers_hint([str(np.asarray(x).dtype) for x in reference.example], x64)
        if not err <= VALUE_TOL[precise]:
            rounded = (
                " In float64 a disagreement of 1e-10 to 1e-7 is likely a constant the ONNX export stored in float32 "
                "(an attention scale, a norm's order, a resize scale)."
                if precise and err < 1e-6
                else ""
            )
            raise ConversionError(
                f"Route {route!r} produced a function that disagrees with torch (max relative error {err:.2e}, shapes "
                f"{got.shape} vs {expected.shape}).{rounded}{hint} Please report this; meanwhile use "
                "implementation='jacobian_contraction' or 'ntk_vector_products'"
                f"{_other_route(route, x64)}."
            )
        if expected_tangent is not None and got_tangent is not None:
            _compare_derivatives(got_tangent, expected, expected_tangent, x64, route, precise, hint)
        return run, fn if zeros is None else value_and_jvp, zeros, example

    start = time.perf_counter()
    try:
        run, traceable, zeros, example = attempt(fast=True)
    except ConversionError:
        if x64:
            raise
        # XLA:CPU's fast tier (LLVM at O0) runs long float32 reductions in another order: resnet152's JVP came out
        # 1.5% off on an example where the optimised program agrees with torch to 1e-6. Refuse only a conversion
        # the optimised program disagrees with too (kept for the call's other examples).
        run, traceable, zeros, example = attempt(fast=False)
    if program is not None:  # passed: its program serves the value on the call's other examples
        _remember_program(program, run, traceable, zeros, x64, example, time.perf_counter() - start)
        if batch > 1:
            _compile_batched_ahead(program, params, example, batch)


def narrowed_integers_hint(dtypes: Sequence[str], x64: bool) -> str:
    """A sentence where 64-bit integer inputs (``dtypes``: their names, ``"int64"``) run as 32-bit ones (JAX without
    x64: a float32 model's)."""
    if x64 or not any(dtype in ("int64", "uint64") for dtype in dtypes):
        return ""
    return (
        " The model's int64 inputs run as 32-bit integers in JAX for a float32 model: integer arithmetic beyond "
        "±2^31 inside it (a hashing trick, ids * 1000003 % buckets) wraps otherwise than torch's; keep it within "
        "int32, or compute the model in float64."
    )


def _compare_derivatives(
    got_tangent: np.ndarray,
    expected: np.ndarray,
    expected_tangent: np.ndarray,
    x64: bool,
    route: str,
    precise: bool,
    hint: str = "",
) -> None:
    directions = _output_directions(expected.size, _TORCH_DTYPE[x64]).double().numpy()
    err = _relative_error(directions @ got_tangent.reshape(-1).astype(np.float64), expected_tangent)
    if not err <= DERIVATIVE_TOL[precise]:
        raise ConversionError(
            f"Route {route!r} produced a function whose derivative disagrees with torch's on the first example "
            f"(a Jacobian-vector product: max relative error {err:.2e}) although its outputs agree: an op whose "
            "derivative at a kink (relu6/clamp bounds, ties of a max) or at a repeated index of a write (scatter, "
            "index_put: torch's backward gives every write its gradient) follows another convention than torch's, so "
            f"its NTK would be of another function.{hint} Please report this; meanwhile use "
            "implementation='jacobian_contraction' or 'ntk_vector_products'"
            f"{_other_route(route, x64)}."
        )


def _compiled(fn: Callable, *args: Any, name: str | None = None, fast: bool = True) -> Any:
    """``jax.jit(fn)`` compiled for ``args`` (``FAST_COMPILE_OPTIONS`` on CPU unless not ``fast``: the check's runs
    once per example; persisted like the others); with ``name`` (it determines ``fn``), through the stored traced
    program (``compile_cache.compile_persisted``)."""
    on_cpu = all(d.platform == "cpu" for x in jax.tree_util.tree_leaves(args) for d in getattr(x, "devices", set)())
    options = FAST_COMPILE_OPTIONS if on_cpu and fast else None
    if name is not None:
        return compile_persisted(name, fn, args, options)
    return jax.jit(fn).lower(*args).compile(options)


class _CheckProgram(NamedTuple):
    """The check's compiled program of one converted function: ``run(params, [tangents,] *example)``; ``traceable``
    is the function it compiles (for a batched program of it); ``batched`` holds those, by batch size."""

    run: Any
    traceable: Callable
    tangent_types: dict[str, tuple[tuple[int, ...], Any]] | None  # shapes/dtypes where it takes tangents
    x64: bool
    device: Any
    batched: LRUCache[Any]  # a few batch sizes: each holds an executable
    spent: list[float]  # [seconds its runs took in this process, seconds it took to obtain (compile or load)]


#: The check's programs of the latest conversions, by ``function_key`` (each holds an executable: a few only).
_PROGRAMS: LRUCache[_CheckProgram] = LRUCache(8)


def _remember_program(
    program: str,
    run: Any,
    traceable: Callable,
    zeros: dict | None,
    x64: bool,
    example: Sequence[Any],
    obtain_seconds: float,
) -> None:
    shapes = None if zeros is None else {n: (z.shape, z.dtype) for n, z in zeros.items()}
    device = next(iter(example[0].devices())) if example else None
    _PROGRAMS[program] = _CheckProgram(run, traceable, shapes, x64, device, LRUCache(4), [0.0, obtain_seconds])


#: The check's own program (XLA:CPU's fast tier where it compiled one) serves a call's examples one at a time until
#: its runs in this process have cost this many times what obtaining it did; then the optimised one does (a ski
#: rental, as the structured programs' tiers: ``bridge.compile_tiers``). resnet18 at 32×32: 0.34 s per example by
#: the fast tier, 0.10 s optimised, compiled in 2.6 s, once per machine (persisted).
CHECK_UPGRADE_AFTER = 2.0


def forget_check_programs() -> None:
    _PROGRAMS.clear()


def checked_program(
    function_key: str,
    params: Mapping[str, np.ndarray],
    tangents: Mapping[str, np.ndarray],
    batch: int = 1,
    *,
    optimised: bool = False,
) -> Callable[[Sequence[np.ndarray]], tuple[np.ndarray, np.ndarray | None]] | None:
    """``run(examples) -> (values, J·tangents or None)``, each flattened to ``[batch, -1]``: the converted function
    ``function_key`` names, at ``params`` (numpy, the selected parameters), on ``batch`` more examples at once (numpy
    arrays with a leading batch axis of ``batch``, the first example's shapes and dtypes). ``batch=1`` runs the
    executable the check compiled or loaded: nothing is traced or compiled. A larger ``batch`` runs that function
    vmapped, compiled once per machine and shape (persisted like the others, at the check's precision, optimised).
    The JVP along ``tangents`` where the check's program computes one (``None`` where it compared values only).
    ``None`` when this process did not check the function (or no longer keeps its program). For the check of a
    conversion on every example of a call. ``optimised``: ``batch=1`` too by the vmapped program, compiled with
    XLA's optimisations (the check's own may be the fast tier's, whose float32 sums are less accurate)."""
    kept = _PROGRAMS.get(function_key)
    if kept is None:
        return None
    with x64_scope(kept.x64):  # put, not made by jnp: that would compile one program per shape
        placed = {n: jax.device_put(a, kept.device) for n, a in params.items()}
        directions = {
            n: jax.device_put(np.asarray(tangents[n], dtype=z[1]), kept.device)
            for n, z in (kept.tangent_types or {}).items()
        }
    constants = (placed,) if kept.tangent_types is None else (placed, directions)

    def run(examples: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        with x64_scope(kept.x64):
            own = batch == 1 and not optimised and kept.spent[0] < CHECK_UPGRADE_AFTER * kept.spent[1]
            xs = [jax.device_put(x[0] if own else x, kept.device) for x in examples]
            program = kept.run if own else _batched(kept, function_key, batch, constants, xs)
            start = time.perf_counter()
            result = program(*constants, *xs)
            if kept.tangent_types is None:
                value, tangent = np.asarray(result).reshape(batch, -1), None
            else:
                value, tangent = np.asarray(result[0]).reshape(batch, -1), np.asarray(result[1]).reshape(batch, -1)
            if own:  # read back above: the run is done
                kept.spent[0] += time.perf_counter() - start
            return value, tangent

    return run


#: Examples the check's vmapped program takes at once: few shapes, each compiled once per machine.
CHECK_BATCHES = (4, 16)


def check_batch(examples: int) -> int:
    """Examples per run of the converted side when a call's ``examples`` (the larger batch of ``x1`` and ``x2``)
    are compared with torch: one at a time below :data:`CHECK_BATCHES`' smallest (by the check's own program), else
    the smallest batch that holds them (the last run padded), at most the largest. Four examples of resnet18 at
    32×32: a warm call 1.97 → 1.54 s; two of convnext_small, batched by four, cost its cold call 1.5 s (the
    optimised compile beside the structured program's) and its warm one 0.17 s."""
    if examples < CHECK_BATCHES[0]:
        return 1
    return next((size for size in CHECK_BATCHES if examples <= size), CHECK_BATCHES[-1])


def _compile_batched_ahead(program: str, params: Mapping[str, Any], example: Sequence[Any], batch: int) -> None:
    """The kept ``program`` vmapped over ``batch`` examples, compiled (or loaded) now for :func:`checked_program`'s
    arguments: the parameters, zero tangents of its own types, and the example repeated. A failure is left to that
    later call, which compiles it again and raises."""
    kept = _PROGRAMS.get(program)
    if kept is None:
        return
    try:
        with x64_scope(kept.x64):
            placed = {n: jax.device_put(a, kept.device) for n, a in params.items()}  # no host copy
            tangents = {
                n: jax.device_put(np.zeros(s, d), kept.device) for n, (s, d) in (kept.tangent_types or {}).items()
            }
            constants = (placed,) if kept.tangent_types is None else (placed, tangents)
            xs = [jax.device_put(np.repeat(np.asarray(x)[None], batch, axis=0), kept.device) for x in example]
            _batched(kept, program, batch, constants, xs)
    except Exception as error:  # noqa: BLE001 - ahead of time only: the comparison compiles it itself
        _LOG.debug("torchntk: the check's batched program was not compiled ahead (%s)", error)


def _batched(kept: _CheckProgram, function_key: str, batch: int, constants: tuple, xs: list) -> Any:
    """The check's function vmapped over ``batch`` examples, compiled (persisted) once per process and shape (in the
    check's thread ahead of the call's comparison, or by it)."""
    ready = kept.batched.get(batch)  # the check's thread and the caller's may both ask: the store is thread-safe
    if ready is None:
        in_axes = (None,) * len(constants) + (0,) * len(xs)
        batched = jax.vmap(kept.traceable, in_axes=in_axes)
        with jax.default_matmul_precision("highest"), persistent_compilation():
            # optimised: it runs on every call of many examples (resnet18 at 32×32, 16 examples: 1.25 s at the
            # check's level, 0.37 s optimised, for about the same compile)
            ready = _compiled(batched, *constants, *xs, name=f"check-batched:{function_key}", fast=False)
        kept.batched[batch] = ready
    return ready


def random_direction(values: Mapping[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """A fixed random tangent per parameter, scaled like the parameter (CPU, the parameter's dtype); ``seed`` picks
    which.

    Drawn in the parameter's dtype and scaled in place: efficientnet_v2_l's 117M parameters took 3.1 s drawn in
    float64 and cast, 0.7 s so (this runs before the check can go beside the compile)."""
    generator = torch.Generator().manual_seed(seed)
    direction = {}
    for name, value in values.items():
        noise = torch.randn(value.shape, generator=generator, dtype=value.dtype)
        scale = float(value.detach().abs().max()) if value.numel() else 1.0
        direction[name] = noise.mul_(scale or 1.0)
    return direction


def _torch_value_and_derivative(
    model: torch.nn.Module,
    values: Mapping[str, torch.Tensor],
    tangents: Mapping[str, torch.Tensor] | None,
    inputs: Sequence[torch.Tensor],
) -> tuple[np.ndarray, np.ndarray | None]:
    """torch's output on the first example and ``U J v`` along ``tangents`` (:func:`_reverse_mode_projections`;
    ``None`` without tangents, or when torch has no backward for an op of the model: the value check alone then)."""
    aliases, first = parameter_aliases(model), tuple(x[:1] for x in inputs)
    primals = {n: v.detach().clone() for n, v in values.items()}

    def forward(params: dict[str, torch.Tensor]) -> Any:
        return functional_forward(model, aliases, params, first)

    out, tangent = None, None
    if tangents is not None:
        device_tangents = {n: t.to(primals[n].device) for n, t in tangents.items()}
        try:
            out, tangent = _reverse_mode_projections(forward, primals, device_tangents)
        except (RuntimeError, NotImplementedError) as err:  # an op without a backward: no NTK method works anyway
            _LOG.debug("derivative check skipped: torch has no VJP for the model (%s)", err)
    if tangent is None:
        # in grad mode, as the export traced it and the NTK's J takes it (a forward reading torch.is_grad_enabled(),
        # e.g. a fused no-grad path, was checked against another function: a disk-cached graph was then refused)
        with torch.enable_grad():
            out = forward(primals)
    if not isinstance(out, torch.Tensor):
        raise ConversionError(
            f"The model returns {type(out).__name__}; torchntk converters need a single tensor output. "
            "Wrap the model so that forward returns one tensor (e.g. torch.cat of the flattened outputs)."
        )
    expected = out[0].detach().cpu().numpy()
    if not np.isfinite(expected).all():
        raise NonFiniteCheckError(
            f"The model's output on the first example holds {int((~np.isfinite(expected)).sum())} NaN/Inf values "
            "although its weights, buffers and that example are finite, so the conversion cannot be checked "
            "against torch. Pass examples on which the model's output is finite."
        )
    return expected, None if tangent is None else tangent.detach().cpu().numpy()


_TORCH_DTYPE = {False: torch.float32, True: torch.float64}

#: Output directions the derivative is compared along: all outputs when there are at most this many, else this many
#: fixed random combinations of them (each a torch VJP).
MAX_PROJECTIONS = 16


def _output_directions(size: int, dtype: torch.dtype) -> torch.Tensor:
    """``U[k, size]``: the identity for ``size ≤ MAX_PROJECTIONS``, else fixed Gaussian rows."""
    if size <= MAX_PROJECTIONS:
        return torch.eye(size, dtype=dtype)
    generator = torch.Generator().manual_seed(1)
    return torch.randn(MAX_PROJECTIONS, size, generator=generator, dtype=torch.float64).to(dtype)


def _reverse_mode_projections(forward: Callable, primals: dict, tangents: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f(θ), U J v)`` (:func:`_output_directions`) with J from torch's *reverse* mode, as the NTK's J = ∂f/∂θ
    takes it (the explicit-Jacobian oracle, Jacobian contraction): each row is a VJP ``(Jᵀu)·v``. torch's forward
    mode, and even its double backward, can pick another derivative at a kink than its backward (``prelu`` at 0:
    1 there, the slope in backward), which would refuse a conversion that agrees with the NTK's J."""
    out, vjp_fn = torch.func.vjp(forward, primals)
    directions = _output_directions(out[0].numel(), out.dtype).to(out.device)
    rows = []
    for u in directions:  # one example (out is [1, *O]): one VJP per direction, the backward graph kept
        (grads,) = vjp_fn(u.reshape(out.shape))
        rows.append(sum((grads[n] * t).sum() for n, t in tangents.items()))
    return out, torch.stack(rows)


def _relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    if got.shape != expected.shape:
        return float("inf")
    return float(np.abs(got - expected).max()) / (float(np.abs(expected).max()) + 1e-30)
