"""What the 2026-12-05 (second) session's changes cost, each against the call it guards, side by side in one process
(medians, ``_common.timed_side_by_side``):

- the architecture fingerprint (``_fingerprint.architecture``), which now also follows torch's own classes' code into
  the functions it reads from torch's modules, for a user's function patched in (``F.leaky_relu = mine``);
- the output projections ranks now compare before a distributed kernel (``_store.output_projections``: one forward
  over every example);
- Jacobian contraction one example at a time where ``vmap``'s batching of an op is wrong (``nn.PReLU``), against the
  same network with ``nn.ReLU`` batched by ``vmap``.

    python benchmarks/stop29_costs.py  # about two minutes on 2 cores; results/stop29_costs.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torchvision
from _common import RESULTS, machine, timed_side_by_side, write_json
from torch import nn

import torchntk
from torchntk._fingerprint import architecture
from torchntk._problem import prepare
from torchntk._store import output_projections


def _guards(model: nn.Module, x: torch.Tensor) -> dict:
    problem = prepare(model, x, None, params=None, trace_axes=(-1,), diagonal_axes=())
    calls = {
        "jacobian_contraction": lambda: torchntk.ntk(model, x, implementation="jacobian_contraction", trace_axes=(-1,)),
        "fingerprint": lambda: architecture(model),
        "output_projections": lambda: output_projections(problem),
    }
    times = timed_side_by_side(calls, {})
    median = {name: t["median_s"] for name, t in times.items()}
    return {
        "times": times,
        "fingerprint_share_of_jc_call": median["fingerprint"] / median["jacobian_contraction"],
        "projections_share_of_jc_call": median["output_projections"] / median["jacobian_contraction"],
    }


def _one_at_a_time(n: int) -> dict:
    def mlp(activation: nn.Module) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(32, 64), activation, nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10)).eval()

    prelu, relu, x = mlp(nn.PReLU(64)), mlp(nn.ReLU()), torch.randn(n, 32)
    calls = {
        "prelu_one_at_a_time": lambda: torchntk.ntk(prelu, x, implementation="jacobian_contraction"),
        "relu_vmap": lambda: torchntk.ntk(relu, x, implementation="jacobian_contraction"),
    }
    times = timed_side_by_side(calls, {})
    return {"times": times, "ratio": times["prelu_one_at_a_time"]["median_s"] / times["relu_vmap"]["median_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(RESULTS / "stop29_costs.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    before = machine()
    torch.manual_seed(0)
    fcn = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)).eval()
    resnet = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    cases = {
        "FCN 784-512-512-10, N=64": _guards(fcn, torch.randn(64, 784)),
        "resnet18 32x32, 10 classes, N=16": _guards(resnet, torch.randn(16, 3, 32, 32)),
        "MLP 32-64-64-10, N=32: PReLU one at a time vs ReLU by vmap": _one_at_a_time(32),
    }
    write_json(Path(args.out), {"machine": before, "load_average_after": machine()["load_average"], "cases": cases})
    for name, result in cases.items():
        print(name, {k: v for k, v in result.items() if k != "times"})


if __name__ == "__main__":
    main()
