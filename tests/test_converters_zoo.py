"""torchvision classification models through to_jax(route="onnx-tf"): fidelity against torch, plus the measurements
of the closing note (stage seconds and linearized-jaxpr primitives), printed and, when $TORCHNTK_ZOO_REPORT names a
file, appended to it as JSON lines. Heavy: marked slow (run with -m slow)."""

from __future__ import annotations

import json
import os
import time

import jax
import pytest
import torch
import torchvision.models as tvm
from _converters_testlib import check_fidelity, linearized_primitives

from torchntk.converters import clear_memory_cache


def _vit() -> torch.nn.Module:
    model = tvm.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
    )
    torch.nn.init.normal_(model.heads.head.weight, std=0.1)  # torchvision zero-inits it: every encoder grad is 0
    return model


ZOO = {
    "resnet18": (lambda: tvm.resnet18(num_classes=10), 32),
    "mobilenet_v2": (lambda: tvm.mobilenet_v2(num_classes=10), 32),
    "resnext50_32x4d": (lambda: tvm.resnext50_32x4d(num_classes=10), 32),
    "vgg11_bn": (lambda: tvm.vgg11_bn(num_classes=10), 32),
    "alexnet": (lambda: tvm.alexnet(num_classes=10), 64),  # 32x32 collapses before its last max-pool
    "efficientnet_b0": (lambda: tvm.efficientnet_b0(num_classes=10), 32),
    "convnext_tiny": (lambda: tvm.convnext_tiny(num_classes=10), 32),
    "vit_small": (_vit, 32),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ZOO))
def test_torchvision_zoo_onnx_tf(name, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHNTK_CACHE_DIR", str(tmp_path))
    clear_memory_cache()
    torch.manual_seed(0)
    make, size = ZOO[name]
    model = make().eval()
    if name != "vit_small":  # BatchNorm statistics away from (0, 1), so the baked buffers are exercised
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.1, 0.1)
                    m.running_var.uniform_(0.8, 1.2)
    x = torch.randn(2, 3, size, size)
    t = time.perf_counter()
    jm, errors = check_fidelity(model, (x,), route="onnx-tf")
    total = time.perf_counter() - t

    x0 = jax.numpy.asarray(x[1].numpy())  # another example: a fresh call, now that it is traced
    t = time.perf_counter()
    jax.block_until_ready(jm.fn(jm.params, x0))
    second_call = time.perf_counter() - t
    prims = sorted(linearized_primitives(jm, x0))
    row = {
        "model": name,
        "input": [3, size, size],
        "n_params": len(jm.param_names),
        **{k: round(v, 3) for k, v in jm.timings.items()},
        "first_vjp_call": round(errors["first_call"], 3),
        "later_forward_call": round(second_call, 3),
        "convert_total": round(total - errors["first_call"], 3),
        "out_rel_err": errors["out"],
        "grad_rel_err": errors["grad"],
        "linearized_primitives": prims,
    }
    print(json.dumps(row))
    report = os.environ.get("TORCHNTK_ZOO_REPORT")
    if report:
        with open(report, "a") as f:
            f.write(json.dumps(row) + "\n")
    assert {"custom_call", "callback", "pure_callback"}.isdisjoint(prims)
