"""Compile tiers: XLA:CPU programs of a short call compile with little or none of LLVM's optimisation (seconds less
for a program that runs once or twice; :func:`fast_options`); a long call, or a short one repeated until its runs
have paid for it, compiles the optimised program, which every later call of its shapes then uses."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import re
import time
from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Any

from torchntk._problem import NTKProblem
from torchntk._tiles import kernel_tiles

_LOG = logging.getLogger("torchntk")

#: A call of at most this many tiles compiles its programs with :func:`fast_options`; a longer
#: call compiles (once) the optimised programs and every later call uses those. ``TORCHNTK_FAST_COMPILE=0``: never.
FAST_COMPILE_MAX_TILES = 2
_SHORT_CALL: contextvars.ContextVar[bool] = contextvars.ContextVar("torchntk_short_call", default=False)


@contextlib.contextmanager
def compile_tier(problem: NTKProblem, chunk: int) -> Iterator[None]:
    """Programs compiled inside take the fast tier when this call is short (:data:`FAST_COMPILE_MAX_TILES`)."""
    short = (
        len(kernel_tiles(problem, chunk)) <= FAST_COMPILE_MAX_TILES
        and problem.device.type == "cpu"
        and os.environ.get("TORCHNTK_FAST_COMPILE", "1") != "0"
    )
    token = _SHORT_CALL.set(short)
    try:
        yield
    finally:
        _SHORT_CALL.reset(token)


#: A fast-tier program is recompiled optimised once its runs have cost this many times its compile (ski rental:
#: an optimised compile takes somewhat longer than the fast one, and its program runs faster, ~1.4x on an FCN).
UPGRADE_AFTER_COMPILES = 2.0


class FastProgram:
    """An executable of the fast tier that counts the seconds it has run (it blocks on its result: the caller waits
    for it at once anyway); ``compile_seconds`` is its compile time where known (``inf``: loaded from the persistent
    cache without a note of it: an optimised compile could take minutes, so it is never started for it)."""

    def __init__(self, compiled: Any, compile_seconds: float) -> None:
        self.compiled, self.compile_seconds, self.run_seconds = compiled, compile_seconds, 0.0

    def __call__(self, *args: Any) -> Any:
        import jax

        start = time.perf_counter()
        result = jax.block_until_ready(self.compiled(*args))
        self.run_seconds += time.perf_counter() - start
        return result

    def __getattr__(self, name: str) -> Any:  # memory_analysis, cost_analysis, out_info: the executable's
        return getattr(self.__dict__["compiled"], name)


#: LLVM's optimisation level of a short call's program where its operations are light (compile time rules: the
#: least optimisation) and where they are heavy (the run does: O1, vectorised loops). Both compile far faster than
#: the optimised tier. Measured (``benchmarks/compile_levels.py``): O1 compiles 0.3-0.8 ms more per StableHLO
#: operation than O0; the O0 program runs slower by 0.2-0.6 ns per flop where the flops are in the structured
#: contractions of convolutions (XLA's own loops: batched and small dots), but by ~0.01-0.02 ns where they are
#: GEMMs of library calls (transformers, FCNs).
FAST_LEVELS = (0, 1)
#: Flops per StableHLO operation (XLA's cost analysis of the lowered program) from which a short call compiles at
#: O1, in a program of convolutions (``benchmarks/results/compile_levels.json``: wide_resnet101_2 at N = 2, 1.1e6,
#: 26.6 s at O0 vs 23.8 s at O1; resnet18 at N = 16, 8e6: 7.9 vs 4.1 s; densenet121 at N = 2, 1.9e5: 16.7 vs 30.1 s)
#: and in another (swin_v2_b at N = 2, 5e6: 24.4 vs 43.1 s; vit_l_32 at 224×224, N = 2, 5e7: 33.3 vs 30.3 s).
O1_FROM_FLOPS_PER_OPERATION = {"convolutional": 8e5, "other": 3e7}
#: A program of convolutions has at least this share of convolutions among its operations (resnet18 2.1%,
#: densenet121 2.0%; swin_t 0.02% and vit_l_32 0.01%: a patch embedding).
CONVOLUTIONAL_FROM_SHARE = 0.005


def fast_options(lowered: Any) -> dict:
    """XLA options of a short call's program, chosen from the lowered program alone (its size, its convolutions
    and XLA's estimate of its flops), so that every process chooses the same and a second one finds the executable
    the first persisted: the LLVM level (:data:`FAST_LEVELS`, :data:`O1_FROM_FLOPS_PER_OPERATION`), and XLA's
    classic fusion emitters except at O1 without convolutions, where the MLIR ones compiled and ran faster
    (vit_l_32 at 224×224: 16.6 + 13.7 s against 25.0 + 16.7 s; convolutional programs: the classic ones, e.g.
    resnet50 at N = 8 6.0 s against 13.3 s)."""
    from torchntk.converters.compile_cache import CLASSIC_FUSION_EMITTERS

    text = lowered.as_text()
    # XLA's cost analysis counts a loop's body once; it runs once per iteration (rolled resnet152's structured
    # program: XLA's flops alone chose O0, which runs it in 12.8 s against 1.4 s at O1; results/sd_tiers.json)
    flops = xla_cost(lowered).get("flops", 0.0) * loop_factor(lowered)
    operations = max(1, text.count("stablehlo."))
    convolutions = text.count("stablehlo.convolution")
    kind = "convolutional" if convolutions >= CONVOLUTIONAL_FROM_SHARE * operations else "other"
    level = FAST_LEVELS[1] if flops / operations >= O1_FROM_FLOPS_PER_OPERATION[kind] else FAST_LEVELS[0]
    _LOG.debug("fast tier: LLVM O%d (%d operations, %s, %.3g flops each)", level, operations, kind, flops / operations)
    classic = level == FAST_LEVELS[0] or kind == "convolutional"
    return {"xla_backend_optimization_level": level, **(CLASSIC_FUSION_EMITTERS if classic else {})}


def loop_factor(lowered: Any) -> float:
    """How many times more operations the program runs than it holds, counting each loop's body once per iteration
    (its trip count, where the loop is a counted one as ``lax.scan`` and ``fori_loop`` lower; else once) and each
    function once per call: 1.0 for a program without loops."""
    module = lowered.compiler_ir("stablehlo")
    functions = {str(op.attributes["sym_name"]).strip('"'): op for op in module.body.operations}
    counted: dict[str, tuple[float, float]] = {}  # per function: (operations once, operations with iterations)

    def function(name: str) -> tuple[float, float]:
        if name not in counted:
            counted[name] = (0.0, 0.0)  # a recursive call (none in JAX's programs) counts nothing more
            counted[name] = region_operations(functions[name]) if name in functions else (0.0, 0.0)
        return counted[name]

    def region_operations(op: Any) -> tuple[float, float]:
        once = runs = 0.0
        for region in op.regions:
            for block in region.blocks:
                for inner in block.operations:
                    name = inner.operation.name
                    if name == "func.call":
                        inner_once, inner_runs = function(str(inner.attributes["callee"]).lstrip("@"))
                    else:
                        inner_once, inner_runs = region_operations(inner)
                        if name == "stablehlo.while":
                            inner_runs *= trip_count(inner)
                    once, runs = once + 1.0 + inner_once, runs + 1.0 + inner_runs
        return once, runs

    once, runs = function("main")
    return runs / once if once else 1.0


def trip_count(loop: Any) -> int:
    """The iterations of a ``stablehlo.while`` whose condition is ``counter < bound`` with the counter's start and the
    bound constants (as JAX lowers ``lax.scan`` and ``fori_loop``; a serialized program has the constants hoisted out
    of the condition); 1 where the condition is anything else."""
    from jaxlib.mlir import ir

    condition = list(loop.regions[0].blocks[0].operations)
    names = [op.operation.name for op in condition]
    if names[-2:] != ["stablehlo.compare", "stablehlo.return"] or set(names[:-2]) - {"stablehlo.constant"}:
        return 1
    compare = condition[-2]
    counter, bound = compare.operands
    if " LT," not in str(compare) or not isinstance(counter.owner, ir.Block):  # the counter: the block's argument
        return 1
    start, stop = _integer_constant(loop.operands[ir.BlockArgument(counter).arg_number]), _integer_constant(bound)
    return max(1, stop - start) if start is not None and stop is not None else 1


def _integer_constant(value: Any) -> int | None:
    """The value of a scalar integer ``stablehlo.constant``, else ``None``."""
    text = str(getattr(value.owner, "operation", value.owner)).strip()
    match = re.fullmatch(r"%\S+ = stablehlo\.constant dense<(-?\d+)> : tensor<[su]?i(?:32|64)>", text)
    return int(match.group(1)) if match else None


def xla_cost(program: Any) -> dict[str, float]:
    """XLA's cost analysis of a lowered or compiled program: its ``flops`` and ``bytes accessed`` (those it gives)."""
    cost = program.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {name: float(value) for name, value in (cost or {}).items() if name in ("flops", "bytes accessed")}


