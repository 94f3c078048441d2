"""A conversion checked against torch on every example of the call, before any kernel is computed.

The conversion's own check (:mod:`torchntk.converters.check`) compares its value and one derivative on the first
example. That leaves three ways to a wrong kernel on the other examples:

- **A cache served another model's conversion.** The conversion caches are keyed by the architecture fingerprint,
  which reads the model's code and state statically. What it misses leaves the key unchanged, and the cached
  conversion of the model as it was is served: hostile probing found twenty such changes in one process (a helper
  module's constant read through ``getattr``, a class attribute on a metaclass, a library method patched through
  ``functools.wraps``...) and one between processes (a constant read through ``importlib.import_module``).
- **A route translates an op's value wrongly** where only later examples reach (atan2 at y = 0, x < 0).
- **A route gives an op another derivative than torch's backward at a special point** only later examples reach:
  ``xlogy(0, y)`` (0.69 off), ``xlog1py``, an embedding's ``padding_idx`` row (torch gives it no gradient), a
  tensor hook registered in forward that masks the gradient on some examples.

So every conversion has its outputs compared with torch's forward on every example of both batches, and one random
derivative per chunk of examples: torch's ``Σ_n u_n·J_n v`` by its own backward of the batch, against the sum of the
converted function's JVPs ``u_n·(J_n v)`` example by example, each weighed by the inverse of its own size
(:mod:`torchntk._example_weights`: an example with outputs 100× larger hid another's wrong derivative), and each
example's outputs relative to its own. Where this process checked the conversion (exported, or loaded from disk and
checked), the check's own function gives both: for up to three examples its compiled program, one at a time (nothing
traced or compiled), for more that function vmapped over 4 or 16 examples (``converters.check.check_batch``:
compiled, or loaded by a second process, in the check's thread beside the call's first compile:
:func:`comparison_batch`). A conversion from the memory cache whose check program is no longer kept is compared by a
jitted batched forward and JVP, in chunks (it was compared by values only, and a model whose outputs agreed while
its derivative picked other rows was served: 2.0 off). The caller drops a disagreeing conversion from the caches and
converts afresh; one that disagrees when fresh is refused.
Cost: per call, one forward and backward over the examples in torch, one forward and JVP per example in JAX
(``benchmarks/checks_cost.py``).

Float32 outputs that disagree beyond the tolerance are judged once more against torch's forward in float64 (a
float64 copy of the model): two float32 sum orders differ by more than ``VALUE_TOL`` relative to an example's own
output where that output is small against the terms summed (an FCN of depth 10 and width 2048: 2.1e-4, the
conversion refused although both are as exact as float32 allows). What counts is the converted function's distance
from the float64 outputs, measured in units of torch's own float32 distance (:func:`_float32_error`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from torchntk._example_weights import FLOOR, example_weights
from torchntk._float64_dot import dot64
from torchntk._lru import LRUCache
from torchntk._precision import float32_throughout
from torchntk._problem import NTKProblem, float64_forward
from torchntk.bridge.device import to_jax_array

# Examples per forward of the comparison (bounds its memory; at most two compiled shapes per batch size).
CHUNK = 64
# One jitted forward and JVP per converted function whose check program is no longer kept (jit keeps its
# executables per input shape): those of the latest few functions (torchntk._lru says why a few).
_VALUE_AND_JVPS: LRUCache[Any] = LRUCache(8)


def comparison_batch(problem: NTKProblem) -> int:
    """Examples the converted side compares at once (``converters.check.check_batch`` of the larger batch, up to a
    chunk): up to three one at a time by the check's own program, else the program vmapped over 4 or 16 (resnet18 at
    32×32, 4 examples: 0.66 s one at a time at the check's level, 0.10 s batched)."""
    from torchntk.converters.check import check_batch

    largest = max(problem.n1, 0 if problem.x2 is None else problem.n2)
    return check_batch(min(largest, CHUNK))


