"""``python -m torchntk``: the README's demo and the ``ntk`` command (choice, estimates, time, ``--save``)."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import torch

import torchntk
from torchntk.__main__ import _torchvision_model


def run_cli(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "torchntk", *args], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def test_ntk_command_prints_the_choice_and_saves_the_kernel(tmp_path):
    path = tmp_path / "kernel.npy"
    out = run_cli("ntk", "--model", "resnet18", "--batch", "2", "--classes", "3", "--save", str(path))
    assert "estimate jacobian_contraction" in out and "estimate ntk_vector_products" in out
    assert "auto's choice:" in out
    assert re.search(r"kernel \(2, 2, 3, 3\) in [0-9.]+ s", out), out
    saved = torch.from_numpy(np.load(path))
    model = _torchvision_model("resnet18", 3)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    reference = torchntk.ntk(model, x, implementation="jacobian_contraction")
    assert torch.allclose(saved, reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())


def test_demo_runs_every_method_and_they_agree():
    out = run_cli("demo", "--batch", "2", "--classes", "3")
    for method in torchntk.IMPLEMENTATIONS:
        assert re.search(rf"{method}\s+[0-9.]+ s\s+kernel \(2, 2, 3, 3\)", out), out
    disagreements = [float(d) for d in re.findall(r"/ max \|Θ\| = ([0-9.e+-]+)", out)]
    assert len(disagreements) == 2 and max(disagreements) < 1e-4, out