def tiered(compiled: Mapping[Hashable, Any], key: tuple) -> tuple[tuple, Any]:
    """The key (in ``compiled``, the programs compiled so far) and compiler options to use: the optimised program
    whenever one exists, the call is long, or this short call's fast program has run long enough to pay for an
    optimised compile (:data:`UPGRADE_AFTER_COMPILES`)."""
    optimised = (*key, "optimised")
    if optimised in compiled or not _SHORT_CALL.get():
        return optimised, None
    fast = compiled.get((*key, "fast"))
    if isinstance(fast, FastProgram) and fast.run_seconds >= UPGRADE_AFTER_COMPILES * fast.compile_seconds:
        return optimised, None
    return (*key, "fast"), fast_options


def tier_program(key: tuple, options: dict | Callable | None, compile: Callable[[], Any]) -> Any:
    """``compile()``, the program of ``key`` in the tier ``options`` say (:func:`tiered`). A fast-tier program comes
    back as a :class:`FastProgram` knowing its compile seconds: measured where this process compiled it, else those
    noted beside the persisted executable by the process that did (unknown: ``inf``)."""
    from torchntk.converters.compile_cache import ValidatedCache, remember, remembered_seconds

    hits, start = ValidatedCache.thread_hits(), time.perf_counter()
    compiled = compile()
    if options is None:
        return compiled
    note = f"fast-compile:{key!r}"
    seconds: float | None = time.perf_counter() - start
    if ValidatedCache.thread_hits() == hits:  # compiled here (a check compiling beside it counts apart)
        remember(note, seconds)
    else:
        seconds = remembered_seconds(note)
    return FastProgram(compiled, float("inf") if seconds is None else seconds)
