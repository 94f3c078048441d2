"""``torchntk.ntk(..., implementation="structured_derivatives")``: from an ``nn.Module`` to a ``torch.Tensor``.

The model is converted once per architecture (:func:`torchntk.converters.to_jax`), the structured NTK function is
compiled once per conversion, kernel layout and tile shape, and tensors cross torch ↔ JAX by DLPack (zero-copy
where the devices match). float64 runs inside ``jax.enable_x64(True)`` so the rest of the user's process keeps
JAX's default.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, TypeVar

import torch
from torch import Tensor

from torchntk._code_reading import modes_a_conversion_misses
from torchntk._lru import LRUCache
from torchntk._problem import NTKProblem
from torchntk._tiles import (
    TileOptions,
    kernel_tiles,
    memory_budget,
    slice_inputs,
    tile_bytes,
    tiled_kernel,
)
from torchntk.bridge.compile_tiers import compile_tier, tier_program, tiered, xla_cost
from torchntk.bridge.device import (
    jax_platform_for,
    jax_scope,
    jax_x64_enabled,
    make_room,
    refuse_wide_integers,
    retry_smaller_on_oom,
    returning_lent_tensors,
    to_jax_array,
    to_torch,
)
from torchntk.bridge.memory_plan import (
    BlockChoice,
    block_steps,
    blocks_match,
    bytes_per_example,
    choose_blocks,
    minimum_rows_for,
    target_rows,
)
from torchntk.bridge.nonfinite import refuse_nan
from torchntk.converters.check import narrowed_integers_hint

T = TypeVar("T")

#: How many compiled structured programs a process keeps (a call needs a few: tile shapes, tiers, fit_to_memory's
#: candidates); each holds its executable's machine code in memory maps, which a process has a limited number of.
KEPT_PROGRAMS = 32

# Compiled structured NTK functions, keyed by (function key, trace axes, diagonal axes, argument signature, tier).
_COMPILED: LRUCache[Any] = LRUCache(KEPT_PROGRAMS)


@contextlib.contextmanager
def _in_eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """``model`` in eval mode inside, every module's training flag restored afterwards: ``prepare`` already refused
    training mode where it changes the function (BatchNorm, Dropout); nn.Module starts in training mode, so a plain
    MLP would otherwise never reach this route. A module in training mode whose code reads the flag (``if
    self.training: ...``) is refused (a ``ConversionError``: auto computes torch-native instead): its eval-mode
    function, the one converted, may be another (a kernel 60% off was returned)."""
    from torchntk.converters import TrainingFlagError

    misses = modes_a_conversion_misses(model)
    if misses:
        raise TrainingFlagError(
            f"modules in training mode read their `training` flag ({', '.join(misses[:3])}"
            f"{', ...' if len(misses) > 3 else ''}): structured derivatives convert the eval-mode function, which may "
            "differ from the one torch runs now. Call model.eval() if that is the function you want, or use "
            "implementation='jacobian_contraction' or 'ntk_vector_products' (they run the model as it is)."
        )
    modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        yield
    finally:
        for module, training in modes.items():
            module.training = training


@contextlib.contextmanager
def converted_while_checking(problem: NTKProblem) -> Iterator[Any]:
    """The model converted (:func:`torchntk.converters.to_jax_while_checking`) in eval mode: the conversion's check
    against torch finishes while the body compiles the first tile's programs, and on exit raises if it failed (a
    :class:`~torchntk.converters.RouteFellBack` when another route's conversion passed instead: convert again).
    Compile in the body, run after it."""
    from torchntk.bridge.reuse_check import comparison_batch
    from torchntk.converters import to_jax_while_checking

    inputs = tuple(x[:1] for x in problem.x1)
    names, batch = list(problem.params), comparison_batch(problem)  # the call's comparison's program, ahead
    with _in_eval_mode(problem.model):
        with to_jax_while_checking(
            problem.model, inputs, params=names, copy_params=False, check_batch=batch
        ) as converted:
            yield converted


def refuse_two_shapes(problem: NTKProblem) -> None:
    """``ValueError`` for ``x1`` and ``x2`` of two per-example shapes: the model is converted, checked and compiled
    at one input shape (its ONNX graph has static shapes)."""
    if problem.shapes_differ:
        shapes = [(tuple(a.shape[1:]), tuple(b.shape[1:])) for a, b in zip(problem.x1, problem.x2, strict=True)]
        raise ValueError(
            f"x1's and x2's examples differ in shape ({', '.join(f'{a} and {b}' for a, b in shapes)}); structured "
            "derivatives convert the model at one input shape. Use implementation='jacobian_contraction' or "
            "'ntk_vector_products' (auto picks them), or pad both batches to one shape."
        )


def convert(problem: NTKProblem) -> Any:
    """The model converted by :func:`torchntk.converters.to_jax` (the check in line; routes tried in turn), in eval
    mode."""
    from torchntk.converters import to_jax

    with _in_eval_mode(problem.model):
        return to_jax(problem.model, tuple(x[:1] for x in problem.x1), params=list(problem.params), copy_params=False)


#: Memory the converted side of the check holds while it runs, per byte of the selected weights: the direction
#: (torch's, its numpy view, JAX's copy) and the JVP program's buffers. Beside a compile it adds to the tile's.
CHECK_BYTES_PER_WEIGHT_BYTE = 4


def check_fits_beside(problem: NTKProblem, tile_bytes_predicted: float, max_memory: int | None) -> bool:
    """Whether the conversion's check may run beside the first tile's compile: its memory
    (:data:`CHECK_BYTES_PER_WEIGHT_BYTE` × the selected weights) and the tile's predicted memory fit the budget
    together. Else it runs first, as before (vit_l_32 at 224×224, 306M weights, was killed at a 12 GB cap with both
    at once)."""
    weights = sum(v.numel() * v.element_size() for v in problem.params.values())
    return CHECK_BYTES_PER_WEIGHT_BYTE * weights + tile_bytes_predicted <= memory_budget(problem, max_memory)


def compiled_first_tile(
    problem: NTKProblem, first_tile: Callable[[Any], T], tile_bytes_predicted: float, max_memory: int | None
) -> tuple[Any, T]:
    """``(converted, first_tile(converted))``: the model converted and ``first_tile`` (which compiles the first
    tile's programs, and runs nothing) called while the conversion's check runs beside it
    (:func:`converted_while_checking`; a deep model's first call saves most of the check's seconds) where
    :func:`check_fits_beside` allows, else after it. Where the check refused the conversion and another route's
    passed, ``first_tile`` is called again with that one (from the memory cache)."""
    from torchntk.converters import RouteFellBack

    if check_fits_beside(problem, tile_bytes_predicted, max_memory):
        try:
            with converted_while_checking(problem) as converted:
                return converted, first_tile(converted)
        except RouteFellBack:
            pass
    converted = convert(problem)
    return converted, first_tile(converted)


def _signature(args: Any) -> tuple:
    """What a program compiled for ``args`` depends on besides its function: the arguments' shapes, dtypes and
    placements, and the matmul precision it is traced under (baked into its products: TF32 or not on a GPU)."""
    import jax

    leaves = jax.tree_util.tree_leaves(args)
    precision = str(jax.config.jax_default_matmul_precision)
    return (precision, *((tuple(leaf.shape), str(leaf.dtype), str(leaf.sharding)) for leaf in leaves))


def _model_fn(problem: NTKProblem, converted: Any) -> Callable[[Any, Any], Any]:
    """``f(params, inputs)`` of a batch: the converted per-example function vmapped over the examples."""
    import jax

    fn = converted.fn

    def batched(params: dict[str, Any], inputs: tuple[Any, ...]) -> Any:
        return jax.vmap(lambda *example: fn(params, *example))(*inputs)

    return batched


def compiled_ntk_fn(problem: NTKProblem, converted: Any, args: tuple[Any, Any, Any], rows: int | None = None) -> Any:
    """The structured NTK function of ``converted`` compiled for ``args = (inputs1, inputs2, params)``
    (``inputs2=None``: the symmetric kernel of ``inputs1``), holding at most ``rows`` output cotangent rows per
    example at once (``None``: all)."""

    from torchntk.bridge import structured_ntk_fn
    from torchntk.converters.compile_cache import compile_persisted, remember

    # Keyed by the converted function itself: two models under one uncertain conversion key (an attribute the
    # fingerprint cannot see into) were served one program, the first model's, for both.
    rows = None if rows is None or rows >= problem.out_size else rows
    symmetric = args[1] is None  # x2=None: the kernel of inputs1 with itself, from its upper triangle
    layout = (problem.trace_axes, problem.diagonal_axes)
    key, options = tiered(_COMPILED, (converted.function_key, *layout, _signature(args), rows, symmetric))
    compiled = _COMPILED.get(key)
    if compiled is None:
        ntk_fn = structured_ntk_fn(
            _model_fn(problem, converted),
            trace_axes=problem.trace_axes,
            diagonal_axes=problem.diagonal_axes,
            vmap_axes=0,
            output_block=rows,
        )
        ntk_fn = _fast_convolutions(problem, converted, ntk_fn, blocked=rows is not None)
        # The stored program's name must determine the function (the conversion key did not, under an uncertain
        # fingerprint: another model's serialized program came back); the hint for estimates stays per conversion.
        # The output block is part of the program (not of its arguments): blocked and unblocked programs of one
        # model and shapes compute the same kernel with different memory, and must not be served for each other.
        program = f"{compile_tag(converted.function_key, problem.trace_axes, problem.diagonal_axes)}:rows={rows}"
        # a second process neither traces nor compiles
        compiled = tier_program(key, options, lambda: compile_persisted(program, ntk_fn, args, options))
        _COMPILED[key] = compiled
        remember(compile_tag(converted.key, problem.trace_axes, problem.diagonal_axes))
    return compiled


def _fast_convolutions(problem: NTKProblem, converted: Any, program: Callable, blocked: bool = False) -> Callable:
    """``program`` with its convolutions in the form XLA:CPU runs fast
    (:func:`torchntk.converters.loop_convolutions.fast_convolutions`, the derivatives' transposed convolutions
    included): those in its loops — ``converted``'s rolled blocks, and the output-block loop where ``blocked`` — in
    the fast layout (resnet18 at 32×32, O = 100 traced, N = 4, blocks of 50 rows: 4.19 → 1.35 s), and on a CPU every
    convolution of a few output pixels as a matrix product of its patches (resnet18's last stages: O = 100 traced,
    N = 2, at 64×64 7.9 → 2.1 s, at 32×32 1.44 → 0.89 s) and every depthwise one as a sum over its taps. A GPU's
    convolutions need neither."""
    from torchntk.converters.loop_convolutions import fast_convolutions

    cpu_forms = jax_platform_for(problem.device) == "cpu"  # where JAX runs it: a GPU model may run on the host
    return fast_convolutions(program, cpu_forms=cpu_forms) if converted.loops or blocked or cpu_forms else program


def compile_tag(conversion_key: str, trace_axes: tuple[int, ...], diagonal_axes: tuple[int, ...]) -> str:
    """What names one compiled structured program in the persistent cache's hints (tile shapes aside)."""
    return f"structured:{conversion_key}:{list(trace_axes)}:{list(diagonal_axes)}"


def _parts(problem: NTKProblem, converted: Any) -> tuple[Callable, Callable]:
    from torchntk.bridge.structured import structured_ntk_parts

    return structured_ntk_parts(
        _model_fn(problem, converted), trace_axes=problem.trace_axes, diagonal_axes=problem.diagonal_axes
    )


def compiled_ingredients(problem: NTKProblem, converted: Any, inputs: tuple[Any, ...], params: Any) -> Any:
    """Unblocked structured derivatives, step 1, compiled for a chunk of examples: ``run(inputs, params) ->
    Ingredients`` (every output's cotangents and the sub-arrays, per example)."""

    layout = (problem.trace_axes, problem.diagonal_axes)
    key, options = tiered(_COMPILED, (converted.function_key, *layout, "ingredients", _signature((inputs, params))))
    compiled = _COMPILED.get(key)
    if compiled is None:
        tag = compile_tag(converted.key, problem.trace_axes, problem.diagonal_axes)
        program = _fast_convolutions(problem, converted, _parts(problem, converted)[0])
        compiled = _compile(tag, program, (inputs, params), options)
        _COMPILED[key] = compiled
    return compiled


def compiled_contraction(problem: NTKProblem, converted: Any, side1: Any, side2: Any) -> Any:
    """Step 2, compiled for two chunks' ingredients: ``run(ingredients1, ingredients2) -> kernel tile``
    (``ingredients2=None``: a chunk with itself, from its upper triangle of example blocks)."""
    import jax

    key = (converted.function_key, problem.trace_axes, problem.diagonal_axes, "contract", _signature((side1, side2)))
    key, options = tiered(_COMPILED, (*key, jax.tree.structure((side1, side2))))
    compiled = _COMPILED.get(key)
    if compiled is None:
        tag = compile_tag(converted.key, problem.trace_axes, problem.diagonal_axes)
        compiled = _compile(tag, _parts(problem, converted)[1], (side1, side2), options)
        _COMPILED[key] = compiled
    return compiled


def _compile(tag: str, fn: Callable, args: tuple, options: Any = None) -> Any:
    """``fn`` compiled for ``args``, the executable from (and to) the persistent compilation cache.

    Unlike :func:`compiled_ntk_fn`'s program, these are traced in every process: their arguments or results are the
    ingredients' pytree, which ``jax.export`` cannot serialize; tracing them is the cheap part.
    """
    import jax

    from torchntk.converters.compile_cache import compile_lowered, persistent_compilation, remember

    with persistent_compilation():
        compiled = compile_lowered(jax.jit(fn).lower(*args), options)
    remember(tag)
    return compiled


class StructuredCost(NamedTuple):
    """XLA's cost analysis of structured derivatives, scaled from the first tile to the whole kernel."""

    macs: float  # multiply-adds
    bytes_accessed: float  # bytes read and written by the compiled kernel function
    one_pair_bytes: float  # intermediates of a one-example-pair tile (the memory the method needs at least)
    route: str  # the converter route that produced the JAX function


@returning_lent_tensors  # the first tile's arrays (compiled for, not run): forgotten, not kept alive
def structured_cost(problem: NTKProblem, options: TileOptions) -> StructuredCost:
    """XLA's estimate for the whole kernel (see :class:`StructuredCost`).

    Converts and compiles the first tile, fitted to the memory budget by XLA's own plan (:func:`fit_to_memory`;
    all cached, so a run that follows reuses them). ``one_pair_bytes`` is then that tile's memory, beyond the
    budget when even the smallest tile is.
    """
    refuse_two_shapes(problem)
    least = minimum_rows_for(problem)
    one_pair = tile_bytes(problem, bytes_per_example(problem, least), 1)
    try:
        choice = choose_blocks(problem, options)
    except ValueError:  # does not fit: the run will say so; the cost of one pair is still worth knowing
        choice = None
    with jax_scope(problem) as target, compile_tier(problem, choice.chunk if choice else 1):

        def first_tile(converted: Any) -> tuple[BlockChoice, list[tuple[Any, float]], float]:
            if choice is None:
                fewest = BlockChoice(1, least, 0.0)
                return fewest, tile_programs(problem, converted, fewest, target), one_pair
            try:
                fitted, programs = fit_to_memory(problem, converted, choice, options, target)
            except TileTooLarge as error:  # auto leaves structured derivatives out; its estimate says why
                return error.choice, error.programs, error.need
            return fitted, programs, fitted.xla_bytes

        predicted = one_pair if choice is None else tile_bytes(problem, choice.per_example, choice.chunk)
        converted, (choice, programs, one_pair) = compiled_first_tile(
            problem, first_tile, predicted, options.max_memory
        )
        costs = [(xla_cost(program), share) for program, share in programs]  # XLA counts a loop's body once: × steps
    c1, c2 = min(choice.chunk, problem.n1), min(choice.chunk, problem.n2)
    pairs_per_tile = c1 if problem.paired else c1 * c2
    tiles = (problem.n1 if problem.paired else problem.n1 * problem.n2) / pairs_per_tile
    return StructuredCost(
        sum(cost.get("flops", 0.0) * share for cost, share in costs) / 2 * tiles,
        sum(cost.get("bytes accessed", 0.0) * share for cost, share in costs) * tiles,
        one_pair,
        converted.route,
    )


def tile_programs(problem: NTKProblem, converted: Any, choice: BlockChoice, target: Any) -> list[tuple[Any, float]]:
    """The compiled programs of a first tile under ``choice`` (cached: the call that follows runs them), each with
    the tile's number of runs of it: output-blocked, one program whose block loop runs :func:`block_steps` times;
    unblocked, each side's ingredients (``x1``'s once per row of tiles) and their contraction."""
    import jax

    c1, c2 = min(choice.chunk, problem.n1), min(choice.chunk, problem.n2)
    x2 = problem.x1 if problem.x2 is None else problem.x2
    args = (
        tuple(to_jax_array(x, target) for x in slice_inputs(problem.x1, slice(0, c1))),
        tuple(to_jax_array(x, target) for x in slice_inputs(x2, slice(0, c2))),
        {name: to_jax_array(value, target) for name, value in problem.params.items()},
    )
    if fused(problem, choice):
        # the program of the tile that runs: x2=None's only tile is the symmetric one (its second side None)
        if problem.x2 is None and _one_tile(problem, choice):
            args = (args[0], None, args[2])
        runs = block_steps(problem, choice) if choice.rows < problem.out_size else 1
        return [(compiled_ntk_fn(problem, converted, args, choice.rows), runs)]
    sides = [compiled_ingredients(problem, converted, inputs, args[2]) for inputs in args[:2]]
    # the ingredients' shapes on the target device: the run's arrays then find this same program (keyed by sharding);
    # from the compiled programs, not traced again (tracing a deep model's ingredients takes seconds)
    on_target = jax.sharding.SingleDeviceSharding(target)
    shapes = [
        jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=on_target), side.out_info)
        for side in sides
    ]
    contraction = compiled_contraction(problem, converted, *shapes)
    share = 1.0 if problem.paired else c2 / problem.n2  # rows of tiles / tiles
    return [(sides[0], share), (sides[1], 1.0), (contraction, 1.0)]


