"""``python -m torchntk``: the README's demo and the ``ntk`` command (choice, estimates, time, ``--save``)."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import torchntk
from torchntk.__main__ import _torchvision_model, main


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


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch", "-1"], "argument --batch: -1 is not a positive integer"),
        (["--batch", "0"], "argument --batch: 0 is not a positive integer"),
        (["--batch", "1.5"], "argument --batch: '1.5' is not an integer"),
        (["--classes", "0"], "argument --classes: 0 is not a positive integer"),
        (["--size", "0"], "argument --size: 0 is not a positive integer"),
        (["--size", "x"], "argument --size: 'x' is not an integer"),
        (["--device", "nodevice"], "argument --device: 'nodevice' is not a torch device"),
        (["--save", "kernel.txt"], "argument --save: 'kernel.txt' does not end in .npy"),
        (["--save", "/no/such/folder/k.npy"], "argument --save: '/no/such/folder/k.npy': the directory"),
    ],
)
def test_bad_arguments_are_refused_by_argparse(args, message, capsys):
    """Each bad value exits with status 2 and argparse's usage line, before a model is built."""
    with pytest.raises(SystemExit) as exit_:
        main(["ntk", *args])
    assert exit_.value.code == 2
    stderr = capsys.readouterr().err
    assert message in stderr and "usage:" in stderr, stderr


def test_input_size_the_model_cannot_take_exits_with_a_message():
    done = subprocess.run(
        [sys.executable, "-m", "torchntk", "ntk", "--model", "alexnet", "--size", "8", "--batch", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-3000:]
    assert "--model alexnet cannot take --size 8 inputs" in done.stderr and "Traceback" not in done.stderr


def test_zero_classes_does_not_reach_torch():
    """num_classes=0 crashed the process with SIGFPE inside torch's autograd (issue 14); argparse refuses it now."""
    done = subprocess.run(
        [sys.executable, "-m", "torchntk", "demo", "--classes", "0"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2 and "argument --classes: 0 is not a positive integer" in done.stderr, done.stderr


TINY_MODEL = """
import torch
from torch import nn


def build(num_classes=3):
    return nn.Sequential(nn.Conv2d(3, 2, 3), nn.Tanh(), nn.Flatten(), nn.LazyLinear(num_classes))
"""


def test_structured_derivatives_run_before_auto_has_their_estimate(tmp_path):
    """auto estimates structured derivatives only once converted: the ETA lookup raised a bare StopIteration."""
    (tmp_path / "tiny.py").write_text(TINY_MODEL)
    model = f"{tmp_path / 'tiny.py'}:build"
    out = run_cli("ntk", "--model", model, "--size", "6", "--batch", "2", "--implementation", "structured_derivatives")
    assert "ETA unknown: structured_derivatives has no estimate" in out and "kernel (2, 2, 3, 3)" in out, out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "no_such_module:build"], "error: ModuleNotFoundError: No module named 'no_such_module'"),
        (["--trace-axes", "5"], "error: ValueError: trace_axes holds axis 5, out of range"),
        (["--trace", "--trace-axes", "-1"], "error: ValueError: pass --trace (the last output axis) or --trace-axes"),
        (["--data", "no_such_file.npy"], "error: FileNotFoundError"),
    ],
)
def test_what_the_user_passed_is_refused_in_one_line(tmp_path, args, message):
    (tmp_path / "tiny.py").write_text(TINY_MODEL)
    base = ["ntk", "--model", f"{tmp_path / 'tiny.py'}:build", "--size", "6", "--batch", "2"]
    done = subprocess.run(
        [sys.executable, "-m", "torchntk", *base, *args], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr


class _RunsCode:
    """Unpickling it would create a file: a .pt data file must never run it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _cli_error(capsys, *args: str) -> str:
    """What ``python -m torchntk ntk ...`` says when it refuses (argparse's exit 2, or a SystemExit message)."""
    with pytest.raises(SystemExit) as exited:
        main(["ntk", *args])
    return f"{exited.value.code} {capsys.readouterr().err}"


def test_bad_files_and_models_are_refused_in_one_line(tmp_path, capsys):
    """Stop 29: each of these ended in a raw traceback (StopIteration, IndexError, UnpicklingError, NameError), a
    complex file was computed as its real part, and --save beside --out was silently ignored."""
    (tmp_path / "tiny.py").write_text(
        TINY_MODEL + "\n\ndef empty():\n    return nn.Flatten()\n\n\ndef broken():\n    return undefined_name\n"
    )
    tiny = ["--model", f"{tmp_path / 'tiny.py'}:build", "--size", "6", "--batch", "2"]
    np.save(tmp_path / "scalar.npy", np.float64(3.0))
    np.save(tmp_path / "complex.npy", np.ones((2, 3, 6, 6), dtype=np.complex128))
    marker = tmp_path / "ran"
    torch.save({"x": _RunsCode(str(marker))}, tmp_path / "evil.pt")
    assert "has no floating parameters" in _cli_error(capsys, "--model", f"{tmp_path / 'tiny.py'}:empty")
    assert "NameError: name 'undefined_name'" in _cli_error(capsys, "--model", f"{tmp_path / 'tiny.py'}:broken")
    assert "is a scalar" in _cli_error(capsys, *tiny, "--data", str(tmp_path / "scalar.npy"))
    assert "is complex" in _cli_error(capsys, *tiny, "--data", str(tmp_path / "complex.npy"))
    assert "never runs code from a data file" in _cli_error(capsys, *tiny, "--data", str(tmp_path / "evil.pt"))
    assert not marker.exists()
    both = ["--save", str(tmp_path / "a.npy"), "--out", str(tmp_path / "b.npy")]
    assert "--save and --out both say where the kernel goes" in _cli_error(capsys, *tiny, *both)
    assert not (tmp_path / "a.npy").exists() and not (tmp_path / "b.npy").exists()
