"""examples/digits.py at a reduced size (200 digits, 2 processes): the same results as the kernel in one process."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torchntk

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits.py"


def _example_module():
    spec = importlib.util.spec_from_file_location("digits_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_digits_example_with_two_processes(tmp_path):
    plot, results = tmp_path / "spectrum.png", tmp_path / "digits.json"
    command = [sys.executable, str(EXAMPLE), "--processes", "2", "--examples", "200", "--chunk", "40"]
    done = subprocess.run(
        [*command, "--plot", str(plot), "--json", str(results)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "test accuracy" in done.stdout and "condition number" in done.stdout, done.stdout
    tiles = [int(count) for count in re.findall(r"rank \d+/2: (\d+) tiles", done.stdout)]  # lines may interleave
    assert len(tiles) == 2 and sum(tiles) == 5 * 6 // 2  # 5 row chunks of 40: the upper triangle's 15 tiles
    assert plot.stat().st_size > 10_000
    got = json.loads(results.read_text())

    digits = _example_module()
    images, labels = digits.digits(200)
    kernel = torchntk.ntk(digits.small_cnn(), images, trace_axes=-1, implementation="jacobian_contraction")
    expected = digits.analyse(kernel, labels)
    assert got["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-12)
    assert got["accuracy"] > 0.8
    assert torch.allclose(torch.tensor(got["eigenvalues"]), torch.tensor(expected["eigenvalues"]), rtol=1e-8, atol=1e-9)
    assert got["condition_number"] == pytest.approx(expected["condition_number"], rel=1e-6)
