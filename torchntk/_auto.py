"""``implementation="auto"`` and :func:`torchntk.explain`: estimate every method's time, pick the fastest.

Each method's time is a linear model of cost terms — the paper's Table 1 with a forward pass counted by
``torchntk._macs`` for the torch-native methods, XLA's cost analysis of the compiled kernel
function for structured derivatives — with seconds per term fitted to measured times (``_SECONDS_PER_TERM``,
``benchmarks/calibrate_auto.py``). Methods whose one-pair tile exceeds the memory budget are left out.

Structured derivatives first convert the model to JAX, which takes seconds once per architecture. ``auto`` pays for
it like a ski rental: while the conversion is not yet in memory it runs the best torch-native method, adding up the
seconds those runs take for this architecture, and converts once that sum plus the next call's estimate reaches the
estimated cost of the first structured call before it runs: conversion plus tracing and XLA compilation (minutes on
deep models), or loading both when a previous process left them in the disk caches. A long call converts at once; a
stream of short ones converts after spending about that much, so auto never spends much more than twice what the
best choice in hindsight would have. Once converted, every method competes on its estimated time, and the choice is
cached per (architecture, shapes, dtype, device, layout, memory options).
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from dataclasses import dataclass, field, replace

import torch

from torchntk._fingerprint import architecture
from torchntk._macs import forward_macs
from torchntk._problem import NTKProblem
from torchntk._repeated_blocks import program_holders
from torchntk._tiles import TileOptions, host_memory_budget, memory_budget, per_example_fn, tile_bytes
from torchntk._warnings import warn
from torchntk.torch_native.jacobian_contraction import examples_differentiated
from torchntk.torch_native.jacobian_contraction import minimum_bytes_per_example as jc_bytes_per_example
from torchntk.torch_native.ntk_vector_products import minimum_bytes_per_example as nvp_bytes_per_example

logger = logging.getLogger("torchntk")

# A JVP or a VJP costs about 3 forward passes (paper App. D).
_AD_FACTOR = 3
# Seconds per cost term (native_terms, structured_terms, conversion_terms), fitted by benchmarks/calibrate_auto.py
# to the side-by-side medians of benchmarks/fcn.py, resnet.py and auto_choice.py on 2 x86_64 cores
# (results/auto_calibration.json; 2026-12-06, with check_terms: the fit's choice is the fastest method in 99 of 115
# measured cases and at worst 1.27x the fastest's time, where the constants before check_terms chose 2.15x). Only
# the methods' ratios matter for the choice; the conversion's seconds are
# weighed against measured torch-native seconds.
_SECONDS_PER_TERM = {
    # (per call, per layer, per VJP multiply-add, per contraction multiply-add, per Jacobian byte,
    #  per conv layer and VJP batch entry, + check_terms)
    "jacobian_contraction": (0.0, 7.953e-04, 1.572e-11, 1.149e-11, 4.256e-10, 6.446e-04, 2.149e-08, 2.496e-03),
    # (per call, per layer, per VJP multiply-add, per JVP multiply-add, per J(x2) byte, per tangent entry read,
    #  per conv layer and AD batch entry, + check_terms)
    "ntk_vector_products": (
        1.847e-03,
        1.098e-03,
        3.555e-11,
        0.0,
        4.972e-10,
        4.666e-11,
        2.296e-04,
        2.183e-08,
        2.907e-03,
    ),
    # (per call, per layer, per XLA multiply-add, per XLA byte accessed, per conv layer, example and output,
    #  + check_terms)
    "structured_derivatives": (0.0, 1.092e-03, 1.097e-11, 1.542e-10, 0.0, 2.978e-08, 4.958e-03),
    "conversion": (1.496e00, 2.381e-02, 3.239e-08),
}
# What a first structured call pays before it runs, beyond the conversion (results/compile_calibration.json):
_FIRST_CALL_SECONDS_PER_TERM = {
    # Tracing and XLA compilation: (fixed, per parameter-holding module the rolled program holds, per such module of
    # the model), fitted by calibrate_auto.py --compile to compile_sweep.py's 76 zoo builders (one code, 2026-12-05:
    # 0.85-31 s; median prediction 0.93 of the measured before the cover) and scaled by 2.00 to cover every one (the
    # worst: swin_v2_b, whose attention blocks hold many operations per module): an underestimate would stall the user.
    "compile": (1.233e00, 4.048e-02, 3.360e-02),
    # Loading the conversion and the executables from the disk caches instead: (fixed, per holder).
    "persisted": (0.3, 5e-3),
}
# Host memory a conversion takes at its peak, per byte of the model's parameters and buffers: torch.export's copy,
# the ONNX model and its serialised bytes, JAX's arrays, and the check's forward passes (measured on resnet18/50,
# convnext_tiny and wide_resnet50_2 at 32x32: 6.4-7.3 bytes per byte above ~0.2 GB of imports; rounded up).
_CONVERSION_BYTES_PER_MODEL_BYTE = 8.0
# A device kind without a fitted time model ranks the methods by their FLOP/byte estimates alone: seconds =
# multiply-adds / rate + bytes / bandwidth, at nominal rates (only their ratio matters for the choice).
_MAC_SECONDS = 1 / 1e13
_BYTE_SECONDS = 1 / 1e12
_FLOP_BYTE_TERMS = {
    "jacobian_contraction": (0.0, 0.0, _MAC_SECONDS, _MAC_SECONDS, _BYTE_SECONDS, 0.0, 0.0, 0.0),
    # the tangent entries read count 4 bytes each (float32)
    "ntk_vector_products": (0.0, 0.0, _MAC_SECONDS, _MAC_SECONDS, _BYTE_SECONDS, 4 * _BYTE_SECONDS, 0.0, 0.0, 0.0),
    "structured_derivatives": (0.0, 0.0, _MAC_SECONDS, _BYTE_SECONDS, 0.0, 0.0, 0.0),
}
# Seconds per cost term by device kind (``torch.device.type``): only the CPU is fitted so far; a CUDA fit comes from
# running benchmarks/calibrate_auto.py on a GPU. The conversion runs on the host, so it always uses the CPU's fit.
_SECONDS_PER_TERM_BY_DEVICE = {"cpu": _SECONDS_PER_TERM}
# One-time costs a conversion pays once per process (measured): importing JAX + ONNX, and the first torch.export
# (dynamo warm-up; fitted by calibrate_auto.py as "first_export"). The default route (onnx-jax) imports no TensorFlow.
_FIRST_USE_SECONDS = {"jax": 0.7, "export": 0.384, "jvp": 0.25}
# The module torch imports on a process's first forward-mode AD (NTK-vector products' JVPs): its import is "jvp".
_JVP_MODULE = "torch._decomp.decompositions_for_jvp"


@dataclass(frozen=True)
class Estimate:
    """Estimated cost of one method: multiply-adds for the whole kernel, bytes of one tile's intermediates, and the
    predicted wall-clock seconds (the calibrated time model, conversion excluded)."""

    implementation: str
    flops: float
    memory_bytes: float
    seconds: float


@dataclass(frozen=True)
class Explanation:
    """What ``implementation="auto"`` does for one call: ``choice``, the ``estimates`` behind it, and why.

    A first structured call costs three parts: ``conversion_seconds`` (export, route, check — or loading them from
    the disk cache), ``compile_seconds`` (tracing and XLA compilation — or loading the persisted executable), both
    ``None`` once converted (or when not needed to decide), and the run (the ``structured_derivatives`` estimate when
    costed). ``persisted`` says whether the estimate counted on the disk caches holding this architecture.
    ``time_model`` is the device kind whose fitted coefficients priced the methods, or ``"flop-byte"`` where
    that kind has no fit yet (the methods are then ranked by their multiply-add and byte estimates alone, and
    ``reason`` says so). ``conversion_bytes``: the conversion's estimated peak host memory while the model is not
    converted (``None`` once it is); auto does not convert when it exceeds ``max_memory`` (CPU models) or half the
    available RAM, and ``notes`` says so.
    """

    choice: str
    estimates: tuple[Estimate, ...]
    reason: str
    route: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    conversion_seconds: float | None = None
    compile_seconds: float | None = None
    persisted: bool = False
    time_model: str = "cpu"
    conversion_bytes: float | None = None


# Final choices (every method costed, or the conversion failed), per _choice_key.
_CHOICES: dict[str, Explanation] = {}
# Torch-native estimates per _choice_key: the counted forward pass runs once.
_NATIVE: dict[str, tuple[Estimate, ...]] = {}
# Seconds auto spent running torch-native methods on a not-yet-converted architecture, per _architecture_key.
_SPENT: dict[str, float] = {}
# Why structured derivatives failed, per _architecture_key: other shapes of the same model do not try (and warn) again.
_FAILED: dict[str, str] = {}


def forward_flops(problem: NTKProblem) -> float:
    """Multiply-adds of one example's forward pass (:func:`torchntk._macs.forward_macs`; at least P, one per
    parameter, for a model whose work hides where the counter cannot see it)."""
    fn = per_example_fn(problem)
    try:
        counted = forward_macs(fn, problem.params, *(x[0] for x in problem.x1))
    except Exception as error:  # a model the counter trips on still gets an estimate
        logger.debug("counting the forward pass failed (%s); estimating it as P multiply-adds", error)
        counted = 0
    return float(max(counted, problem.num_params))


def time_model(problem: NTKProblem) -> str:
    """The time model for ``problem``'s device: its kind when fitted, else ``"flop-byte"``."""
    kind = problem.device.type
    return kind if kind in _SECONDS_PER_TERM_BY_DEVICE else "flop-byte"


