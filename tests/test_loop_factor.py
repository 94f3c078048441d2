"""The fast tier's choice counts a loop's body once per iteration (``compile_tiers.loop_factor``): XLA's cost
analysis counts it once, and a rolled ResNet's structured program, taken for light, ran at LLVM O0 (resnet152's
body of 36 blocks: 13.4 s unrolled at O0 against 0.77 s rolled at O1)."""

import jax
import jax.numpy as jnp
import pytest
from jax import lax

from torchntk.bridge.compile_tiers import O1_FROM_FLOPS_PER_OPERATION, fast_options, loop_factor, trip_count


def _operations(lowered) -> int:
    return lowered.as_text().count("stablehlo.")


def test_straight_code_factor_is_one():
    lowered = jax.jit(lambda a: jnp.tanh(a @ a) * 2).lower(jnp.ones((8, 8)))
    assert loop_factor(lowered) == 1.0


def _scanned(length: int) -> float:
    def f(a):
        return lax.scan(lambda c, _: (jnp.sin(c) * 2 + 1, None), a, None, length=length)[0].sum()

    return loop_factor(jax.jit(f).lower(jnp.ones(4)))


def test_scan_body_counted_per_iteration():
    # one iteration: the program runs what it holds; more: the body's operations once per iteration
    assert _scanned(1) == 1.0
    assert 1.0 < _scanned(5) < _scanned(40) < _scanned(400)
    # the body's share grows toward all of it: ~(other + 40 body) / (other + body)
    assert _scanned(400) / _scanned(40) == pytest.approx(10, rel=0.1)


def test_nested_scans_and_calls_multiply():
    def g(a, length):
        return lax.scan(lambda c, _: (jnp.cos(c) + c, None), a, None, length=length)[0]

    def nested(a, outer, inner):
        return lax.scan(lambda c, _: (g(c, inner), None), a, None, length=outer)[0]

    base = loop_factor(jax.jit(lambda a: nested(a, 2, 3)).lower(jnp.ones(3)))
    deeper = loop_factor(jax.jit(lambda a: nested(a, 2, 30)).lower(jnp.ones(3)))
    wider = loop_factor(jax.jit(lambda a: nested(a, 20, 3)).lower(jnp.ones(3)))
    assert 1.0 < base < deeper and base < wider
    # a trip count comes from the loop's own condition
    assert _trip_counts(jax.jit(lambda a: nested(a, 7, 11)).lower(jnp.ones(3))) == [7, 11]


def test_uncounted_while_counts_once():
    def f(a):
        return lax.while_loop(lambda c: c.sum() < 100.0, lambda c: c * 2 + 1, a)

    assert loop_factor(jax.jit(f).lower(jnp.ones(4))) == 1.0


def test_rolled_convolutions_take_the_vectorised_level():
    """A scan of 40 small convolutions: light when counted once (O0 by XLA's flops), heavy when run (O1)."""
    images, kernels = jnp.ones((4, 16, 16, 16), jnp.float32), jnp.ones((40, 16, 16, 3, 3), jnp.float32)

    def rolled(a, ws):
        def body(c, w):
            return jnp.tanh(lax.conv_general_dilated(c, w, (1, 1), "SAME")) * 2, None

        return lax.scan(body, a, ws)[0]

    lowered = jax.jit(rolled).lower(images, kernels)
    counted_once = lowered.cost_analysis()["flops"] / _operations(lowered)
    assert counted_once < O1_FROM_FLOPS_PER_OPERATION["convolutional"]  # XLA's count alone would choose O0
    assert fast_options(lowered)["xla_backend_optimization_level"] == 1


def _trip_counts(lowered) -> list[int]:
    counts = []

    def walk(op):
        for region in op.regions:
            for block in region.blocks:
                for inner in block.operations:
                    if inner.operation.name == "stablehlo.while":
                        counts.append(trip_count(inner))
                    walk(inner)

    for function in lowered.compiler_ir("stablehlo").body.operations:
        walk(function)
    return sorted(counts)


def test_serialized_programs_count_their_loops():
    """torchntk compiles a program deserialized from its disk cache (``compile_cache.compile_persisted``), where the
    loop's bound is a constant hoisted out of its condition: the count must find it there too."""

    def f(a):
        return lax.scan(lambda c, _: (jnp.sin(c) * 2 + 1, None), a, None, length=40)[0].sum()

    a = jnp.ones(4)
    exported = jax.export.deserialize(jax.export.export(jax.jit(f))(a).serialize())
    lowered = jax.jit(exported.call).lower(a)
    assert _trip_counts(lowered) == [40]
    assert loop_factor(lowered) > 10


def test_fori_loop_counts_from_its_start():
    lowered = jax.jit(lambda a: lax.fori_loop(3, 10, lambda i, c: c * 2.0, a)).lower(jnp.ones(4))
    assert _trip_counts(lowered) == [7]
