"""Smoke test of the GPU benchmark scripts on the CPU (``bench_gpu.py --device cpu``, ``render_table.py``), so that
``benchmarks/gpu_check.sh`` finds them working when a GPU is there. No timing assertions; structured derivatives are
left out (a cold conversion alone takes seconds)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.slow  # two fresh interpreters with torch and JAX: about a minute on 2 loaded cores
def test_bench_gpu_and_its_table_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check_cpu.json"
    command = [
        sys.executable,
        str(BENCHMARKS / "gpu" / "bench_gpu.py"),
        "--device", "cpu",
        "--sections", "anchors",
        "--widths", "16", "32",
        "--outputs", "2",
        "--methods", "jacobian_contraction", "ntk_vector_products",
        "--deadline-s", "120",
        "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert payload["sections"]["anchors"]["status"] == "exit 0"
    points = payload["points"]
    assert [(p["W"], p["method_short"]) for p in points] == [(16, "JC"), (16, "NVP"), (32, "JC"), (32, "NVP")]
    assert all(p["status"] == "ok" and p["median_s"] > 0 and p["runs"] >= 1 for p in points), points
    assert payload["environment"]["xla_python_client_preallocate"] == "false"

    table = subprocess.run(
        [sys.executable, str(BENCHMARKS / "gpu" / "render_table.py"), str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert table.returncode == 0, table.stderr[-2000:]
    assert "| W=32, O=2 |" in table.stdout and "| FCN depth 3, N=8 | JC GPU | JC CPU |" in table.stdout
