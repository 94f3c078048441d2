"""torch models with repeated blocks through structured derivatives, the blocks rolled into one ``lax.scan`` by the
onnx-jax route and kept rolled by the interpreter, against the explicit-Jacobian oracle (float64, 1e-10)."""

from __future__ import annotations

import pytest
import torch
from _oracle import oracle_ntk
from torch import nn

import torchntk
from torchntk.bridge import rolled_scans
from torchntk.converters.onnx_jax import _rolling

AXES = [((), ()), ((-1,), ()), ((), (-1,))]


class ResidualMLP(nn.Module):
    def __init__(self, blocks: int = 5, width: int = 6) -> None:
        super().__init__()
        self.stem, self.head = nn.Linear(3, width), nn.Linear(width, 3)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(blocks))

    def forward(self, x):
        h = torch.tanh(self.stem(x))
        for block in self.blocks:
            h = h + torch.tanh(block(h))
        return self.head(h)


class ConvBN(nn.Module):
    """Residual conv–BatchNorm–ReLU blocks with each block's own running statistics (trained-like)."""

    def __init__(self, blocks: int = 4, width: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, width, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
            for _ in range(blocks)
        )
        self.head = nn.Linear(width, 2)
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        h = self.stem(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h.mean((2, 3)))


class Transformer(nn.Module):
    def __init__(self, layers: int = 3, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Linear(3, width)
        layer = dict(d_model=width, nhead=2, dim_feedforward=12, dropout=0.0, batch_first=True)
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(**layer) for _ in range(layers))
        self.head = nn.Linear(width, 2)

    def forward(self, x):
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(h.mean(1))


class TiedWithinBlock(nn.Module):
    """Each block uses its weight twice (W and Wᵀ): uses of one parameter slice within an iteration."""

    def __init__(self, blocks: int = 4, width: int = 5) -> None:
        super().__init__()
        self.stem, self.head = nn.Linear(3, width), nn.Linear(width, 2)
        self.weights = nn.ParameterList(nn.Parameter(0.4 * torch.randn(width, width)) for _ in range(blocks))

    def forward(self, x):
        h = torch.tanh(self.stem(x))
        for w in self.weights:
            h = h + torch.sin(h @ w) * torch.cos(h @ w.T)
        return self.head(h)


class SharedAcrossBlocks(nn.Module):
    """One Linear applied by every block (a weight every iteration reads whole): correct whether rolled or not."""

    def __init__(self, blocks: int = 4, width: int = 5) -> None:
        super().__init__()
        self.stem, self.shared, self.head = nn.Linear(3, width), nn.Linear(width, width), nn.Linear(width, 2)
        self.scales = nn.ParameterList(nn.Parameter(torch.rand(width)) for _ in range(blocks))

    def forward(self, x):
        h = torch.tanh(self.stem(x))
        for scale in self.scales:
            h = h + torch.tanh(self.shared(h)) * scale
        return self.head(h)


def _make(name: str):
    torch.manual_seed(0)
    model = {"mlp": ResidualMLP, "conv_bn": ConvBN, "transformer": Transformer, "tied": TiedWithinBlock}.get(
        name, SharedAcrossBlocks
    )()
    shape = {"conv_bn": (2, 5, 5), "transformer": (4, 3)}.get(name, (3,))
    x1, x2 = torch.randn(3, *shape, dtype=torch.float64), torch.randn(2, *shape, dtype=torch.float64)
    return model.double().eval(), x1, x2


@pytest.fixture(autouse=True)
def _short_runs_rolled(monkeypatch):
    """These models have runs of 3 to 5 blocks: rolled here whatever the default minimum."""
    monkeypatch.setattr(_rolling, "MIN_REPETITIONS", 2)
    monkeypatch.setattr(_rolling, "ROLL_DENSE_CONVOLUTIONS", True)


@pytest.fixture
def body_uses(monkeypatch):
    """Counts the uses the interpreter met inside rolled scans."""
    seen = []
    original = rolled_scans.body_uses

    def counting(*args, **kwargs):
        seen.extend(args[1])
        return original(*args, **kwargs)

    monkeypatch.setattr(rolled_scans, "body_uses", counting)
    return seen


@pytest.mark.parametrize("trace_axes, diagonal_axes", AXES)
@pytest.mark.parametrize("name", ["mlp", "conv_bn", "transformer", "tied"])
def test_rolled_blocks_match_the_oracle(name, trace_axes, diagonal_axes, body_uses, private_cache):
    model, x1, x2 = _make(name)
    axes = dict(trace_axes=trace_axes, diagonal_axes=diagonal_axes)
    kernel = torchntk.ntk(model, x1, x2, implementation="structured_derivatives", **axes)
    expected = oracle_ntk(model, (x1,), (x2,), **axes)
    assert body_uses, "the repeated blocks were not kept rolled"
    assert ((kernel - expected).abs().max() / expected.abs().max()).item() < 1e-10


@pytest.mark.parametrize("name", ["mlp", "conv_bn", "transformer", "tied", "shared"])
def test_rolled_blocks_symmetric_and_tiled(name, private_cache):
    model, x1, _ = _make(name)
    kernel = torchntk.ntk(model, x1, implementation="structured_derivatives", chunk_size=2)
    expected = oracle_ntk(model, (x1,), None)
    assert ((kernel - expected).abs().max() / expected.abs().max()).item() < 1e-10


def test_a_weight_every_block_reads_is_computed_unrolled(body_uses, private_cache):
    model, x1, x2 = _make("shared")
    kernel = torchntk.ntk(model, x1, x2, implementation="structured_derivatives")
    expected = oracle_ntk(model, (x1,), (x2,))
    assert not body_uses  # the scan reads the shared weight whole in every iteration: unrolled
    assert ((kernel - expected).abs().max() / expected.abs().max()).item() < 1e-10


def test_rolled_and_unrolled_conversions_are_named_apart(monkeypatch, private_cache):
    """A program compiled from the rolled function is never served for the unrolled one, and back."""
    from torchntk.converters import api

    model, x1, _ = _make("mlp")
    rolled = torchntk.converters.to_jax(model, x1, route="onnx-jax").function_key
    monkeypatch.setattr(api, "ROLL_BLOCKS", False)
    torchntk.converters.clear_memory_cache()
    unrolled = torchntk.converters.to_jax(model, x1, route="onnx-jax").function_key
    assert rolled != unrolled


def test_short_runs_stay_unrolled_by_default(monkeypatch, private_cache):
    """Below MIN_REPETITIONS blocks a loop costs XLA more than it saves: 5 blocks unrolled, 8 rolled."""
    monkeypatch.setattr(_rolling, "MIN_REPETITIONS", 6)
    runs = {}
    for blocks in (5, 8):
        torch.manual_seed(0)
        model = ResidualMLP(blocks).double().eval()
        x = torch.randn(2, 3, dtype=torch.float64)
        torchntk.converters.clear_memory_cache()
        runs[blocks] = torchntk.converters.to_jax(model, x, route="onnx-jax").loops
    assert runs == {5: False, 8: True}