def disagreement(problem: NTKProblem, batched: Callable[[Any, Any], Any], function_key: str, target: Any) -> str | None:
    """``None`` when the converted function gives torch's outputs, and derivatives along a random direction, on
    every example of ``x1`` and ``x2``, within the conversion check's tolerances; else what disagrees.
    ``batched(params, inputs)`` is the converted function on a batch, used where the check's program is not kept."""
    from torchntk.converters import DERIVATIVE_TOL, VALUE_TOL, checked_program, random_direction

    x64 = problem.out_dtype == torch.float64
    direction = random_direction(problem.params, seed=2)  # the conversion check's kind of direction (CPU)
    batch = comparison_batch(problem)
    run = checked_program(function_key, _numpy(problem.params), _numpy(direction), batch)
    if run is None:  # a conversion whose check's program is no longer kept: a jitted batched JVP instead
        run = _batched_value_and_jvp(problem, batched, function_key, target, direction)
        batch = min(CHUNK, max(problem.n1, problem.n2))  # one compiled shape, rows padded to it
    worst_value, worst_derivative = _worst(problem, run, batch, direction)
    if batch == 1 and not x64 and not (worst_value <= VALUE_TOL[x64] and worst_derivative <= DERIVATIVE_TOL[x64]):
        # The check's own program may be XLA:CPU's fast tier, whose float32 sums run in another order: resnet152's
        # JVP came out 1.5% off on its second example, 1e-6 by the optimised program. Refuse only what that refuses.
        run = checked_program(function_key, _numpy(problem.params), _numpy(direction), 1, optimised=True)
        worst_value, worst_derivative = _worst(problem, run, 1, direction)
    if not worst_value <= VALUE_TOL[x64]:
        return f"outputs (max relative error {worst_value:.2e})"
    if not worst_derivative <= DERIVATIVE_TOL[x64]:
        return f"derivatives (a Jacobian-vector product: relative error {worst_derivative:.2e})"
    return None


def _worst(problem: NTKProblem, run: Callable, batch: int, direction: dict[str, torch.Tensor]) -> tuple[float, float]:
    """The largest relative errors of the outputs and of the weighed derivative projections, over every chunk."""
    worst_value = worst_derivative = 0.0
    for index, chunk in enumerate(_chunks(problem)):
        n = chunk[0].shape[0]
        generator = torch.Generator().manual_seed(1000 + index)
        u = torch.randn((n, *problem.out_shape), generator=generator, dtype=torch.float64)
        values, tangents = [], []
        for start in range(0, n, batch):
            rows = list(range(start, min(start + batch, n)))
            padded = rows + [rows[-1]] * (batch - len(rows))  # one compiled shape: the last row repeated
            value, tangent = run([x[padded].detach().resolve_neg().cpu().numpy() for x in chunk])
            values.extend(value[: len(rows)])
            if tangent is not None:
                tangents.extend(tangent[: len(rows)])
        # each example's projection weighed by its own size (_example_weights: one example's error is its own)
        projections = (u.reshape(n, -1) * torch.from_numpy(np.stack(tangents))).sum(1) if tangents else None
        weights = example_weights(projections) if projections is not None else torch.ones(n, dtype=torch.float64)
        want, torch_projection = _torch_side(problem, chunk, direction, u * weights.reshape(n, *[1] * (u.ndim - 1)))
        got = torch.from_numpy(np.stack(values)).reshape(want.shape).to(want)
        value_error = _relative_per_example(got, want)
        if want.dtype == torch.float32:
            value_error = _float32_error(problem, chunk, got, want, value_error)
        worst_value = max(worst_value, value_error)
        if projections is not None and torch_projection is not None:
            weighed = weights * projections
            difference = abs(float(weighed.sum()) - torch_projection)
            worst_derivative = max(worst_derivative, difference / (float(weighed.abs().max()) + 1e-30))
    return worst_value, worst_derivative


#: How far the converted function's float32 outputs may be from the float64 ones, in units of torch's own float32
#: distance from them (two sum orders of equal accuracy differ by a small factor, example by example), and never
#: farther than FLOAT32_WIDEST relative: a model whose float64 forward computes something else (code that branches
#: on the dtype) must not widen the tolerance without end.
FLOAT32_SLACK = 4.0
FLOAT32_WIDEST = 1e-3


