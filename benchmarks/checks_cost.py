"""What the checks of the 2026-12-05 session cost, each against the whole call it guards, side by side in one
process (medians, ``_common.timed_side_by_side``):

- ``prepare`` (the probe: up to four examples, on copies of the weights and of the modules' tensors);
- Jacobian contraction's check of its first Jacobians against torch's backward (``_autograd_check``);
- structured derivatives' check of a conversion on every example of the call, values and a JVP projection
  (``bridge/reuse_check.disagreement``), against the warm structured call (conversion in memory).

    python benchmarks/checks_cost.py  # a few minutes on 2 cores; results/checks_cost.json and checks_cost.png
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torchvision
from _common import RESULTS, machine, timed_side_by_side, write_json
from torch import nn

import torchntk
from torchntk._problem import prepare
from torchntk.bridge import torch_glue
from torchntk.bridge.device import jax_scope
from torchntk.bridge.reuse_check import disagreement
from torchntk.torch_native._autograd_check import check_jacobians
from torchntk.torch_native.jacobian_contraction import batch_jacobians


def _models() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    fcn = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)).eval()
    resnet = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    return {
        "FCN 784-512-512-10, N=64": (fcn, torch.randn(64, 784)),
        "resnet18 32x32, 10 classes, N=16": (resnet, torch.randn(16, 3, 32, 32)),
    }


def case(model: nn.Module, x: torch.Tensor) -> dict:
    problem = prepare(model, x, None, params=None, trace_axes=(-1,), diagonal_axes=())
    torchntk.ntk(model, x, implementation="structured_derivatives", trace_axes=(-1,))  # converted, in memory
    converted = torch_glue.convert(problem)
    jacobians = batch_jacobians(problem, (x[:2],))

    def everywhere() -> None:
        with jax_scope(problem) as target:
            assert (
                disagreement(problem, torch_glue._model_fn(problem, converted), converted.function_key, target) is None
            )

    calls = {
        "jacobian_contraction": lambda: torchntk.ntk(model, x, implementation="jacobian_contraction", trace_axes=(-1,)),
        "structured_derivatives_warm": lambda: torchntk.ntk(
            model, x, implementation="structured_derivatives", trace_axes=(-1,)
        ),
        "prepare_probe": lambda: prepare(model, x, None, params=None, trace_axes=(-1,), diagonal_axes=()),
        "jacobian_check": lambda: check_jacobians(problem, (x[:2],), jacobians),
        "everywhere_check": everywhere,
    }
    times = timed_side_by_side(calls, {})
    median = {name: t["median_s"] for name, t in times.items()}
    return {
        "times": times,
        "probe_share_of_jc_call": median["prepare_probe"] / median["jacobian_contraction"],
        "jacobian_check_share_of_jc_call": median["jacobian_check"] / median["jacobian_contraction"],
        "everywhere_check_share_of_sd_call": median["everywhere_check"] / median["structured_derivatives_warm"],
    }


def run_on_check_models(costs: Callable[[nn.Module, torch.Tensor, bool], dict], default_out: Path) -> None:
    """``costs(model, x, trace)`` on the models of checks_cost.py: FCN N=64 with O=10; resnet18 at 32×32 traced
    over its 10 classes, N=8 (its NTK-vector products call at N=16 takes 40 s, run at least six times); written to
    ``--out`` (JSON) with the machine and its load average before and after."""
    parser = argparse.ArgumentParser(description=sys.modules["__main__"].__doc__)
    parser.add_argument("--out", default=str(default_out))
    args = parser.parse_args()
    torch.set_num_threads(2)
    before = machine()
    cases = {
        name if name.startswith("FCN") else name.replace("N=16", "N=8"): (
            costs(model, x, False) if name.startswith("FCN") else costs(model, x[:8], True)
        )
        for name, (model, x) in _models().items()
    }
    write_json(Path(args.out), {"machine": before, "load_average_after": machine()["load_average"], "cases": cases})
    for name, result in cases.items():
        print(name, {k: v for k, v in result.items() if k != "times"})


def plot(results: dict, path: Path) -> None:
    shares = ["probe_share_of_jc_call", "jacobian_check_share_of_jc_call", "everywhere_check_share_of_sd_call"]
    fig, ax = plt.subplots(figsize=(7, 3))
    width = 0.8 / len(results)
    for i, (name, result) in enumerate(results.items()):
        ax.bar([j + i * width for j in range(len(shares))], [result[s] for s in shares], width, label=name)
    ax.set_xticks(
        [j + width / 2 for j in range(len(shares))], ["probe / JC call", "JC check / JC call", "SD check / SD call"]
    )
    ax.set_ylabel("share of the call (median)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(RESULTS / "checks_cost.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    before = machine()
    results = {name: case(model, x) for name, (model, x) in _models().items()}
    write_json(Path(args.out), {"machine": before, "load_average_after": machine()["load_average"], "cases": results})
    plot(results, Path(args.out).with_suffix(".png"))
    for name, result in results.items():
        print(
            f"{name}: probe {result['probe_share_of_jc_call']:.1%} of a JC call, JC check "
            f"{result['jacobian_check_share_of_jc_call']:.1%}, SD every-example check "
            f"{result['everywhere_check_share_of_sd_call']:.1%} of a warm SD call"
        )


if __name__ == "__main__":
    main()
