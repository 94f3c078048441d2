"""Small models covering what a user's nn.Module may hold (shared by the tests of every NTK path)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ResidualBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 2, 3, padding=1)
        self.conv2 = nn.Conv2d(2, 2, 3, padding=1, bias=False)
        self.head = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = x + self.conv2(torch.relu(self.conv1(x)))
        return self.head(torch.relu(h).flatten(1))


class TiedAutoencoder(nn.Module):
    """The decoder reuses the encoder's weight (transposed), a layer is registered twice, and two layers share a
    Parameter object."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(4, 3)
        self.mid = nn.Linear(3, 3)
        self.mid_again = self.mid
        self.shared = nn.Linear(3, 3, bias=False)
        self.shared.weight = self.mid.weight

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.enc(x))
        h = self.mid_again(torch.tanh(self.mid(h)))
        return torch.tanh(self.shared(h)) @ self.enc.weight


class WithBuffers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.register_buffer("scale", torch.tensor([0.5, -1.5, 2.0]))
        self.register_buffer("shift", torch.tensor([1.0, 0.0, -1.0]))

    def forward(self, x: Tensor) -> Tensor:
        return torch.sin(self.lin(x)) * self.scale + self.shift


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(2, 3)

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        return torch.tanh(self.a(x)) * self.b(z)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.GELU(), nn.Linear(6, 3))


def cnn_bn() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(3 * 2 * 2, 3),
    )
    bn = model[1]
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def pooled() -> nn.Module:
    """Adaptive pooling: any input size gives one output shape (x1 and x2 may differ in shape)."""
    layers = [nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(12, 3)]
    return nn.Sequential(*layers)


def conv_map() -> nn.Module:
    """Non-2D output: (N, C, H, W)."""
    return nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.Tanh(), nn.Conv2d(2, 2, 1))


# name -> (factory, per-example input shapes)
ZOO = {
    "mlp": (mlp, [(4,)]),
    "cnn_bn": (cnn_bn, [(2, 4, 4)]),
    "residual": (ResidualBlock, [(2, 4, 4)]),
    "tied": (TiedAutoencoder, [(4,)]),
    "buffers": (WithBuffers, [(4,)]),
    "two_inputs": (TwoInputs, [(4,), (2,)]),
    "conv_map": (conv_map, [(2, 3, 3)]),
    "pooled": (pooled, [(2, 4, 4)]),
}


def make(name: str, dtype: torch.dtype = torch.float64, n1: int = 3, n2: int = 2, seed: int = 0):
    """``(model, x1, x2)`` for a zoo entry, inputs as tuples."""
    factory, shapes = ZOO[name]
    torch.manual_seed(seed)
    model = factory().to(dtype)
    x1 = tuple(torch.randn(n1, *s, dtype=dtype) for s in shapes)
    x2 = tuple(torch.randn(n2, *s, dtype=dtype) for s in shapes)
    return model, x1, x2
