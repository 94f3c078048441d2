"""The forward-pass multiply-add counter behind auto's estimates, against FlopCounterMode and hand counts."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
import torchvision
from _zoo import ZOO, make
from torch.utils.flop_counter import FlopCounterMode

from torchntk._macs import forward_macs


def flop_counter_macs(model, *inputs) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*inputs)
    return counter.get_total_flops() / 2


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_matches_flop_counter(name):
    model, inputs, _ = make(name, torch.float32)
    assert forward_macs(model, *inputs) == flop_counter_macs(model, *inputs)


@pytest.mark.parametrize("factory", [torchvision.models.resnet18, torchvision.models.mobilenet_v2])
def test_torchvision_cnns_match_flop_counter(factory):
    model, x = factory(num_classes=10).eval(), torch.randn(1, 3, 32, 32)
    assert forward_macs(model, x) == flop_counter_macs(model, x)


def test_transposed_convolution():
    model, x = torch.nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), torch.randn(1, 4, 8, 8)
    assert forward_macs(model, x) == 4 * 8 * 8 * 3 * 3 * 3  # each input entry: out_channels/groups × kernel


def test_functional_contractions_by_hand():
    x, w = torch.randn(2, 5, 8), torch.randn(8, 8)

    def forward(x):
        q = x @ w  # 2·5·8 outputs × 8
        scores = torch.einsum("bik,bjk->bij", q, x)  # 2·5·5·8
        mixed = torch.tensordot(scores, x, dims=([2], [1]))  # (2, 5, 2, 8) outputs × 5
        attended = F.scaled_dot_product_attention(q, x, x)  # Q·Kᵀ 2·5·5·8, weights·V 2·5·5·8
        return mixed.sum(-2) + attended

    assert forward_macs(forward, x) == 640 + 400 + 800 + 800


def test_multi_head_attention_is_counted():
    """FlopCounterMode sees nothing of nn.MultiheadAttention's fused eval path; the counter does."""
    attention = torch.nn.MultiheadAttention(16, 2, batch_first=True).eval()
    x = torch.randn(1, 7, 16)
    projections = 4 * 7 * 16 * 16
    scores_and_mix = 2 * 7 * 7 * 16
    assert forward_macs(lambda t: attention(t, t, t)[0], x) == projections + scores_and_mix


def test_counting_imports_no_dynamo():
    """FlopCounterMode's first use imports torch._dynamo (about a second); the counter must not."""
    script = (
        "import sys, torch\n"
        "from torchntk._macs import forward_macs\n"
        "forward_macs(torch.nn.Linear(3, 2), torch.randn(1, 3))\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"
