"""Runs of identical blocks in a torch model, seen before converting it: the size of the structured program.

The direct ONNX → JAX route rolls a run of at least :data:`MIN_REPETITIONS` identical blocks (a ResNet stage, a
ViT's encoder layers) into one ``lax.scan`` (``converters/onnx_jax/_rolling.py``), so XLA compiles one block's
operations for the whole run. What the structured program holds, and what it costs to compile, therefore grows with
the distinct blocks, not with depth. :func:`program_holders` counts the parameter-holding modules the program holds
with each run counted once, from the module tree alone (no export, no JAX): an estimate for auto's compile-time model
(``_auto.compile_terms``), not a promise of what the route rolls. The route finds its runs on the exported graph and
rolls only what it can prove equal to the unrolled walk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

# Blocks a run needs to be rolled (by the route; here: to be counted once). A loop costs XLA more per operation than
# straight-line code (its body is compiled apart, buffers are copied in and out), and short runs of convolutions
# lose: resnet50's first structured call (runs of 2, 3, 5 and 2 blocks) took 17.0 s rolled against 11.7 s unrolled,
# and still 13.8 s with its run of 5 alone; convnext_small's (3, 3, 27, 3) took 14.0 s with every run rolled and
# 14.2 s with its 27 alone (18.5 s unrolled); vit_b_16's 12 layers 11.5 s (13.5 s unrolled). Since the fast tier
# counts loop iterations and loops' convolutions all take the fast layout, resnet50 with every run rolled is even
# (lower, compile and run 6.1 s vs 6.0 s).
MIN_REPETITIONS = 6
# Children a repeated block may span: a Swin stage alternates plain and shifted-window blocks, rolled in pairs.
_MAX_PERIOD = 2
_PLAIN = (bool, int, float, str, type(None))


@dataclass(frozen=True)
class ProgramHolders:
    """``holders``: parameter-holding modules of the model; ``distinct``: those a rolled program holds (a run's
    blocks counted once); ``runs``: the runs counted once."""

    holders: int
    distinct: int
    runs: int


def program_holders(model: nn.Module) -> ProgramHolders:
    """How many parameter-holding modules ``model``'s structured program holds once its runs of at least
    :data:`MIN_REPETITIONS` identical consecutive blocks (children of one module, one or two children per block)
    are rolled. Cost: one walk of the module tree."""
    signatures: dict[int, Any] = {}
    distinct, runs = _count(model, signatures)
    holders = sum(1 for m in model.modules() if _holds_parameters(m))
    return ProgramHolders(holders, distinct, runs)


def _holds_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def _signature(module: nn.Module, memo: dict[int, Any]) -> Any:
    """What makes two blocks the same computation up to their parameter values: classes, parameter and buffer
    shapes, and the plain hyperparameters of parameter-holding modules (a shifted window's shift). Attributes of
    modules without parameters are left out: stochastic depth's rate differs between blocks and is the identity in
    evaluation."""
    if id(module) not in memo:
        attributes = ()
        if _holds_parameters(module):
            attributes = tuple(
                sorted((k, _plain(v)) for k, v in vars(module).items() if not k.startswith("_") and k != "training")
            )
        memo[id(module)] = (
            type(module).__qualname__,
            tuple((n, tuple(p.shape), p.dtype) for n, p in module.named_parameters(recurse=False)),
            tuple((n, tuple(b.shape), b.dtype) for n, b in module.named_buffers(recurse=False)),
            attributes,
            tuple(_signature(child, memo) for child in module.children()),
        )
    return memo[id(module)]


def _plain(value: Any) -> Any:
    """A hashable stand-in for a hyperparameter: plain values and sequences of them as they are, others by type."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, (tuple, list)) and all(isinstance(v, _PLAIN) for v in value):
        return tuple(value)
    return type(value).__qualname__


def _count(module: nn.Module, memo: dict[int, Any]) -> tuple[int, int]:
    """(parameter holders of ``module``'s subtree with runs counted once, runs counted)."""
    children = list(module.children())
    keys = [_signature(child, memo) for child in children]
    distinct, runs = int(_holds_parameters(module)), 0
    j = 0
    while j < len(children):
        period, reps = _longest_run(keys, j)
        block = [_count(child, memo) for child in children[j : j + period]]
        held, inner = sum(b[0] for b in block), sum(b[1] for b in block)
        rolled = reps >= MIN_REPETITIONS and held > 0  # the run's later blocks add nothing
        distinct, runs = distinct + held, runs + inner + rolled
        j += period * (reps if rolled else 1)
    return distinct, runs


def _longest_run(keys: list[Any], start: int) -> tuple[int, int]:
    """(period, repetitions) of the run of identical consecutive blocks starting at ``start`` that covers the most
    children (period 1 when nothing repeats)."""
    best = (1, 1)
    for period in range(1, _MAX_PERIOD + 1):
        pattern = keys[start : start + period]
        if len(pattern) < period:
            break
        reps = 1
        while keys[start + reps * period : start + (reps + 1) * period] == pattern:
            reps += 1
        if reps >= MIN_REPETITIONS and period * reps > best[0] * best[1]:
            best = (period, reps)
    return best
