"""The module-tree count of a structured program's distinct blocks (``_repeated_blocks.program_holders``) against
what the onnx-jax route rolls, and its rule on hand-made trees."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_structured_rolled import ResidualMLP
from torch import nn

import torchntk
from torchntk import _repeated_blocks
from torchntk._repeated_blocks import MIN_REPETITIONS, program_holders
from torchntk.converters.onnx_jax import _rolling


class Shifted(nn.Module):
    """A module with a plain hyperparameter beside its parameter (a Swin attention's window shift)."""

    def __init__(self, shift: int) -> None:
        super().__init__()
        self.weight, self.shift = nn.Parameter(torch.randn(4, 4)), shift

    def forward(self, x):
        return torch.roll(x @ self.weight, self.shift, dims=-1)


def test_the_route_rolls_what_the_count_counts_once(private_cache):
    """Below MIN_REPETITIONS blocks neither the route nor the count rolls; at it, both do (one run: stem, one block,
    head)."""
    for blocks in (MIN_REPETITIONS - 1, MIN_REPETITIONS, MIN_REPETITIONS + 3):
        torch.manual_seed(0)
        model = ResidualMLP(blocks).double().eval()
        torchntk.converters.clear_memory_cache()
        loops = torchntk.converters.to_jax(model, torch.randn(2, 3, dtype=torch.float64), route="onnx-jax").loops
        count = program_holders(model)
        assert count.holders == blocks + 2
        assert (count.runs == 1) == loops == (blocks >= MIN_REPETITIONS), blocks
        assert count.distinct == (3 if loops else blocks + 2)


def test_loops_are_stored_with_the_checked_graph(private_cache, monkeypatch):
    """Whether the route's function runs loops is learned once, by walking the graph, and stored with the disk entry
    for the route that passed its check; a later process (memory cache cleared) reads it instead of walking again,
    and an entry claiming loops for a route it never checked is no entry."""
    from torchntk.converters import api, cache

    x = torch.randn(2, 3, dtype=torch.float64)
    walks = []
    real = api._has_loops
    monkeypatch.setattr(api, "_has_loops", lambda g, x64: walks.append(1) or real(g, x64))
    for blocks, rolled in ((MIN_REPETITIONS, True), (MIN_REPETITIONS - 1, False)):
        torch.manual_seed(0)
        model = ResidualMLP(blocks).double().eval()
        walks.clear()
        first = torchntk.converters.to_jax(model, x, route="onnx-jax")
        assert first.loops is rolled and len(walks) == 1
        entry = cache.read_entry(first.key)
        assert entry.derivative_checked == ("onnx-jax",) and entry.looped == (("onnx-jax",) if rolled else ())
        for memory in (True, False):  # the memory cache, then the disk entry
            if not memory:
                torchntk.converters.clear_memory_cache()
            again = torchntk.converters.to_jax(model, x, route="onnx-jax")
            assert again.loops is rolled and len(walks) == 1
            assert ("disk_cache" in again.timings) is not memory and "export" not in again.timings
            assert torch.allclose(torch.as_tensor(np.asarray(again.fn(again.params, x[0].numpy()))), model(x[:1])[0])
    with pytest.raises(ValueError, match="among the checked"):
        cache.write_entry(first.key, entry.onnx_bytes, (), ("onnx-jax",))
    path = cache.entry_path(first.key)
    path.write_bytes(path.read_bytes().replace(b'"looped": []', b'"looped": ["onnx-tf"]', 1))
    assert cache.read_entry(first.key) is None  # a looped route that was never checked: refused, rebuilt


def test_the_threshold_is_the_routes():
    assert _rolling.MIN_REPETITIONS is _repeated_blocks.MIN_REPETITIONS


def test_blocks_alternating_a_hyperparameter_repeat_in_pairs():
    """Plain-then-shifted blocks repeat with a period of two: 12 of them are one run of 6 pairs; 10 are 5 pairs, too
    few. Blocks whose parameters differ in shape are no run."""
    twelve = nn.Sequential(*(Shifted(k % 2) for k in range(12)))
    assert program_holders(twelve) == _repeated_blocks.ProgramHolders(12, 2, 1)
    ten = nn.Sequential(*(Shifted(k % 2) for k in range(10)))
    assert program_holders(ten) == _repeated_blocks.ProgramHolders(10, 10, 0)
    shapes = nn.Sequential(*(nn.Linear(4 + k, 4 + k) for k in range(8)))  # every block its own shape
    assert program_holders(shapes).distinct == 8


def test_parameterless_attributes_do_not_split_runs():
    """Stochastic depth's rate differs between blocks (and is the identity in evaluation): blocks stay equal."""
    pytest.importorskip("torchvision")
    from torchvision.ops import StochasticDepth

    blocks = nn.Sequential(*(nn.Sequential(nn.Linear(4, 4), StochasticDepth(0.1 * k, "row")) for k in range(8)))
    assert program_holders(blocks) == _repeated_blocks.ProgramHolders(8, 1, 1)


@pytest.mark.parametrize(
    ("name", "holders", "distinct"),
    # resnet152's stages of 8 and 36 bottlenecks roll (one block each), its stages of 3 do not; vit_b_16 keeps one of
    # its 12 encoder layers (6 holders) beside the patch embedding, class token, position embedding, final norm, head
    [("resnet18", 41, 41), ("resnet152", 311, 71), ("vit_b_16", 77, 11)],
)
def test_torchvision_counts(name, holders, distinct):
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.get_model(name, weights=None, num_classes=10)
    count = program_holders(model)
    assert (count.holders, count.distinct) == (holders, distinct)