def _predict(implementation: str, terms: list[float], model: str = "cpu") -> float:
    if implementation in _FIRST_CALL_SECONDS_PER_TERM:
        coefficients = _FIRST_CALL_SECONDS_PER_TERM[implementation]
    elif implementation == "conversion":
        coefficients = _SECONDS_PER_TERM["conversion"]
    else:
        coefficients = _SECONDS_PER_TERM_BY_DEVICE.get(model, _FLOP_BYTE_TERMS)[implementation]
    return sum(c * t for c, t in zip(coefficients, terms, strict=True))


def _unfitted_note(problem: NTKProblem) -> str:
    if time_model(problem) != "flop-byte":
        return ""
    return (
        f"; no time model is fitted for {problem.device.type} yet, so the methods are ranked by their multiply-add "
        "and byte estimates alone (benchmarks/calibrate_auto.py on this device would fit one)"
    )


def _output_pairs(problem: NTKProblem) -> float:
    """Outputs of ``x1`` paired with outputs of ``x2`` in Jacobian contraction's products (a traced axis counted
    before its sum): ``O²`` with every output axis free, ``O`` where each is traced or diagonal."""
    pairs = 1.0
    for axis, size in enumerate(problem.out_shape, start=1):
        pairs *= size if axis in problem.trace_axes or axis in problem.diagonal_axes else size * size
    return pairs


