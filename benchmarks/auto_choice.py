"""Is ``implementation="auto"`` right? Its choice against every method's measured time, side by side.

Cases (float32): a wide FCN with many outputs (structured derivatives should win), a tiny model with one example
and many outputs, a small FCN with one output and many examples (torch-native methods should win), and, with
``--resnet``, torchvision's resnet18 at 32×32. For each: auto's choice and estimates (``torchntk.explain``), the
median time of every method once warm (conversion and compilation excluded), the time of a first call in a new
process (conversion, from the disk cache where present, and compilation included), and the ratio of the choice's
time to the fastest method's for both. Writes ``results/auto_choice.json``.

Run: ``python benchmarks/auto_choice.py [--resnet]``
"""

from __future__ import annotations

import argparse

import torch
from _common import (
    RESULTS,
    forget_compiled,
    load_average,
    markdown_table,
    ntk_mlp,
    timed_side_by_side,
    torchntk_case,
    write_json,
)

import torchntk

METHODS = ("jacobian_contraction", "ntk_vector_products", "structured_derivatives")


def cases(with_resnet: bool) -> dict[str, tuple[torch.nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    found = {
        "FCN W=512 depth 3, O=100, N=8": (ntk_mlp(512, 512, 3, 100), torch.randn(8, 512)),
        "FCN W=32 depth 1, O=256, N=1": (ntk_mlp(16, 32, 1, 256), torch.randn(1, 16)),
        "FCN W=64 depth 2, O=1, N=64": (ntk_mlp(16, 64, 2, 1), torch.randn(64, 16)),
    }
    if with_resnet:
        import torchvision

        model = torchvision.models.resnet18(num_classes=10).eval()
        found["resnet18 32x32, O=10, N=4"] = (model, torch.randn(4, 3, 32, 32))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resnet", action="store_true", help="add torchvision resnet18 at 32x32 (slow)")
    args = parser.parse_args()
    rows, results = [], []
    for name, (model, x) in cases(args.resnet).items():
        calls, conversion_s = {}, {}
        for method in METHODS:  # before explain(), which would convert the model for its estimate
            prepare, call = torchntk_case(model, x, None, method, max_memory=8e9)
            conversion_s[method] = prepare() or 0.0
            calls[method] = call
        explanation = torchntk.explain(model, x)
        forget_compiled()  # so that the first timed call of structured derivatives includes compilation
        timed = timed_side_by_side(calls, {})
        # A first call in a new process: conversion (disk cache allowed) + compilation + the call itself.
        first_s = {m: conversion_s[m] + timed[m]["warmup_s"] for m in METHODS}
        best = min(timed, key=lambda m: timed[m]["median_s"])
        ratio = timed[explanation.choice]["median_s"] / timed[best]["median_s"]
        first_ratio = first_s[explanation.choice] / min(first_s.values())
        results.append(
            {
                "case": name,
                "choice": explanation.choice,
                "reason": explanation.reason,
                "estimates": {
                    e.implementation: {"flops": e.flops, "seconds": e.seconds} for e in explanation.estimates
                },
                "times": timed,
                "best": best,
                "choice_over_best": ratio,
                "first_call_s": first_s,
                "first_call_choice_over_best": first_ratio,
            }
        )
        rows.append(
            [name, explanation.choice, best, f"{ratio:.2f}", f"{first_ratio:.2f}"]
            + [f"{timed[m]['median_s'] * 1e3:.1f} / {first_s[m]:.2f} s" for m in METHODS]
        )
        print(rows[-1], flush=True)
    write_json(RESULTS / "auto_choice.json", {"load_average": load_average(), "cases": results})
    header = ["case", "auto's choice", "fastest (warm)", "choice / fastest, warm", "choice / fastest, first call"]
    print(markdown_table(header + [f"{m}: warm ms / first call" for m in METHODS], rows))


if __name__ == "__main__":
    main()
