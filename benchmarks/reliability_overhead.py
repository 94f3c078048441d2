"""What issue 14's checks cost: the two-example probe in ``prepare`` against the one-example probe it replaced and a
whole NTK call, and attention by the math backend (needed under NTK-vector products' JVPs) against torch's default
backend under Jacobian contraction. Side by side in one process, medians (``_common.timed_side_by_side``).

    python benchmarks/reliability_overhead.py  # minutes on 2 loaded cores; results/reliability_overhead.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import time
import warnings
from pathlib import Path
from unittest.mock import patch

import torch
import torch.nn.functional as F
import torchvision
from _common import RESULTS, machine, timed_side_by_side, write_json
from torch import Tensor, nn

import torchntk
from torchntk._problem import functional_forward, parameter_aliases, prepare

# The module (the package's attribute of that name is the function).
jc_module = importlib.import_module("torchntk.torch_native.jacobian_contraction")


class SDPAttention(nn.Module):
    """One self-attention block written with F.scaled_dot_product_attention, mean-pooled to ``outputs``."""

    def __init__(self, width: int, heads: int, outputs: int) -> None:
        super().__init__()
        self.qkv, self.out, self.heads = nn.Linear(width, 3 * width), nn.Linear(width, outputs), heads

    def forward(self, x: Tensor) -> Tensor:
        n, t, w = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v)
        return self.out(h.transpose(1, 2).reshape(n, t, w).mean(1))


def probe_costs(batch: int) -> dict:
    """prepare (two-example probe) vs the old one-example forward vs the NTK by Jacobian contraction: resnet18."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    x = torch.randn(batch, 3, 32, 32)
    theta = {n: p.detach() for n, p in model.named_parameters()}
    aliases = parameter_aliases(model)

    def one_example_forward() -> None:
        with torch.no_grad():
            functional_forward(model, aliases, theta, (x[:1],))

    calls = {
        "old_probe_one_forward": one_example_forward,
        "prepare": lambda: prepare(model, x, None, params=None, trace_axes=(), diagonal_axes=()),
    }
    times = timed_side_by_side(calls, {})
    start = time.perf_counter()  # one call for scale (minutes when repeated on a loaded 2-core machine)
    torchntk.ntk(model, x, implementation="jacobian_contraction", progress=False)
    call_s = time.perf_counter() - start
    return {
        "case": f"resnet18 32x32, 10 classes, N={batch}, float32",
        "times": times,
        "ntk_jacobian_contraction_one_call_s": call_s,
        "prepare_over_old_probe": times["prepare"]["median_s"] / times["old_probe_one_forward"]["median_s"],
        "prepare_share_of_call": times["prepare"]["median_s"] / call_s,
    }


def attention_costs(batch: int, tokens: int, width: int) -> dict:
    """Jacobian contraction with torch's default (fused) SDPA backend vs the math backend it now uses; NTK-vector
    products (math backend; with the fused one forward-mode AD raises)."""
    torch.manual_seed(0)
    model = SDPAttention(width, 4, 10).eval()
    x = torch.randn(batch, tokens, width)

    def jc_fused() -> Tensor:
        with patch.object(jc_module, "differentiable_attention", contextlib.nullcontext):
            return torchntk.ntk(model, x, implementation="jacobian_contraction")

    calls = {
        "jacobian_contraction_default_backend": jc_fused,
        "jacobian_contraction_math_backend": lambda: torchntk.ntk(model, x, implementation="jacobian_contraction"),
        "ntk_vector_products_math_backend": lambda: torchntk.ntk(model, x, implementation="ntk_vector_products"),
    }
    times = timed_side_by_side(calls, {})
    default = times["jacobian_contraction_default_backend"]["median_s"]
    return {
        "case": f"SDPA self-attention, N={batch}, T={tokens}, width {width}, 10 outputs, float32",
        "times": times,
        "jc_math_over_default": times["jacobian_contraction_math_backend"]["median_s"] / default,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "reliability_overhead.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore", message=".*performance drop.*")  # vmap's fallback for fused attention
    before = machine()
    results = {"probe": probe_costs(args.batch), "attention": attention_costs(4, 16, 32)}
    write_json(Path(args.out), {"machine": before, "load_average_after": machine()["load_average"], **results})
    print(
        f"prepare / old one-example probe: {results['probe']['prepare_over_old_probe']:.2f}x; prepare / NTK call: "
        f"{results['probe']['prepare_share_of_call']:.2%}; JC math / default SDPA: "
        f"{results['attention']['jc_math_over_default']:.2f}x"
    )


if __name__ == "__main__":
    main()