# Where native_terms puts the two multiply-add terms (VJPs, and the contraction or the JVPs) of both methods.
_NATIVE_MAC_TERMS = (2, 3)


def native_terms(problem: NTKProblem, fp: float, options: TileOptions | None = None) -> dict[str, list[float]]:
    """Cost terms of the torch-native methods (paper Table 1, App. D) for a forward pass of ``fp`` multiply-adds;
    ``options`` size Jacobian contraction's output blocks, whose tiles rebuild their rows
    (:func:`~torchntk.torch_native.jacobian_contraction.examples_differentiated`)."""
    o, p = problem.out_size, problem.num_params
    n1 = problem.n1
    built = examples_differentiated(problem, options or TileOptions())  # n1 + n2 unblocked
    rows = max(n1, problem.n2)  # examples whose Jacobian rows NTK-vector products build by VJPs
    pairs = problem.n1 if problem.paired else problem.n1 * problem.n2
    itemsize = torch.empty((), dtype=problem.out_dtype).element_size()
    convolutions = _convolutions(problem)
    layers = _leaf_modules(problem)
    return {
        # VJPs for every output entry and example, the Jacobians written and read (bytes), their contraction
        "jacobian_contraction": [
            1.0,
            layers,
            built * o * _AD_FACTOR * fp,
            pairs * _output_pairs(problem) * p,
            built * o * p * itemsize,
            built * o * convolutions,
            *check_terms(problem),
        ],
        # VJPs for the rows of J(x2), then one JVP through x1 per row and example pair, each reading a P-long tangent
        "ntk_vector_products": [
            1.0,
            layers,
            rows * o * _AD_FACTOR * fp,
            pairs * o * _AD_FACTOR * fp,
            rows * o * p * itemsize,
            pairs * o * p,
            (rows + pairs) * o * convolutions,
            *check_terms(problem),
        ],
    }


