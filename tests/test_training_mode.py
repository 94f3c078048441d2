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


class _TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first, self.last = nn.Linear(3, 5), nn.Linear(5, 2)

    def forward(self, x):
        return self.last(self.double_in_training(torch.tanh(self.first(x))))


class ByAttribute(_TwoLayers):
    def double_in_training(self, h):
        return h * 2 if self.training else h


class ByHelper(_TwoLayers):
    def double_in_training(self, h):
        return _doubled_in_training(self, h)


class ByGetattr(_TwoLayers):
    def double_in_training(self, h):
        return h * 2 if getattr(self, "training") else h  # noqa: B009 - the way of reading it under test


class ByInstanceFunction(_TwoLayers):
    """The flag is read by a function that only the instance holds: the class's code never names it."""

    def double_in_training(self, h):
        return self.post(self, h)


def _by_instance_function() -> nn.Module:
    model = ByInstanceFunction()
    model.post = _doubled_in_training
    return model


MAKERS = {
    "attribute": ByAttribute,
    "helper": ByHelper,
    "getattr": ByGetattr,
    "instance function": _by_instance_function,
}


X = torch.randn(4, 3, dtype=torch.float64)


@pytest.mark.parametrize("how", list(MAKERS))
def test_training_branch_structured_refuses_others_follow_torch(how):
    model = MAKERS[how]().double().train()
    want = oracle_ntk(model, (X,), None)
    assert not torch.allclose(want, oracle_ntk(MAKERS[how]().double().eval(), (X,), None))
    for method in ("jacobian_contraction", "ntk_vector_products", "auto"):
        torch.testing.assert_close(torchntk.ntk(model, X, implementation=method), want, rtol=1e-10, atol=1e-12)
    with pytest.raises(ConversionError, match=r"training mode read their `training` flag \(\w+\).*model.eval"):
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


def test_after_eval_structured_derivatives_are_tried_again(monkeypatch):
    """auto remembered the training-flag refusal as the architecture's failure: after model.eval() it still never
    tried structured derivatives (explain kept the note)."""
    import warnings

    from torchntk import _auto

    monkeypatch.setattr(_auto, "_defer_conversion", lambda *args: None)  # auto converts now (as for a large N)
    model = ByAttribute().double().train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert any("training" in note for note in torchntk.explain(model, X).notes)
    model.eval()
    assert not any("training" in note for note in torchntk.explain(model, X).notes)
