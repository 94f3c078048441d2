"""The torch-native methods keep a tile within max_memory: peak resident memory of a fresh process, sampled while
one call runs with a budget just above one example pair's predicted tile (a model of θ-sized buffers: every
θ-sized tensor a tile or its checks hold must be predicted)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

_CHILD = textwrap.dedent(
    """
    import json, sys, threading, time
    import torch
    import torchntk
    from torchntk._api import one_pair_bytes
    from torchntk._problem import prepare

    def rss():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))

    peak = [0]
    def watch():
        while True:
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    implementation, trace = sys.argv[1], (-1,) if sys.argv[2] == "traced" else ()
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 4000), torch.nn.Tanh(), torch.nn.Linear(4000, 4000), torch.nn.Tanh(),
        torch.nn.Linear(4000, 4),
    ).eval()
    x = torch.randn(3, 16)
    torchntk.ntk(torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4)), x,
                 implementation=implementation)  # imports and first uses paid before measuring
    problem = prepare(model, x, None, params=None, trace_axes=trace, diagonal_axes=())
    budget = int(1.05 * one_pair_bytes(problem, implementation))
    threading.Thread(target=watch, daemon=True).start()
    time.sleep(0.05)
    base = peak[0] = rss()
    torchntk.ntk(model, x, implementation=implementation, max_memory=budget, trace_axes=trace)
    time.sleep(0.05)
    print(json.dumps({"budget": budget, "used": peak[0] - base, "theta": 4 * problem.num_params}))
    """
)


@pytest.mark.parametrize(
    "implementation, outputs",
    [("jacobian_contraction", "full"), ("ntk_vector_products", "full"), ("jacobian_contraction", "traced")],
)
def test_a_tile_stays_within_max_memory(implementation, outputs):
    """NTK-vector products at one output and one example per tile had taken 9·θ bytes for a predicted 2·θ: the
    check's float64 copies, its gradient and the tile's combined tangent were not counted. Traced, Jacobian
    contraction builds both sides' rows one output at a time (``torch_native.output_blocks``)."""
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, implementation, outputs],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["used"] <= 1.1 * record["budget"], record