def torch_native_estimates(problem: NTKProblem, options: TileOptions | None = None) -> list[Estimate]:
    """Estimates of Jacobian contraction and NTK-vector products for ``problem``; not of NTK-vector products where
    they refuse it before any work (an op whose backward is not its forward's derivative: ``forward_mode_differs``),
    which auto would otherwise pick, warn about and fall back from."""
    terms = native_terms(problem, forward_flops(problem), options)
    if problem.forward_mode_differs:
        terms.pop("ntk_vector_products", None)
    per_example = {
        "jacobian_contraction": jc_bytes_per_example(problem),
        "ntk_vector_products": nvp_bytes_per_example(problem),
    }
    return [
        Estimate(
            method,
            sum(t[i] for i in _NATIVE_MAC_TERMS),
            tile_bytes(problem, per_example[method], 1),
            _predict(method, t, time_model(problem)),
        )
        for method, t in terms.items()
    ]


def _leaf_modules(problem: NTKProblem) -> float:
    """Modules without children: a proxy for the operations each call dispatches (its fixed overhead)."""
    return float(sum(1 for m in problem.model.modules() if next(m.children(), None) is None))


def _convolutions(problem: NTKProblem) -> float:
    """Convolution layers. Batched convolution backward passes (torch's vmap, XLA's per-output cotangents) cost about
    a millisecond per layer and batch entry whatever their size: what dominates small-image convolutional nets
    (resnets at 32x32 ran 3x slower than their multiply-adds say)."""
    return float(sum(isinstance(m, torch.nn.modules.conv._ConvNd) for m in problem.model.modules()))


def structured_terms(problem: NTKProblem, macs: float, bytes_accessed: float) -> list[float]:
    """Cost terms of structured derivatives, from XLA's cost analysis of the kernel function (whole kernel), and
    the per-example, per-output cotangent passes through each convolution."""
    conv_batches = _examples(problem) * problem.out_size * _convolutions(problem)
    return [1.0, _leaf_modules(problem), macs, bytes_accessed, conv_batches, *check_terms(problem)]


def _examples(problem: NTKProblem) -> int:
    return problem.n1 + (0 if problem.x2 is None else problem.n2)


def check_terms(problem: NTKProblem) -> list[float]:
    """What every method's per-call checks cost beyond its own work (the torch-native methods' derivatives against
    torch's backward, structured derivatives' conversion on every example): (per parameter: θ-sized directions,
    gradients and projections, whatever N and O; per example and convolution layer: each example's check pass,
    whatever O). Without them the fit missed one-output calls of large models by 15-25x (2026-12-06: a JC call on a
    38M-parameter FCN, N = 1, O = 1, spent 1.6 of its 1.8 s in its checks)."""
    return [float(problem.num_params), _examples(problem) * _convolutions(problem)]


