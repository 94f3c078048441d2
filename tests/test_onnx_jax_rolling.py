"""onnx-jax's ``roll=True``: repeated blocks traced as ``jax.lax.scan`` give the unrolled function's values and
derivatives (float64, 1e-10), and the jaxpr shrinks where blocks repeat."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

from torchntk.converters.onnx_export import export_onnx
from torchntk.converters.onnx_jax import OnnxJaxFunction, _rolling


@pytest.fixture(autouse=True)
def _short_runs_rolled(monkeypatch):
    """These graphs have runs of 2 to 6 blocks: rolled here whatever the default minimum (6)."""
    monkeypatch.setattr(_rolling, "MIN_REPETITIONS", 2)
    monkeypatch.setattr(_rolling, "ROLL_DENSE_CONVOLUTIONS", True)


RTOL = 1e-10


def _graph_inputs(model: nn.Module, x: torch.Tensor) -> tuple[OnnxJaxFunction, OnnxJaxFunction, list[np.ndarray]]:
    """The unrolled and rolled functions of ``model``'s graph (every parameter a graph input) and its inputs."""
    names = [n for n, _ in model.named_parameters()]
    proto = export_onnx(model, x, names)
    params = dict(model.named_parameters())
    args = [params[n].detach().numpy() for n in names] + [x[:1].detach().numpy()]
    return OnnxJaxFunction(proto), OnnxJaxFunction(proto, roll=True), args


def _eqns(fn, args) -> tuple[int, int]:
    """(top-level equations, scan equations) of ``fn``'s jaxpr."""
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    return len(jaxpr.eqns), sum(e.primitive.name == "scan" for e in jaxpr.eqns)


def _close(a, b) -> None:
    a, b = np.asarray(a), np.asarray(b)
    scale = max(float(np.abs(b).max()), 1e-300)
    assert a.shape == b.shape
    assert float(np.abs(a - b).max()) <= RTOL * scale, float(np.abs(a - b).max()) / scale


def _check_same(unrolled: OnnxJaxFunction, rolled: OnnxJaxFunction, args) -> None:
    """Outputs, a JVP along a random direction of every graph input and the gradient of a random projection."""
    rng = np.random.default_rng(0)
    primals = [jnp.asarray(a) for a in args]
    tangents = [jnp.asarray(rng.standard_normal(a.shape)) for a in args]
    out_u, jvp_u = jax.jvp(lambda *a: unrolled(*a)[0], primals, tangents)
    out_r, jvp_r = jax.jvp(lambda *a: rolled(*a)[0], primals, tangents)
    _close(out_r, out_u)
    _close(jvp_r, jvp_u)
    projection = jnp.asarray(rng.standard_normal(out_u.shape))
    argnums = tuple(range(len(primals)))
    grads_u = jax.grad(lambda *a: jnp.vdot(projection, unrolled(*a)[0]), argnums)(*primals)
    grads_r = jax.grad(lambda *a: jnp.vdot(projection, rolled(*a)[0]), argnums)(*primals)
    for gr, gu in zip(grads_r, grads_u, strict=True):
        _close(gr, gu)


def _check_rolled(model: nn.Module, x: torch.Tensor, *, scans: int | None = 1) -> list[tuple[int, int, int]]:
    """Rolled == unrolled; ``scans`` runs found (None: any number, e.g. none) and the jaxpr smaller where any."""
    model = model.double().eval()
    unrolled, rolled, args = _graph_inputs(model, x.double())
    with jax.enable_x64(True):
        _check_same(unrolled, rolled, args)
        runs = rolled.rolled_runs(*args)
        (n_u, s_u), (n_r, s_r) = _eqns(unrolled, args), _eqns(rolled, args)
    assert s_u == 0 and s_r == len(runs)
    if scans is not None:
        assert len(runs) == scans, runs
    if runs:
        assert n_r < n_u, (n_r, n_u)
    return runs


class _Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + torch.tanh(self.lin(h))


