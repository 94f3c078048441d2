"""Models in training mode: every method computes the function torch runs now, or refuses clearly.

Structured derivatives convert the eval-mode function. A module in training mode whose code reads its flag
(``if self.training: ...``, also in a helper function it calls) may compute another function there: structured
derivatives returned the eval-mode kernel for it, 60% off, and auto with it once converted (hostile probing).
Now they refuse (a ConversionError: auto computes torch-native instead). And a forward refused for writing into
its buffers (running statistics) leaves the model as it was: the probe runs on copies of the buffers.
"""

from __future__ import annotations

import pytest
import torch
from _oracle import oracle_ntk
from torch import nn

import torchntk
from torchntk.converters import ConversionError


def _doubled_in_training(module: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return h * 2 if module.training else h


class Branching(nn.Module):
    def __init__(self, through_helper: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first, self.last = nn.Linear(3, 5), nn.Linear(5, 2)
        self.through_helper = through_helper

    def forward(self, x):
        h = torch.tanh(self.first(x))
        if self.through_helper:
            h = _doubled_in_training(self, h)
        elif self.training:
            h = h * 2
        return self.last(h)


X = torch.randn(4, 3, dtype=torch.float64)


@pytest.mark.parametrize("through_helper", [False, True])
def test_training_branch_structured_refuses_others_follow_torch(through_helper):
    model = Branching(through_helper).double().train()
    want = oracle_ntk(model, (X,), None)
    assert not torch.allclose(want, oracle_ntk(Branching(through_helper).double().eval(), (X,), None))
    for method in ("jacobian_contraction", "ntk_vector_products", "auto"):
        torch.testing.assert_close(torchntk.ntk(model, X, implementation=method), want, rtol=1e-10, atol=1e-12)
    with pytest.raises(ConversionError, match=r"training mode read their `training` flag \(Branching\).*model.eval"):
        torchntk.ntk(model, X, implementation="structured_derivatives")
    assert model.training  # its mode is left as it was
    model.eval()
    got = torchntk.ntk(model, X, implementation="structured_derivatives")
    torch.testing.assert_close(got, oracle_ntk(model, (X,), None), rtol=1e-10, atol=1e-12)


def test_plain_layers_in_training_mode_still_convert():
    """nn.Module starts in training mode: layers whose code never reads the flag are converted as before."""
    model = nn.Sequential(nn.Linear(3, 5), nn.GELU(), nn.LayerNorm(5), nn.Linear(5, 2)).double()
    assert model.training
    got = torchntk.ntk(model, X, implementation="structured_derivatives")
    torch.testing.assert_close(got, oracle_ntk(model, (X,), None), rtol=1e-10, atol=1e-12)
    assert all(m.training for m in model.modules())


def test_refused_running_statistics_leave_the_model_unchanged():
    model = nn.Sequential(
        nn.Conv1d(2, 3, 3), nn.InstanceNorm1d(3, affine=True, track_running_stats=True), nn.Flatten(), nn.Linear(12, 2)
    ).double()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    x = torch.randn(3, 2, 6, dtype=torch.float64)
    for method in ("jacobian_contraction", "structured_derivatives", "auto"):
        with pytest.raises(ValueError, match="writes into its own state"):
            torchntk.ntk(model, x, implementation=method)
        for name, value in model.state_dict().items():
            assert torch.equal(value, before[name]), name