def conversion_terms(problem: NTKProblem) -> list[float]:
    """Terms of the conversion-time model: (1, modules holding parameters, parameters)."""
    holders = sum(1 for m in problem.model.modules() if any(True for _ in m.parameters(recurse=False)))
    return [1.0, float(holders), float(sum(p.numel() for p in problem.model.parameters()))]


def _with_first_use(estimate: Estimate) -> Estimate:
    """The estimate plus the one-time import its method still has to pay in this process."""
    if estimate.implementation == "ntk_vector_products" and _JVP_MODULE not in sys.modules:
        return replace(estimate, seconds=estimate.seconds + _FIRST_USE_SECONDS["jvp"])
    return estimate


def conversion_seconds(problem: NTKProblem) -> float:
    """Estimated seconds to convert the model now, including first-use imports not yet paid in this process."""
    seconds = _predict("conversion", conversion_terms(problem))
    if "jax" not in sys.modules:
        seconds += _FIRST_USE_SECONDS["jax"]
    if "onnxscript" not in sys.modules:  # imported by the first ONNX export
        seconds += _FIRST_USE_SECONDS["export"]
    return seconds


def conversion_bytes(problem: NTKProblem) -> float:
    """Estimated peak host memory of converting the model (the whole model: every parameter and buffer)."""
    model_bytes = sum(t.numel() * t.element_size() for t in (*problem.model.parameters(), *problem.model.buffers()))
    return _CONVERSION_BYTES_PER_MODEL_BYTE * model_bytes


def _conversion_does_not_fit(problem: NTKProblem, options: TileOptions) -> str | None:
    """Why auto will not convert the model now (its conversion would exceed the host memory budget), or ``None``."""
    need, budget = conversion_bytes(problem), host_memory_budget(problem.device, options.max_memory)
    if need <= budget or _is_converted(problem):
        return None
    return (
        f"torchntk: converting the model to JAX for structured derivatives needs about {need / 1e9:.1f} GB of host "
        f"memory, more than the {budget / 1e9:.1f} GB budget (max_memory, or half the available RAM); "
        "implementation='auto' runs a torch-native method instead."
    )


def compile_terms(problem: NTKProblem) -> list[float]:
    """Terms of the compile-time model: (1, D, H) for H modules holding parameters, D of them in the structured
    program once its runs of identical blocks are rolled into loops (a run's block counted once:
    :func:`torchntk._repeated_blocks.program_holders`). Each is a parameter-consuming primitive whose cotangents the
    program carries; the program's size, known before converting."""
    count = program_holders(problem.model)
    return [1.0, float(count.distinct), float(count.holders)]


def compile_seconds(problem: NTKProblem) -> float:
    """Estimated seconds of the first structured call's tracing and XLA compilation (no persisted executable)."""
    return _predict("compile", compile_terms(problem))


def persisted_seconds(problem: NTKProblem) -> float | None:
    """Estimated seconds of conversion plus compilation when a previous process left both in the disk caches (the
    ONNX graph and the executable of this architecture and layout), else ``None``. Asks only when a torchntk cache
    directory with executables exists, so a user who never converted does not import JAX for the answer."""
    import os
    from pathlib import Path

    root = os.environ.get("TORCHNTK_CACHE_DIR") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "torchntk"
    )
    if not Path(root, "xla").is_dir():
        return None
    try:
        from torchntk.bridge.torch_glue import compile_tag
        from torchntk.converters import cache, compile_cache

        key = cache.conversion_key(problem.model, problem.x1, list(problem.params), "auto")
        if not key.certain or cache.read_entry(key.digest) is None:  # an uncertain key is converted afresh
            return None
        if not compile_cache.remembered(compile_tag(key.digest, problem.trace_axes, problem.diagonal_axes)):
            return None
    except Exception as error:  # a hint only: without it the estimate is the cold one
        logger.debug("checking the persisted caches failed (%s)", error)
        return None
    seconds = _predict("persisted", conversion_terms(problem)[:2])
    return seconds + (0.0 if "jax" in sys.modules else _FIRST_USE_SECONDS["jax"])