class _Mlp(nn.Module):
    def __init__(self, width: int = 8, depth: int = 6) -> None:
        super().__init__()
        self.stem, self.head = nn.Linear(4, width), nn.Linear(width, 3)
        self.blocks = nn.Sequential(*[_Residual(width) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def test_residual_mlp_rolls_six_blocks() -> None:
    torch.manual_seed(0)
    runs = _check_rolled(_Mlp(), torch.randn(2, 4))
    assert [(period, reps) for _, period, reps in runs] == [(1, 6)]


class _Basic(nn.Module):
    """ResNet's basic block: conv-bn-relu-conv-bn, plus the input, relu."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.relu(h + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(h))))))


class _ResNet(nn.Module):
    def __init__(self, width: int = 8, depth: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.blocks = nn.Sequential(*[_Basic(width) for _ in range(depth)])
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def test_resnet_like_cnn_rolls_its_basic_blocks() -> None:
    torch.manual_seed(0)
    runs = _check_rolled(_ResNet(), torch.randn(2, 3, 8, 8))
    assert [reps for _, _, reps in runs] == [4]  # period 2 where the final relu is a segment of its own


def test_dense_convolution_blocks_roll_unless_switched_off(monkeypatch) -> None:
    """A run of blocks holding dense convolutions rolls by default (the fast tier counts a loop's iterations since:
    tests/test_loop_factor.py); ``ROLL_DENSE_CONVOLUTIONS = False`` leaves it unrolled."""
    monkeypatch.undo()  # the module's defaults
    monkeypatch.setattr(_rolling, "MIN_REPETITIONS", 2)
    for dense_rolled, runs in ((True, [4]), (False, [])):
        if not dense_rolled:
            monkeypatch.setattr(_rolling, "ROLL_DENSE_CONVOLUTIONS", False)
        torch.manual_seed(0)  # a new function: its roll plan is made once
        unrolled, rolled, args = _graph_inputs(_ResNet().double().eval(), torch.randn(2, 3, 8, 8).double())
        with jax.enable_x64(True):
            assert [reps for _, _, reps in rolled.rolled_runs(*args)] == runs


def test_resnet_like_cnn_with_trained_statistics() -> None:
    """Running statistics differing between blocks are constants read as BatchNormalization's data: stacked."""
    torch.manual_seed(0)
    model = _ResNet()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
    runs = _check_rolled(model, torch.randn(2, 3, 8, 8))
    assert [reps for _, _, reps in runs] == [4]


def test_resnet18_rolls_its_first_stage() -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    runs = _check_rolled(model, torch.randn(2, 3, 16, 16))
    assert [reps for _, _, reps in runs] == [2]


class _Vit(nn.Module):
    """Patch embedding, a learned position embedding, ``depth`` torch encoder layers, mean pooling, a head."""

    def __init__(self, depth: int = 4, width: int = 16) -> None:
        super().__init__()
        self.patches = nn.Conv2d(3, width, 4, stride=4)
        self.position = nn.Parameter(torch.randn(1, 4, width) * 0.1)
        layer = dict(d_model=width, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.layers = nn.ModuleList([nn.TransformerEncoderLayer(**layer) for _ in range(depth)])
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patches(x).flatten(2).transpose(1, 2) + self.position
        for layer in self.layers:
            h = layer(h)
        return self.head(h.mean(1))


def test_vit_like_transformer_rolls_its_layers() -> None:
    torch.manual_seed(0)
    runs = _check_rolled(_Vit(), torch.randn(2, 3, 8, 8))
    # post-norm layers: 4 segments each (attention + add, norm, MLP + add, norm)
    assert [(period, reps) for _, period, reps in runs] == [(4, 4)]


class _SharedWeight(nn.Module):
    """One Linear applied four times with a residual: its weight is closed over, not stacked."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem, self.shared, self.head = nn.Linear(4, width), nn.Linear(width, width), nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for _ in range(4):
            h = h + torch.tanh(self.shared(h))
        return self.head(h)


def test_blocks_sharing_one_weight() -> None:
    torch.manual_seed(0)
    runs = _check_rolled(_SharedWeight(), torch.randn(2, 4))
    assert [(period, reps) for _, period, reps in runs] == [(1, 4)]


class _ScaledBlocks(nn.Module):
    """Blocks that differ in a Python float only: ``h + c_k * tanh(lin_k(h))``."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem, self.head = nn.Linear(4, width), nn.Linear(width, 3)
        self.lins = nn.ModuleList([nn.Linear(width, width) for _ in range(4)])
        self.scales = (0.5, 0.25, 1.0 / 3.0, 0.7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for lin, c in zip(self.lins, self.scales, strict=True):
            h = h + c * torch.tanh(lin(h))
        return self.head(h)


def test_blocks_differing_in_a_constant() -> None:
    """The factors c_k are constants read by a Mul: stacked like the parameters."""
    torch.manual_seed(0)
    runs = _check_rolled(_ScaledBlocks(), torch.randn(2, 4))
    assert [(period, reps) for _, period, reps in runs] == [(1, 4)]


class _ReadsStem(nn.Module):
    """Every block reads the stem's output besides its carry: ``h = h + lin_k(h) * x0``."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem, self.head = nn.Linear(4, width), nn.Linear(width, 3)
        self.lins = nn.ModuleList([nn.Linear(width, width) for _ in range(4)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = torch.tanh(self.stem(x))
        h = x0
        for lin in self.lins:
            h = h + lin(h) * x0
        return self.head(h)


def test_blocks_reading_a_value_from_before_the_run() -> None:
    torch.manual_seed(0)
    runs = _check_rolled(_ReadsStem(), torch.randn(2, 4), scans=None)
    assert runs and runs[0][2] >= 3, runs  # the first block reads x0 as its carry too: it may stay unrolled
