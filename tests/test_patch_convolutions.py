"""Small convolutions as matrix products of their patches: the same values and derivatives, applied where it should
be (small outputs, few taps, ungrouped), and structured derivatives through it against the explicit-Jacobian oracle."""

from __future__ import annotations

import itertools
import math

import jax
import numpy as np
import pytest
import torch
from _oracle import oracle_ntk
from jax import lax
from torch import nn

import torchntk
from torchntk._problem import prepare
from torchntk._tiles import TileOptions
from torchntk.bridge.torch_glue import structured_derivatives
from torchntk.converters.loop_convolutions import fast_convolutions
from torchntk.converters.patch_convolutions import (
    MAX_POSITIONS,
    depthwise_convolution,
    faster_form,
    is_depthwise,
    is_small,
    patch_convolution,
)


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def _normal(seed, shape):
    return np.random.default_rng(seed).standard_normal(shape)


LAYOUTS = [("NCHW", "OIHW", "NCHW"), ("NCHW", "HWIO", "NHWC"), ("NCH", "OIH", "NCH")]


# (feature groups, outputs per group): ungrouped (patches), depthwise, depthwise with a channel multiplier
GROUPINGS = [(1, 5), (4, 1), (4, 2)]


@pytest.mark.parametrize("grouping", GROUPINGS, ids=lambda g: f"groups{g[0]}x{g[1]}")
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda dn: "-".join(dn))
def test_faster_forms_equal_the_convolution(layout, grouping):
    """Every stride, padding (negative too), input and filter dilation and layout: the patches' product (ungrouped)
    and the sum over taps (depthwise) equal ``conv_general_dilated`` to float64 rounding, output shape included."""
    groups, per_group = grouping
    form = patch_convolution if groups == 1 else depthwise_convolution
    spatial = len(layout[0]) - 2
    compared = 0
    for stride, pad, lhs_dil, rhs_dil, k, size in itertools.product(
        [1, 2], [(0, 2), (-1, 1)], [1, 2], [1, 2], [1, 3], [2, 5]
    ):
        lhs_shape = tuple({"N": 3, "C": 4}.get(d, size + i) for i, d in enumerate(layout[0]))
        rhs_shape = tuple({"O": groups * per_group, "I": 4 // groups}.get(d, k) for d in layout[1])
        x, w = _normal(0, lhs_shape), _normal(1, rhs_shape)

        def conv(x, w, stride=stride, pad=pad, lhs_dil=lhs_dil, rhs_dil=rhs_dil):
            n = spatial
            return lax.conv_general_dilated(
                x,
                w,
                (stride,) * n,
                [pad] * n,
                (lhs_dil,) * n,
                (rhs_dil,) * n,
                dimension_numbers=layout,
                feature_group_count=groups,
            )

        try:
            want = conv(x, w)
        except (TypeError, ValueError):  # a window larger than the padded input
            continue
        if want.size == 0:
            continue
        (eqn,) = [e for e in jax.make_jaxpr(conv)(x, w).jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
        got = form(x, w, **eqn.params)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        compared += 1
    assert compared > 30


def _net(x, w1, w2, w3, depthwise):
    """Convolutions down to a 2x2, then 1x1 map (NCHW, strided, padded): a ResNet's last stages in small, and a
    depthwise 3x3 convolution between them (a ConvNeXt's)."""
    dn = ("NCHW", "OIHW", "NCHW")
    h = jax.nn.relu(lax.conv_general_dilated(x, w1, (2, 2), [(1, 1), (1, 1)], dimension_numbers=dn))
    h = lax.conv_general_dilated(h, depthwise, (1, 1), [(1, 1), (1, 1)], dimension_numbers=dn, feature_group_count=6)
    h = jax.nn.relu(lax.conv_general_dilated(h, w2, (1, 1), [(1, 1), (1, 1)], dimension_numbers=dn))
    h = lax.conv_general_dilated(h, w3, (2, 2), [(1, 1), (1, 1)], dimension_numbers=dn)
    return (h**2).sum()


def _net_args():
    weights = _normal(3, (6, 3, 3, 3)), _normal(4, (6, 6, 3, 3)), _normal(5, (4, 6, 3, 3)), _normal(6, (6, 1, 3, 3))
    return _normal(2, (2, 3, 4, 4)), *weights


def _convolutions(fun, *args):
    """``(params, lhs shape, rhs shape)`` of every convolution in ``fun``'s jaxpr, sub-jaxprs included."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                found.append((eqn.params, eqn.invars[0].aval.shape, eqn.invars[1].aval.shape))
            for sub in jax.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fun)(*args).jaxpr)
    return found


def test_derivatives_through_faster_forms_are_unchanged():
    """Gradient and JVP of a small network, rewritten after differentiation, equal the originals; the small and
    depthwise convolutions (forward and transposed) are gone, the rest kept."""
    args = _net_args()
    grads = jax.grad(_net, argnums=(0, 1, 2, 3, 4))
    rewritten = fast_convolutions(grads, cpu_forms=True)
    for got, want in zip(rewritten(*args), grads(*args), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    tangents = tuple(_normal(9 + i, a.shape) for i, a in enumerate(args))

    def jvp(*a):
        return jax.jvp(_net, a, tangents)

    for got, want in zip(fast_convolutions(jvp, cpu_forms=True)(*args), jvp(*args), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    before = _convolutions(grads, *args)
    after = _convolutions(rewritten, *args)
    assert any(is_small(*c) for c in before) and any(is_depthwise(*c) for c in before)  # the case exercises both
    assert not any(faster_form(*c) for c in after)
    assert len(after) == sum(faster_form(*c) is None for c in before)  # weight gradients (batch groups too) kept
    assert any(c[0]["batch_group_count"] > 1 for c in after)
    # without the option nothing outside a loop changes
    assert len(_convolutions(fast_convolutions(grads), *args)) == len(before)


def test_which_convolutions_are_small():
    """Small: few output positions and few filter taps, ungrouped; a weight gradient's window (the whole feature
    map) or a grouped convolution is not. Depthwise: one input channel per group, few taps, no batch groups."""
    dn = lax.ConvDimensionNumbers((0, 1, 2, 3), (0, 1, 2, 3), (0, 1, 2, 3))
    params = {
        "window_strides": (1, 1),
        "padding": ((1, 1), (1, 1)),
        "lhs_dilation": (1, 1),
        "rhs_dilation": (1, 1),
        "dimension_numbers": dn,
        "feature_group_count": 1,
        "batch_group_count": 1,
    }
    side = math.isqrt(MAX_POSITIONS)
    assert is_small(params, (8, 512, side, side), (512, 512, 3, 3))
    assert not is_small(params, (8, 512, side + 1, side), (512, 512, 3, 3))
    no_pad = params | {"padding": ((0, 0), (0, 0))}
    assert not is_small(no_pad, (64, 8, 56, 56), (64, 8, 54, 54))  # a weight gradient: 3x3 out, 54x54 taps
    assert not is_small(params | {"feature_group_count": 2}, (8, 512, 2, 2), (512, 256, 3, 3))
    assert not is_small(no_pad, (8, 4, 2, 2), (4, 4, 3, 3))  # no output at all
    depthwise = params | {"feature_group_count": 96}
    assert is_depthwise(depthwise, (8, 96, 56, 56), (96, 1, 7, 7))  # depthwise at any size
    assert is_depthwise(depthwise, (8, 96, 56, 56), (192, 1, 7, 7))  # with a channel multiplier
    assert not is_depthwise(params | {"feature_group_count": 32}, (8, 128, 4, 4), (128, 4, 3, 3))  # 4 per group
    assert not is_depthwise(
        depthwise | {"batch_group_count": 2, "feature_group_count": 1}, (8, 96, 4, 4), (96, 1, 3, 3)
    )
    assert not is_depthwise(depthwise, (8, 96, 4, 4), (96, 1, 9, 9))  # 81 taps


class _SmallMaps(nn.Module):
    """Feature maps of 2x2 and 1x1 pixels (strided, padded, depthwise, a residual and a 1x1 projection)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 6, 3, stride=2, padding=1)
        self.project = nn.Conv2d(8, 6, 1, stride=2)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        h = torch.tanh(self.depthwise(torch.tanh(self.stem(x))))
        h = torch.tanh(self.conv(h) + h)
        return self.head((torch.tanh(self.down(h)) + self.project(h)).flatten(1))


@pytest.mark.parametrize(("trace_axes", "rows"), [((), None), ((-1,), None), ((), 2), ((-1,), 1)])
def test_structured_derivatives_through_patches_match_the_oracle(trace_axes, rows):
    """Structured derivatives of a model whose maps are 2x2 and 1x1 (rewritten into patches on the CPU), unblocked
    and in output blocks of ``rows``, in tiles of 2 examples: the explicit-Jacobian oracle's kernel in float64."""
    torch.manual_seed(0)
    model = _SmallMaps().double()
    x1, x2 = torch.randn(3, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    for second in (x2, None):
        problem = prepare(model, x1, second, params=None, trace_axes=trace_axes, diagonal_axes=())
        got = structured_derivatives(problem, TileOptions(chunk_size=2), output_block=rows)
        want = oracle_ntk(model, (x1,), None if second is None else (second,), trace_axes=trace_axes)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    whole = torchntk.ntk(model, x1, x2, implementation="structured_derivatives", trace_axes=trace_axes, progress=False)
    torch.testing.assert_close(whole, oracle_ntk(model, (x1,), (x2,), trace_axes=trace_axes), rtol=1e-10, atol=1e-10)


def test_structured_programs_on_the_cpu_take_the_patches():
    """The structured program torchntk compiles for a CPU model has no small convolution left (its ingredients'
    jaxpr before the rewrite has some: the case exercises it)."""
    from torchntk.bridge import torch_glue
    from torchntk.bridge.device import to_jax_array

    torch.manual_seed(0)
    model = _SmallMaps().double()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    problem = prepare(model, x, None, params=None, trace_axes=(), diagonal_axes=())
    converted = torch_glue.convert(problem)
    ingredients, _ = torch_glue._parts(problem, converted)
    args = ((to_jax_array(x, None),), {n: to_jax_array(p, None) for n, p in problem.params.items()})
    before = _convolutions(ingredients, *args)
    after = _convolutions(torch_glue._fast_convolutions(problem, converted, ingredients), *args)
    assert any(is_small(*c) for c in before) and any(is_depthwise(*c) for c in before)
    assert not any(faster_form(*c) for c in after)