def fused(problem: NTKProblem, choice: BlockChoice) -> bool:
    """Whether each tile runs the whole structured program (:func:`compiled_ntk_fn`) rather than per-chunk
    ingredients and their contraction: with output blocks (the ingredients are recomputed block by block), and when
    one tile covers the kernel (nothing to reuse across tiles). The whole program is the one a second process loads
    without tracing (``compile_cache.compile_persisted``): tracing a ResNet's ingredients takes seconds."""
    return choice.rows < problem.out_size or _one_tile(problem, choice)


def _one_tile(problem: NTKProblem, choice: BlockChoice) -> bool:
    return len(kernel_tiles(problem, choice.chunk)) == 1


def tile_memory(programs: list[tuple[Any, float]]) -> float:
    """XLA's own plan of one tile's memory (its buffer assignment: temporaries and outputs, the parameters aside):
    the blocked program's, or the larger of both sides' ingredients with one side's temporaries and the
    contraction with both sides' ingredients as arguments. 0 where the backend does not say."""
    stats = [_memory_analysis(program) for program, _ in programs]
    if any(s is None for s in stats):
        return 0.0
    if len(stats) == 1:
        return float(stats[0].temp_size_in_bytes + stats[0].output_size_in_bytes)
    side1, side2, contraction = stats
    held = side1.output_size_in_bytes + side2.output_size_in_bytes
    computing = held + max(side1.temp_size_in_bytes, side2.temp_size_in_bytes)
    contracting = held + contraction.temp_size_in_bytes + contraction.output_size_in_bytes
    return float(max(computing, contracting))