def _float32_error(
    problem: NTKProblem, chunk: tuple[torch.Tensor, ...], got: torch.Tensor, want: torch.Tensor, error: float
) -> float:
    """Where they disagree with torch's (``error`` > ``VALUE_TOL``), the float32 outputs ``got`` of the conversion
    against float64 truth, on the scale of ``VALUE_TOL``: their distance from torch's float64 outputs over
    ``FLOAT32_SLACK`` × torch's own float32 distance (``want``), at least ``VALUE_TOL`` and at most
    ``FLOAT32_WIDEST``. A conversion computing another function stays far off (its distance is the disagreement
    itself, torch's float32 one is rounding). ``error`` itself where the model does not run in float64."""
    from torchntk.converters import VALUE_TOL

    if error <= VALUE_TOL[False]:
        return error
    try:
        exact = float64_forward(problem.model, problem.aliases, problem.params)(chunk)
        exact = exact.detach().double().reshape(want.shape)
    except Exception:  # noqa: BLE001 - a model that does not run in float64: the float32 comparison stands
        return error
    ours = _relative_per_example(got.double(), exact)
    torchs = _relative_per_example(want.double(), exact)
    allowed = min(max(VALUE_TOL[False], FLOAT32_SLACK * torchs), FLOAT32_WIDEST)
    return ours * VALUE_TOL[False] / allowed


def _chunks(problem: NTKProblem):
    for batch in (problem.x1,) if problem.x2 is None else (problem.x1, problem.x2):
        for start in range(0, batch[0].shape[0], CHUNK):
            yield tuple(x[start : start + CHUNK] for x in batch)


def _numpy(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {name: t.detach().resolve_neg().cpu().numpy() for name, t in tensors.items()}


def _torch_side(
    problem: NTKProblem, chunk: tuple[torch.Tensor, ...], direction: dict[str, torch.Tensor], u: torch.Tensor
) -> tuple[torch.Tensor, float | None]:
    """torch's outputs on ``chunk`` and ``Σ_n u_n·J_n v`` by one backward of the batch (``None`` where torch has no
    backward for an op of the model)."""
    params = {name: p.detach().requires_grad_() for name, p in problem.params.items()}
    with torch.enable_grad(), float32_throughout():
        out = problem.forward(params, chunk)
        projection = None
        if out.requires_grad:
            try:
                grads = torch.autograd.grad((out * u.to(out)).sum(), list(params.values()), allow_unused=True)
            except (RuntimeError, NotImplementedError):  # an op without a backward: no NTK method works there
                grads = None
            if grads is not None:
                projection = float(  # in float64 slices: θ-sized float64 copies took 0.58 s of 2 on 38M parameters
                    sum(
                        dot64(g, direction[n].to(g.device)) for n, g in zip(params, grads, strict=True) if g is not None
                    )
                )
        else:
            projection = 0.0
    return out.detach(), projection


def _batched_value_and_jvp(
    problem: NTKProblem, batched: Callable, function_key: str, target: Any, direction: dict[str, torch.Tensor]
) -> Callable[[list[np.ndarray]], tuple[np.ndarray, np.ndarray]]:
    """``run(examples) -> (values, J·direction)`` per example, flattened, like the check's program: the converted
    function's batched JVP, jitted once per function (one compile per chunk shape)."""
    import jax

    def value_and_jvp(params: Any, inputs: Any, tangents: Any) -> Any:
        return jax.jvp(lambda p: batched(p, inputs), (params,), (tangents,))

    program = _VALUE_AND_JVPS.setdefault(function_key, jax.jit(value_and_jvp))
    params = {name: to_jax_array(value, target) for name, value in problem.params.items()}
    tangents = {name: to_jax_array(direction[name].to(p), target) for name, p in problem.params.items()}

    def run(examples: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        inputs = tuple(to_jax_array(torch.from_numpy(x), target) for x in examples)
        value, tangent = program(params, inputs, tangents)
        n = examples[0].shape[0]
        return np.asarray(value).reshape(n, -1), np.asarray(tangent).astype(np.float64).reshape(n, -1)

    return run


def _relative_per_example(got: torch.Tensor, want: torch.Tensor) -> float:
    """The largest of each example's difference relative to its own largest output (at least :data:`FLOOR` of the
    chunk's: outputs near zero are not amplified without end); NaN where both are NaN counts as agreement."""
    if got.shape != want.shape:
        return float("inf")
    if not want.numel():
        return 0.0
    n = want.shape[0]
    difference = torch.where(got.isnan() & want.isnan(), 0.0, (got - want).abs()).reshape(n, -1)
    difference = torch.nan_to_num(difference, nan=float("inf"))
    scale = torch.nan_to_num(want.abs(), nan=0.0, posinf=0.0).reshape(n, -1).amax(1)
    scale = scale.clamp(min=FLOOR * float(scale.max()) + 1e-30)
    return float((difference.amax(1) / scale).max())
