"""The NTK of a torchvision model by each method, and what auto would pick.

Run: ``python examples/quickstart.py``
"""

import time

import torch
import torchvision

import torchntk


def main() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(2, 3, 32, 32)

    explanation = torchntk.explain(model, x1, x2)
    print(f"auto would run {explanation.choice}: {explanation.reason}")

    for implementation in ("jacobian_contraction", "ntk_vector_products", "structured_derivatives"):
        start = time.perf_counter()
        kernel = torchntk.ntk(model, x1, x2, implementation=implementation)
        print(f"{implementation:24s} {tuple(kernel.shape)} in {time.perf_counter() - start:.2f} s")

    # Class-averaged kernel (trace over the 10 logits) and per-example 10x10 kernels.
    print(torchntk.ntk(model, x1, trace_axes=(-1,)).shape)  # (4, 4)
    print(torchntk.ntk(model, x1, x1, diagonal_axes=(0,)).shape)  # (4, 10, 10)


if __name__ == "__main__":
    main()
