"""Tiling over the batch: bounded memory, output into out=, resuming a memmap after an interruption."""

from __future__ import annotations

import importlib
import os

import numpy as np
import pytest
import torch
from _zoo import make

import torchntk
from torchntk._store import JOURNAL_SUFFIX

METHODS = ["jacobian_contraction", "ntk_vector_products"]
jc_module = importlib.import_module("torchntk.torch_native.jacobian_contraction")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("x2_none", [True, False])
def test_tiled_equals_untiled(method, x2_none):
    model, x1, x2 = make("cnn_bn", n1=7, n2=5)
    x2 = None if x2_none else x2
    full = torchntk.ntk(model, x1, x2, implementation=method)
    # A budget that fits a couple of examples per tile forces several tiles.
    one = 3 * 3 * sum(p.numel() for p in model.parameters()) * 8
    for kwargs in ({"chunk_size": 3}, {"max_memory": 2 * one}):
        tiled = torchntk.ntk(model, x1, x2, implementation=method, **kwargs)
        assert torch.allclose(tiled, full, rtol=1e-12, atol=1e-13)


def test_max_memory_too_small():
    model, x1, x2 = make("mlp")
    with pytest.raises(ValueError, match="too small for even one tile"):
        torchntk.ntk(model, x1, x2, max_memory=100)
    with pytest.raises(ValueError, match="max_memory must be a positive integer"):
        torchntk.ntk(model, x1, x2, max_memory=-1)


def test_out_tensor_is_filled_and_returned():
    model, x1, x2 = make("mlp")
    out = torch.full((3, 2, 3, 3), float("nan"), dtype=torch.float64)
    result = torchntk.ntk(model, x1, x2, out=out, chunk_size=1)
    assert result is out
    assert torch.allclose(out, torchntk.ntk(model, x1, x2), rtol=1e-12)


@pytest.mark.parametrize(
    "out, match",
    [
        (torch.empty(3, 2, 3), "needs shape"),
        (torch.empty(3, 2, 3, 3, dtype=torch.float32), "needs shape"),
        (np.empty((3, 2, 3, 3), dtype=np.float32), "dtype float64"),
        (np.empty((2, 3, 3, 3)), "needs shape"),
        ([[0.0]], "must be a torch.Tensor, a numpy array"),
    ],
)
def test_out_of_the_wrong_kind(out, match):
    model, x1, x2 = make("mlp")
    with pytest.raises((ValueError, TypeError), match=match):
        torchntk.ntk(model, x1, x2, out=out)


def _memmap(path, shape):
    return np.lib.format.open_memmap(path, mode="w+" if not path.exists() else "r+", dtype=np.float64, shape=shape)


def test_memmap_resumes_after_interruption(tmp_path, monkeypatch):
    model, x1, x2 = make("residual", n1=6, n2=4)
    expected = torchntk.ntk(model, x1, x2)
    path = tmp_path / "kernel.npy"
    calls = {"n": 0}
    real = jc_module.contract_jacobians

    def interrupted(*args):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(jc_module, "contract_jacobians", interrupted)
    with pytest.raises(KeyboardInterrupt):
        torchntk.ntk(
            model, x1, x2, implementation="jacobian_contraction", chunk_size=2, out=_memmap(path, (6, 4, 3, 3))
        )
    assert len(os.listdir(f"{path}{JOURNAL_SUFFIX}/tiles")) == 3  # 3 of 6 tiles finished

    calls["n"] = -100
    torchntk.ntk(model, x1, x2, implementation="jacobian_contraction", chunk_size=2, out=_memmap(path, (6, 4, 3, 3)))
    assert calls["n"] == -100 + 3  # only the 3 missing tiles were computed
    assert np.allclose(np.load(path), expected.numpy(), rtol=1e-12, atol=1e-14)


def test_stale_or_corrupt_journal_is_not_trusted(tmp_path):
    model, x1, x2 = make("mlp", n1=4, n2=4)
    path = tmp_path / "kernel.npy"
    torchntk.ntk(model, x1, x2, implementation="jacobian_contraction", chunk_size=2, out=_memmap(path, (4, 4, 3, 3)))
    # Other inputs, same file: the journal's key differs, so every tile is recomputed.
    _, y1, y2 = make("mlp", n1=4, n2=4, seed=3)
    torchntk.ntk(model, y1, y2, implementation="jacobian_contraction", chunk_size=2, out=_memmap(path, (4, 4, 3, 3)))
    assert np.allclose(np.load(path), torchntk.ntk(model, y1, y2).numpy(), rtol=1e-12)
    # A corrupt journal is ignored too.
    with open(f"{path}{JOURNAL_SUFFIX}/store.json", "w") as file:
        file.write("{not json")
    out = _memmap(path, (4, 4, 3, 3))
    out[:] = 0
    torchntk.ntk(model, x1, x2, implementation="jacobian_contraction", chunk_size=2, out=out)
    assert np.allclose(np.load(path), torchntk.ntk(model, x1, x2).numpy(), rtol=1e-12)
