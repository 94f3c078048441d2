"""Fidelity of the onnx-jax route on the converters model zoo: outputs and VJPs against torch.

Graphs come from ``export_onnx`` (every parameter a graph input, batch size 1) and run in float32;
``jax.vjp`` with respect to every parameter is compared with torch autograd on a float64 copy of the model.
The float64 reference matters: torch's own float32 backward of resnext50's grouped convolutions is 1.8e-3
(relative) away from float64, while the converted JAX function stays within ~1e-6. Heavy models are slow.
"""

from __future__ import annotations

import copy

import jax
import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from torchntk.converters.onnx_export import export_onnx
from torchntk.converters.onnx_jax import onnx_to_jax

OUT_RTOL, VJP_RTOL = 1e-5, 1e-4


def randomize_buffers(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics, so that eval-mode normalization is really exercised."""
    gen = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=gen) * 0.1)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.5)
    return model.eval()


def small_vit() -> nn.Module:
    vit = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
    )
    # torchvision zero-initializes the head, which would make every encoder gradient zero.
    nn.init.normal_(vit.heads.head.weight, std=0.1)
    nn.init.normal_(vit.heads.head.bias, std=0.1)
    return vit


ZOO = {
    "mlp": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 10)), (3, 4, 4)),
    "cnn_bn": (
        lambda: nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(8 * 4 * 4, 10),
        ),
        (3, 8, 8),
    ),
    "vit": (small_vit, (3, 32, 32)),
    "alexnet": (lambda: torchvision.models.alexnet(num_classes=10), (3, 64, 64)),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (3, 32, 32)),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=10), (3, 32, 32)),
    "resnext50_32x4d": (lambda: torchvision.models.resnext50_32x4d(num_classes=10), (3, 32, 32)),
    "vgg11_bn": (lambda: torchvision.models.vgg11_bn(num_classes=10), (3, 32, 32)),
    "efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(num_classes=10), (3, 32, 32)),
    "convnext_tiny": (lambda: torchvision.models.convnext_tiny(num_classes=10), (3, 32, 32)),
}
FAST = ["mlp", "cnn_bn", "vit", "resnet18"]
SLOW = [name for name in ZOO if name not in FAST]


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.max(np.abs(actual - expected)) / max(float(np.max(np.abs(expected))), 1e-30))


def check_model(name: str) -> tuple[float, float]:
    """Assert fidelity of one zoo model; return (output error, worst VJP error), both relative."""
    torch.manual_seed(0)
    build, shape = ZOO[name]
    model = randomize_buffers(build())
    x = torch.randn(1, *shape)
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for _, p in model.named_parameters()]

    g = onnx_to_jax(export_onnx(model, (x,), names))
    x_np = x.numpy()
    out, vjp = jax.vjp(lambda *ps: g(*ps, x_np)[0], *[p.numpy() for p in params])

    reference = copy.deepcopy(model).double()
    leaves = [p.double().requires_grad_() for p in params]
    expected = torch.func.functional_call(reference, dict(zip(names, leaves, strict=True)), (x.double(),))
    out_error = relative_error(np.asarray(out), expected.detach().numpy())
    assert out_error < OUT_RTOL

    cotangent = torch.randn(expected.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    expected_grads = torch.autograd.grad(expected, leaves, cotangent)
    grads = vjp(cotangent.float().numpy())
    errors = {n: relative_error(np.asarray(a), e.numpy()) for n, a, e in zip(names, grads, expected_grads, strict=True)}
    worst = max(errors, key=errors.get)
    assert errors[worst] < VJP_RTOL, f"{name}: VJP of {worst} off by {errors[worst]:.2e}"
    assert all(float(np.max(np.abs(e.numpy()))) > 0 for e in expected_grads[-2:]), "degenerate test: zero gradients"
    return out_error, errors[worst]


@pytest.mark.parametrize("name", FAST)
def test_zoo_fidelity(name: str) -> None:
    check_model(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_zoo_fidelity_slow(name: str) -> None:
    check_model(name)


@pytest.mark.parametrize("name", ["cnn_bn", pytest.param("vit", marks=pytest.mark.slow)])
def test_zoo_float64_stays_float64(name: str) -> None:
    """A float64 export keeps float64 end to end (incl. LayerNorm's float32 stash_type) under enable_x64."""
    torch.manual_seed(0)
    build, shape = ZOO[name]
    model = randomize_buffers(build()).double()
    x = torch.randn(1, *shape, dtype=torch.float64)
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for _, p in model.named_parameters()]
    g = onnx_to_jax(export_onnx(model, (x,), names))
    with jax.enable_x64(True):
        out, vjp = jax.vjp(lambda *ps: g(*ps, x.numpy())[0], *[p.numpy() for p in params])
        assert out.dtype == np.float64
        cotangent = np.random.default_rng(0).standard_normal(out.shape)
        grads = vjp(cotangent)
    leaves = [p.clone().requires_grad_() for p in params]
    expected = torch.func.functional_call(model, dict(zip(names, leaves, strict=True)), (x,))
    assert relative_error(np.asarray(out), expected.detach().numpy()) < 1e-12
    expected_grads = torch.autograd.grad(expected, leaves, torch.from_numpy(cotangent))
    for n, a, e in zip(names, grads, expected_grads, strict=True):
        assert relative_error(np.asarray(a), e.numpy()) < 1e-10, n