# XLA's buffer plan of each compiled program, asked once: memory_analysis() takes ~6 ms, a tenth of a small call.
_MEMORY_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _memory_analysis(program: Any) -> Any:
    try:
        return _MEMORY_PLANS[program]
    except (KeyError, TypeError):  # TypeError: a test's stand-in that cannot be weakly referenced
        stats = getattr(program, "memory_analysis", lambda: None)()
        with contextlib.suppress(TypeError):
            _MEMORY_PLANS[program] = stats
        return stats


class TileTooLarge(ValueError):
    """Even the smallest tile exceeds the memory budget by XLA's plan (``need`` bytes for ``choice``, whose
    compiled ``programs`` are those of :func:`tile_programs`)."""

    def __init__(self, message: str, choice: BlockChoice, need: float, programs: list[tuple[Any, float]]) -> None:
        super().__init__(message)
        self.choice, self.need, self.programs = choice, need, programs


def fit_to_memory(
    problem: NTKProblem, converted: Any, choice: BlockChoice, options: TileOptions, target: Any
) -> tuple[BlockChoice, list[tuple[Any, float]]]:
    """``choice`` (sized by :func:`bytes_per_example`'s model) checked against XLA's plan of its first tile, and
    shrunk — fewer examples per tile, then fewer output rows per block, in proportion — until that fits the budget.
    Returns the fitted choice and its compiled programs (:func:`tile_programs`).

    The model counts intermediates of the forward's size; a contraction may also hold per-row weight gradients
    (rows × |θ| per example where opt_einsum contracts a convolution's cotangents with its patches first), which
    only the compiled program knows: regnet_x_32gf's tile of 2 examples × 10 rows (32×32), planned at 0.9 GB, needs
    9.8 GB by XLA's plan (a grouped convolution's sub-arrays and the contraction's temporaries).
    Each step compiles the new tile's programs (kept for the call). Raises :class:`TileTooLarge` (a clear
    ``ValueError``) when one example and the fewest rows still exceed the budget.
    """
    budget = memory_budget(problem, options.max_memory)
    least = minimum_rows_for(problem)
    # Blocks that meet only their match give up rows first (down to target_rows): fewer rows cost less than more tiles.
    rows_first = target_rows(problem) if blocks_match(problem) else None

    def fewer_rows(floor: int, scale: float) -> BlockChoice:
        rows = max(floor, min(choice.rows - 1, int(choice.rows * scale)))
        return BlockChoice(choice.chunk, rows, bytes_per_example(problem, rows))

    while True:
        programs = tile_programs(problem, converted, choice, target)
        need = tile_memory(programs)
        if need <= budget:
            return choice._replace(xla_bytes=need), programs
        scale = budget / need
        if rows_first is not None and choice.rows > rows_first:
            choice = fewer_rows(rows_first, scale)
        elif choice.chunk > 1 and options.chunk_size is None:
            choice = choice._replace(chunk=max(1, min(choice.chunk - 1, int(choice.chunk * scale))))
        elif choice.rows > least:
            choice = fewer_rows(least, scale)
        else:
            raise TileTooLarge(
                f"max_memory={budget:,} bytes is too small for even one tile of structured derivatives: XLA's "
                f"plan for {choice.chunk} example(s) per side and {choice.rows} output row(s) per block needs "
                f"{int(need):,} bytes; raise max_memory to at least that, select fewer parameters (params=...), "
                "trace output axes (trace_axes=(-1,)), or use implementation='auto' to pick a method that fits.",
                choice,
                need,
                programs,
            )