def _architecture_key(problem: NTKProblem) -> list:
    """What one conversion serves: the architecture's fingerprint (modules, their code and hyperparameters, hooks;
    :func:`torchntk._fingerprint.architecture`), selected parameters' shapes, per-example inputs, dtype, device."""
    return [
        architecture(problem.model, modes=False).digest,
        sorted((n, tuple(p.shape), str(p.dtype)) for n, p in problem.params.items()),
        [tuple(x.shape[1:]) for x in problem.x1],
        [tuple(x.shape[1:]) for x in problem.x2] if problem.shapes_differ else None,
        str(problem.out_dtype),
        str(problem.device),
    ]


def _digest(items: list) -> str:
    return hashlib.sha256(json.dumps(items, default=str).encode()).hexdigest()


def _architecture_digest(problem: NTKProblem) -> str:
    return _digest(_architecture_key(problem))


def _choice_key(architecture: str, problem: NTKProblem, options: TileOptions) -> str:
    batches = [problem.n1, None if problem.x2 is None else problem.n2]
    layout = [problem.trace_axes, problem.diagonal_axes, options.chunk_size, options.max_memory]
    return _digest([architecture, batches, layout])


def record_native_run(problem: NTKProblem, seconds: float) -> None:
    """Add ``seconds`` of torch-native work that auto ran instead of converting (see the module docstring)."""
    key = _architecture_digest(problem)
    _SPENT[key] = _SPENT.get(key, 0.0) + seconds


def explain_problem(problem: NTKProblem, options: TileOptions) -> Explanation:
    """Estimates and the choice of ``implementation="auto"`` for ``problem`` (cached once final)."""
    architecture = _architecture_digest(problem)
    key = _choice_key(architecture, problem, options)
    if key in _CHOICES:
        explanation = _CHOICES[key]
        logger.debug("auto picked %s (cached): %s", explanation.choice, explanation.reason)
        return explanation
    if key not in _NATIVE:
        _NATIVE[key] = tuple(torch_native_estimates(problem, options))
    estimates = [_with_first_use(e) for e in _NATIVE[key]]
    budget = memory_budget(problem, options.max_memory)
    fitting = [e for e in estimates if e.memory_bytes <= budget]
    best_native = min(fitting or estimates, key=lambda e: e.seconds)
    too_big = _conversion_does_not_fit(problem, options)  # depends on free memory: the choice is not cached
    if problem.shapes_differ:  # the conversion is at one input shape (structured derivatives refuse two)
        return _torch_native_only(problem, best_native, tuple(estimates))
    if too_big is not None:
        logger.info(too_big)
    elif fitting:
        deferred = _defer_conversion(problem, architecture, best_native, tuple(estimates))
        if deferred is not None:
            return deferred
    route = None
    failure = _FAILED.get(architecture)  # another shape of this model failed already: neither retry nor warn
    lasting = too_big is None  # whether the choice holds for every call on this architecture (not NaN weights)
    if failure is None and too_big is None:
        try:
            from torchntk.bridge.torch_glue import structured_cost

            cost = structured_cost(problem, options)
            route = cost.route
            terms = structured_terms(problem, cost.macs, cost.bytes_accessed)
            seconds = _predict("structured_derivatives", terms, time_model(problem))
            estimates.append(Estimate("structured_derivatives", cost.macs, cost.one_pair_bytes, seconds))
        except Exception as error:  # conversion or interpreter failure: fall back, and say why once per model
            failure = f"{type(error).__name__}: {str(error)[:400]}"
            lasting = not getattr(error, "depends_on_values", False)  # NaN weights: the model may convert later
            if lasting:
                _FAILED[architecture] = failure
            warn(_fallback_message(failure, best_native))
    notes = (too_big,) if too_big else () if failure is None else (_fallback_message(failure, best_native),)
    candidates = [e for e in estimates if e.memory_bytes <= budget]
    # When nothing fits, run the least hungry: its error names the memory it needs.
    choice = min(candidates, key=lambda e: e.seconds) if candidates else min(estimates, key=lambda e: e.memory_bytes)
    reason = f"{choice.implementation} has the shortest estimated time ({choice.seconds:.3f} s)"
    if not candidates:
        reason = (
            f"no method's one-pair tile fits the {budget:,}-byte memory budget; {choice.implementation} needs the "
            f"least ({int(choice.memory_bytes):,} bytes)"
        )
    elif not fitting:
        reason += f" among methods whose one-pair tile fits the {budget:,}-byte memory budget"
    reason += _unfitted_note(problem)
    explanation = Explanation(
        choice.implementation,
        tuple(estimates),
        reason,
        route,
        notes,
        time_model=time_model(problem),
        conversion_bytes=None if too_big is None else conversion_bytes(problem),
    )
    logger.debug("auto picked %s: %s; estimates %s", explanation.choice, reason, estimates)
    if lasting:
        _CHOICES[key] = explanation
    return explanation


