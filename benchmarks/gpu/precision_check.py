"""How far each method's float32 kernel is from the float64 one on this device, at torch's default precision flags.

JAX's default lets XLA multiply float32 in TF32 on a GPU; torchntk's structured derivatives follow torch's float32
matmul precision instead (``torchntk.bridge.device.jax_matmul_precision``). torch's own convolutions follow
``torch.backends.cudnn.allow_tf32`` (default True), so the torch-native methods' float32 kernels of convolutional
models carry TF32's error unless the user turns it off: this script measures both, with the flag as found and off.

Usage::

    python benchmarks/gpu/precision_check.py --out benchmarks/results/gpu/precision_check.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torchvision

import torchntk

METHODS = ("jacobian_contraction", "ntk_vector_products", "structured_derivatives")


def models() -> dict[str, tuple[torch.nn.Module, torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    wide = torch.nn.Sequential(torch.nn.Linear(64, 1024), torch.nn.Tanh(), torch.nn.Linear(1024, 10))
    resnet = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    return {
        "mlp 64-1024-10, N=4": (wide, torch.randn(4, 64), torch.randn(3, 64)),
        "resnet18 32x32, N=2": (resnet, torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)),
    }


def relative_error(kernel: torch.Tensor, reference: torch.Tensor) -> float:
    return float((kernel.double() - reference).abs().max() / reference.abs().max())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = []
    for name, (model, x1, x2) in models().items():
        reference = torchntk.ntk(
            copy.deepcopy(model).double().to(device),
            x1.double().to(device),
            x2.double().to(device),
            implementation="jacobian_contraction",
        )
        model, x1, x2 = model.to(device), x1.to(device), x2.to(device)
        for cudnn_tf32 in (torch.backends.cudnn.allow_tf32, False):
            before = torch.backends.cudnn.allow_tf32
            torch.backends.cudnn.allow_tf32 = cudnn_tf32
            for method in METHODS:
                row = {
                    "model": name,
                    "method": method,
                    "cudnn_allow_tf32": cudnn_tf32,
                    "float32_matmul_precision": torch.get_float32_matmul_precision(),
                }
                try:
                    start = time.perf_counter()
                    kernel = torchntk.ntk(model, x1, x2, implementation=method, progress=False)
                    seconds = time.perf_counter() - start
                    row.update(seconds=seconds, rel_error_vs_float64=relative_error(kernel, reference))
                except Exception as error:  # recorded, the next method goes on
                    row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
                rows.append(row)
                print(json.dumps(row), flush=True)
            torch.backends.cudnn.allow_tf32 = before
    payload = {
        "benchmark": "precision_check",
        "description": __doc__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": {"torch": torch.__version__, "jax": __import__("jax").__version__},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
