"""TensorFlow imported before torchntk: libtriton, which torch imports lazily, would crash the process."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import tensorflow
import torch
import torchntk

model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
x = torch.randn(2, 4, dtype=torch.float64)
structured = torchntk.ntk(model, x, implementation="structured_derivatives")
reference = torchntk.ntk(model, x, implementation="jacobian_contraction")
print("max difference", float((structured - reference).abs().max()))
print("auto", torchntk.explain(model, x).choice)
"""


def test_tensorflow_first_then_torchntk_runs_every_path():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    difference = float(done.stdout.split("max difference")[1].split()[0])
    assert difference < 1e-12
    assert "auto" in done.stdout


SECOND_EXPORT = """
import sys
import torch
import torchntk
{user_import}

first = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
second = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(144, 2))
import torchntk.converters  # noqa: E402
torchntk.converters.to_jax(first.eval(), torch.randn(2, 4), route="onnx-tf")  # imports TensorFlow
torchntk.ntk(first, torch.randn(2, 4), implementation="structured_derivatives")
assert "tensorflow" in sys.modules
torchntk.ntk(second, torch.randn(2, 3, 8, 8), implementation="structured_derivatives")  # a second torch.export
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402,F401 - imports triton too
print("done")
"""


@pytest.mark.parametrize(
    "user_import",
    [
        pytest.param("", id="route-imports-tf", marks=pytest.mark.slow),
        pytest.param("import tensorflow", id="user-imports-tf"),
    ],
)
def test_conversions_after_tensorflow_was_loaded(user_import):
    """TensorFlow loaded after torchntk (by the onnx-tf route, or by the user): a later torch.export or flop counter
    must not crash by loading triton after it."""
    script = SECOND_EXPORT.format(user_import=user_import)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "done" in done.stdout
