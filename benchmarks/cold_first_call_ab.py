"""One structured-derivatives first call and second call in this process, for an A/B of two checkouts in
alternating fresh processes (``PYTHONPATH=<checkout> TORCHNTK_CACHE_DIR=$(mktemp -d) python
benchmarks/cold_first_call_ab.py resnet18 16``); prints ``RESULT name n first_s second_s process_s``. The
2026-12-05 A/B of the session's checks is ``results/cold_first_call_checks_ab.json``."""

from __future__ import annotations

import sys
import time

T0 = time.perf_counter()

import torch  # noqa: E402
import torchvision  # noqa: E402

import torchntk  # noqa: E402


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    name, n = sys.argv[1], int(sys.argv[2])
    model = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
    x = torch.randn(n, 3, 32, 32)
    start = time.perf_counter()
    torchntk.ntk(model, x, implementation="structured_derivatives")
    first = time.perf_counter() - start
    start = time.perf_counter()
    torchntk.ntk(model, x, implementation="structured_derivatives")
    second = time.perf_counter() - start
    print("RESULT", name, n, round(first, 2), round(second, 3), round(time.perf_counter() - T0, 2))


if __name__ == "__main__":
    main()