def _torch_native_only(problem: NTKProblem, best_native: Estimate, estimates: tuple[Estimate, ...]) -> Explanation:
    """The torch-native choice for ``x1`` and ``x2`` of two per-example shapes, which structured derivatives refuse."""
    reason = (
        f"{best_native.implementation} has the shortest estimated time ({best_native.seconds:.3f} s) of the torch-"
        "native methods; structured derivatives convert the model at one input shape, and x1's and x2's examples "
        "differ in shape"
    )
    return Explanation(best_native.implementation, estimates, reason, time_model=time_model(problem))


def _fallback_message(failure: str, fallback: Estimate) -> str:
    return (
        f"torchntk: structured derivatives cannot handle this model ({failure}); implementation='auto' falls back "
        f"to {fallback.implementation}."
    )


def _is_converted(problem: NTKProblem) -> bool:
    """Whether the structured route's conversion (``torch_glue.convert``) is in memory; never imports JAX to ask."""
    if "torchntk.converters.api" not in sys.modules:  # nothing converted in this process
        return False
    from torchntk.converters import is_converted

    try:
        return is_converted(problem.model, tuple(x[:1] for x in problem.x1), params=list(problem.params))
    except Exception:  # a selection the converter refuses: converting will say so (and auto falls back)
        return False


def _defer_conversion(
    problem: NTKProblem, architecture: str, best_native: Estimate, estimates: tuple[Estimate, ...]
) -> Explanation | None:
    """The torch-native choice while the conversion has not paid for itself yet, else ``None`` (convert now)."""
    if _is_converted(problem):
        return None
    # The rental's price is everything the first structured call pays before it runs: conversion and compilation
    # (issue 14 class 9: counting only the conversion started minutes of XLA compilation on densenet161).
    conversion, compilation = conversion_seconds(problem), compile_seconds(problem)
    spent = _SPENT.get(architecture, 0.0)
    persisted = False
    if spent + best_native.seconds < conversion + compilation:
        hit = persisted_seconds(problem)  # a previous process converted and compiled it: cheap now
        if hit is not None and hit < conversion + compilation:
            conversion, compilation, persisted = hit, 0.0, True
    if spent + best_native.seconds >= conversion + compilation:
        return None
    source = "from the disk caches" if persisted else "once"
    reason = (
        f"{best_native.implementation} is estimated at {best_native.seconds:.3f} s; converting the model to JAX for "
        f"structured derivatives (about {conversion:.1f} s, plus {compilation:.1f} s of compilation, {source}) waits "
        f"until torch-native runs on this architecture have taken that long ({spent:.2f} s so far)"
    ) + _unfitted_note(problem)
    logger.debug("auto picked %s: %s", best_native.implementation, reason)
    return Explanation(
        best_native.implementation,
        estimates,
        reason,
        None,
        (),
        conversion,
        compilation,
        persisted,
        time_model(problem),
        conversion_bytes(problem),
    )