def _disagreement(problem: NTKProblem, converted: Any, target: Any) -> str | None:
    """What of the conversion disagrees with torch on the examples of the call, or ``None``
    (:mod:`torchntk.bridge.reuse_check`: a cache key missed a change, or the route erred)."""
    from torchntk.bridge.reuse_check import disagreement

    return disagreement(problem, _model_fn(problem, converted), converted.function_key, target)


class ChunkFeatures(NamedTuple):
    """What a tile needs of a chunk of examples: its JAX inputs and, unblocked, its structured ingredients."""

    inputs: tuple[Any, ...]
    ingredients: Any


@returning_lent_tensors  # XLA's workers let go of torch's tensors before the call returns
def structured_derivatives(
    problem: NTKProblem, options: TileOptions | None = None, *, output_block: int | None = None
) -> Tensor:
    """The NTK by structured derivatives (paper §3.4) through JAX. ``-> Tensor[kernel_shape]`` (see ``torchntk.ntk``).

    Tiles of examples and blocks of output cotangent rows are sized to ``options.max_memory``
    (:func:`choose_blocks`; ``output_block`` forces the rows per block), then checked against XLA's plan of the
    compiled tile (:func:`fit_to_memory`: shrunk, or a ``ValueError`` before any tile runs). Raises
    :class:`torchntk.converters.ConversionError` when the model cannot be converted.
    """
    from torchntk import converters

    refuse_two_shapes(problem)
    options = options or TileOptions()
    choice = choose_blocks(problem, options, output_block)  # before converting: a budget too small fails at once
    make_room(problem, options, choice.per_example)
    with jax_scope(problem) as target, compile_tier(problem, choice.chunk):

        def first_tile(converted: Any) -> BlockChoice:  # compiled before the first tile runs (fitted to memory)
            if output_block is None:
                return fit_to_memory(problem, converted, choice, options, target)[0]
            tile_programs(problem, converted, choice, target)
            return choice

        for x in problem.x1 + (problem.x2 or ()):  # before converting (a dataset's columns: as they are read)
            if isinstance(x, Tensor):
                refuse_wide_integers(x)
        predicted = tile_bytes(problem, choice.per_example, choice.chunk)
        converted, choice = compiled_first_tile(problem, first_tile, predicted, options.max_memory)
        if _disagreement(problem, converted, target) is not None:
            converters.forget(converted)  # a cache served the model as it was (or the route erred): afresh
            converted, choice = compiled_first_tile(problem, first_tile, predicted, options.max_memory)
            if (what := _disagreement(problem, converted, target)) is not None:
                dtypes = [str(x.dtype).removeprefix("torch.") for x in problem.x1]
                raise converters.ConversionError(
                    f"The converted function's {what} disagree with torch's on some examples of this call, although "
                    "they agree on the first: an op whose value or derivative at a special point (a zero, a tie, a "
                    "repeated index) or whose backward hook the conversion does not follow."
                    f"{narrowed_integers_hint(dtypes, jax_x64_enabled())} Use "
                    "implementation='jacobian_contraction' or 'ntk_vector_products' (auto falls back to them)."
                )
        params = {name: to_jax_array(value, target) for name, value in problem.params.items()}

        def inputs_of(chunk: tuple[Tensor, ...]) -> tuple[Any, ...]:
            return tuple(to_jax_array(x, target) for x in chunk)

        def tile(inputs1: tuple[Any, ...], inputs2: tuple[Any, ...] | None, sides: tuple | None = None) -> Tensor:
            """One tile: from both chunks' cached ingredients when given, else by the whole structured program
            (``inputs2=None``: ``inputs1`` with itself, symmetric)."""
            if sides is not None:
                return to_torch(compiled_contraction(problem, converted, *sides)(*sides), problem.device)
            run: Callable = compiled_ntk_fn(problem, converted, (inputs1, inputs2, params), choice.rows)
            return to_torch(run(inputs1, inputs2, params), problem.device)

        whole_program = fused(problem, choice)

        def features(chunk: tuple[Tensor, ...]) -> ChunkFeatures:
            inputs = inputs_of(chunk)
            if whole_program:
                return ChunkFeatures(inputs, None)
            # a chunk's ingredients once, reused along its row of tiles (and on a diagonal tile of x2=None)
            return ChunkFeatures(inputs, compiled_ingredients(problem, converted, inputs, params)(inputs, params))

        def block(f1: ChunkFeatures, f2: ChunkFeatures, paired: bool) -> Tensor:
            def compute(inputs1: tuple[Any, ...], inputs2: tuple[Any, ...]) -> Tensor:
                whole = inputs1 is f1.inputs and inputs2 is f2.inputs
                # a diagonal tile of x2=None (the same features twice): its symmetric contraction
                if whole and not whole_program:
                    return tile(inputs1, inputs2, (f1.ingredients, None if f2 is f1 else f2.ingredients))
                return tile(inputs1, None if whole and f2 is f1 else inputs2)

            # A tile out of device memory is retried once in halves, by the whole program on the halves' inputs.
            kernel = retry_smaller_on_oom(
                compute, f1.inputs, f2.inputs, paired, device=problem.device, max_memory=options.max_memory
            )
            return refuse_nan(kernel.to(problem.out_dtype))

        return tiled_kernel(
            problem,
            features,
            features,
            block,
            options=dataclasses.replace(options, chunk_size=choice.chunk, chunk_from_memory=options.chunk_size is None),
            bytes_per_example=choice.per_example,
            work=problem.n1 * problem.n2 * problem.out_size**2 * problem.num_params / 100,
            desc="NTK (structured derivatives)",
            tag="structured_derivatives",
        )
