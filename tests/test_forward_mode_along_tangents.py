"""NTK-vector products push rows of J(x2)ᵀ forward through x1: forward mode must agree with torch's backward along
those tangents, which the checks of x1's own rows cannot see where the two differ only off them (found by hostile
probing). A clipped straight-through estimator whose ``jvp`` forgot the clip: on an ``x1`` whose units are all
clipped, x1's backward rows are 0 on the first layer, and the kernel against an unclipped ``x2`` was 0.09-0.32 off
(``ntk_vp`` 0.24, ``kernel_regression``'s prediction 0.17). Each tile now checks its own tangents.
"""

from __future__ import annotations

import pytest
import torch
from _oracle import oracle_ntk
from torch import nn

import torchntk
from torchntk import UnsupportedModelError


class ClippedSTE(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.sign(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x.abs() <= 1).to(g.dtype)

    @staticmethod
    def jvp(ctx, t):
        return t  # the clip forgotten in forward mode


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(ClippedSTE.apply(self.l1(x))))


def net_and_data():
    torch.manual_seed(0)
    model = Net().double().eval()
    with torch.no_grad():
        model.l1.bias.zero_()
    clipped = 1e4 * torch.randn(3, 4, dtype=torch.float64)  # every unit clipped in the backward
    unclipped = 1e-3 * torch.randn(3, 4, dtype=torch.float64)  # none
    return model, clipped, unclipped


@pytest.mark.parametrize(
    "kwargs", [{}, {"max_memory": 2_200}, {"diagonal_axes": (0,)}], ids=["tile", "output_blocks", "paired"]
)
def test_a_forward_mode_that_differs_off_x1s_rows_is_refused(kwargs):
    model, clipped, unclipped = net_and_data()
    with pytest.raises(UnsupportedModelError, match="forward-mode derivative .* disagrees"):
        torchntk.ntk(model, clipped, unclipped, implementation="ntk_vector_products", **kwargs)


def test_where_the_tangents_agree_the_kernel_is_computed():
    model, clipped, unclipped = net_and_data()
    got = torchntk.ntk(model, unclipped, clipped, implementation="ntk_vector_products")
    torch.testing.assert_close(got, oracle_ntk(model, (unclipped,), (clipped,)), atol=1e-12, rtol=1e-10)


def test_ntk_vp_and_auto():
    model, clipped, unclipped = net_and_data()
    v = torch.randn(3, 3, dtype=torch.float64)
    with pytest.raises(UnsupportedModelError, match="forward-mode derivative"):
        torchntk.ntk_vp(model, clipped, unclipped, v)
    want = oracle_ntk(model, (clipped,), (unclipped,))
    torch.testing.assert_close(torchntk.ntk(model, clipped, unclipped), want, atol=1e-12, rtol=1e-10)
