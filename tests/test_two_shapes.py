"""x1 and x2 whose examples differ in shape (token sequences of two lengths, images of two sizes into a pooled
model): Θ(x1, x2) = J(x1) J(x2)ᵀ is defined whenever both give one output shape. The torch-native methods compute
it, against the float64 explicit-Jacobian oracle; structured derivatives convert at one input shape and refuse,
before converting; auto picks a torch-native method; other output shapes per batch are refused by name.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _oracle import oracle_ntk
from torch import nn

import torchntk

NATIVE = ("jacobian_contraction", "ntk_vector_products", "auto")


class MeanPooledTokens(nn.Module):
    """Token ids and a float mask -> a masked mean of embedded tokens -> 3 outputs: any sequence length."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(13, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.embed(ids)) * mask[..., None]
        return self.head(h.sum(1) / mask.sum(1, keepdim=True))


def tokens(n: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, length, dtype=torch.float64)
    mask[0, length - 2 :] = 0  # a padded example in each batch
    return torch.randint(0, 13, (n, length), generator=g), mask


def pooled_conv() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).double()


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((torch.as_tensor(got) - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("implementation", NATIVE)
@pytest.mark.parametrize(
    "trace_axes, diagonal_axes", [((), ()), ((-1,), ()), ((), (-1,))], ids=["full", "traced", "diagonal"]
)
def test_sequences_of_two_lengths_match_the_oracle(implementation, trace_axes, diagonal_axes):
    torch.manual_seed(0)
    model = MeanPooledTokens().double()
    x1, x2 = tokens(3, 5, 1), tokens(4, 8, 2)
    want = oracle_ntk(model, x1, x2, trace_axes=trace_axes, diagonal_axes=diagonal_axes)
    got = torchntk.ntk(model, x1, x2, implementation=implementation, trace_axes=trace_axes, diagonal_axes=diagonal_axes)
    assert got.shape == want.shape
    assert relative(got, want) < 1e-12
    # not the kernel of equal shapes: the second batch's own examples count (a test that can fail)
    same = oracle_ntk(model, x1, (x2[0][:, :5], x2[1][:, :5]), trace_axes=trace_axes, diagonal_axes=diagonal_axes)
    assert relative(same, want) > 1e-3


@pytest.mark.parametrize("implementation", ("jacobian_contraction", "ntk_vector_products"))
def test_images_of_two_sizes_in_tiles_and_paired(implementation):
    model = pooled_conv()
    a = torch.randn(5, 2, 6, 6, dtype=torch.float64)
    b = torch.randn(5, 2, 9, 7, dtype=torch.float64)
    want = oracle_ntk(model, (a,), (b,))
    got = torchntk.ntk(model, a, b, implementation=implementation, chunk_size=2)
    assert relative(got, want) < 1e-12
    paired = torchntk.ntk(model, a, b, implementation=implementation, diagonal_axes=(0,))
    assert relative(paired, oracle_ntk(model, (a,), (b,), diagonal_axes=(0,))) < 1e-12


def test_structured_derivatives_refuse_two_shapes_before_converting(monkeypatch):
    from torchntk.bridge import torch_glue

    def never(*args, **kwargs):
        raise AssertionError("converted although the shapes differ")

    monkeypatch.setattr(torch_glue, "convert", never)
    model = pooled_conv()
    a, b = torch.randn(2, 2, 6, 6, dtype=torch.float64), torch.randn(2, 2, 9, 7, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"differ in shape \(\(2, 6, 6\) and \(2, 9, 7\)\).*jacobian_contraction"):
        torchntk.ntk(model, a, b, implementation="structured_derivatives")


def test_auto_explains_its_torch_native_choice():
    model = pooled_conv()
    a, b = torch.randn(2, 2, 6, 6, dtype=torch.float64), torch.randn(2, 2, 9, 7, dtype=torch.float64)
    explanation = torchntk.explain(model, a, b)
    assert explanation.choice in ("jacobian_contraction", "ntk_vector_products")
    assert "differ in shape" in explanation.reason
    assert {e.implementation for e in explanation.estimates} <= {"jacobian_contraction", "ntk_vector_products"}
    # the same model at one shape is a separate choice (the cache of choices keys on both shapes)
    same = torchntk.explain(model, a, a[:1])
    assert "differ in shape" not in same.reason


def test_outputs_of_two_shapes_are_refused_by_name():
    model = nn.Conv2d(2, 3, 3).double()
    a, b = torch.randn(2, 2, 6, 6, dtype=torch.float64), torch.randn(2, 2, 9, 7, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"outputs of shape \(3, 4, 4\) but x2's .* give \(3, 7, 5\)"):
        torchntk.ntk(model, a, b, implementation="jacobian_contraction")


def test_inputs_of_two_ranks_are_refused():
    model = pooled_conv()
    with pytest.raises(ValueError, match="differ in rank"):
        torchntk.ntk(model, torch.randn(2, 2, 6, 6, dtype=torch.float64), torch.randn(2, 2, 6, dtype=torch.float64))


def test_each_batch_is_probed_on_its_own():
    """A model whose examples couple only at the second batch's length is refused (the probe forwards each batch)."""

    class CoupledWhenLong(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(1, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            pooled = x.mean(1, keepdim=True)
            if x.shape[1] > 4:
                pooled = pooled - pooled.mean(0)  # batch statistics
            return self.head(pooled)

    model = CoupledWhenLong().double()
    with pytest.raises(ValueError, match="coupled"):
        torchntk.ntk(model, torch.randn(3, 3, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64))


def test_ntk_vp_and_kernel_regression_over_two_lengths():
    torch.manual_seed(0)
    model = MeanPooledTokens().double()
    train, test = tokens(4, 8, 3), tokens(3, 5, 4)
    theta_tt = oracle_ntk(model, test, train)  # [3, 4, 3, 3]
    v = torch.randn(2, 4, 3, dtype=torch.float64)
    got = torchntk.ntk_vp(model, test, train, v)
    assert relative(got, torch.einsum("ijab,kjb->kia", theta_tt, v)) < 1e-12
    y = torch.randn(4, 3, dtype=torch.float64)
    theta_train = oracle_ntk(model, train, None).permute(0, 2, 1, 3).reshape(12, 12)
    alpha = torch.linalg.solve(theta_train + 1e-3 * torch.eye(12, dtype=torch.float64), y.reshape(12))
    want = (theta_tt.permute(0, 2, 1, 3).reshape(9, 12) @ alpha).reshape(3, 3)
    pred = torchntk.kernel_regression(model, train, y, test, ridge=1e-3, method="dense")
    assert relative(pred, want) < 1e-8


def test_a_store_keeps_both_shapes(tmp_path):
    model = pooled_conv()
    a, b = torch.randn(3, 2, 6, 6, dtype=torch.float64), torch.randn(2, 2, 9, 7, dtype=torch.float64)
    path = tmp_path / "k.npy"
    written = torchntk.ntk(model, a, b, implementation="jacobian_contraction", chunk_size=2, out=path)
    assert relative(np.asarray(written), oracle_ntk(model, (a,), (b,))) < 1e-12
    other = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="inputs differ"):
        torchntk.ntk(model, a, other, implementation="jacobian_contraction", chunk_size=2, out=path)


def test_a_model_failing_on_one_batch_names_it():
    model = nn.Linear(4, 2).double()
    x_ok, x_bad = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"runs on x2's examples .*\(4,\).* but fails on x1's \(\[\(5,\)\]\)"):
        torchntk.ntk(model, x_bad, x_ok)
    with pytest.raises(ValueError, match=r"runs on x1's examples .* but fails on x2's"):
        torchntk.ntk(model, x_ok, x_bad)


def test_the_second_shapes_forward_is_watched_too():
    """Found in a second probing round: only x1's first forward was watched for ops whose backward is not the
    forward's derivative; a scale_grad_by_freq lookup on x2's path only was refused by the torch.func check, naming
    torch.func. Each shape's first forward is watched now: NTK-vector products refuse it by name, Jacobian
    contraction computes it."""

    class FrequencyScaledWhenLong(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.plain = nn.Embedding(13, 4)
            self.scaled = nn.Embedding(13, 4, scale_grad_by_freq=True)
            self.head = nn.Linear(4, 2)

        def forward(self, ids):
            table = self.scaled if ids.shape[1] > 5 else self.plain
            return self.head(torch.tanh(table(ids)).mean(1))

    torch.manual_seed(0)
    model = FrequencyScaledWhenLong().double()
    short, long = torch.randint(0, 13, (2, 4)), torch.randint(0, 5, (3, 8))  # repeated ids in the long ones
    with pytest.raises(torchntk.UnsupportedModelError, match="scale_grad_by_freq"):
        torchntk.ntk(model, short, long, implementation="ntk_vector_products")
    got = torchntk.ntk(model, short, long, implementation="jacobian_contraction")
    assert relative(got, oracle_ntk(model, (short,), (long,))) < 1e-12
