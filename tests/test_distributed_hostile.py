"""torch.distributed ranks given hostile setups (stop 29's probing): out= memory the ranks share or lay out
otherwise, models differing where no digest sees, a rank failing early, linear algebra on one rank only.

Ranks are launched by ``test_distributed.launch`` (gloo, a FileStore, forkserver); each writes what it got, and
the test compares with the float64 explicit-Jacobian oracle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _oracle import oracle_ntk
from _zoo import make
from test_distributed import _barrier, launch

import torchntk
from torchntk._problem import prepare

SCALE = 1.0  # set per rank below, read by name through globals(): no static reading sees it


def _scale(name: str) -> float:
    return globals()[name]


class HiddenScale(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(3, 2).double()

    def forward(self, x):
        return torch.tanh(self.lin(x)) * _scale("SCALE")


def _outcome(call) -> object:
    try:
        return np.asarray(call()).tolist()
    except Exception as error:  # noqa: BLE001 - recorded for the test to judge
        return f"{type(error).__name__}: {error}"


def hostile_ranks(rank: int, world: int, out_dir: Path) -> None:
    global SCALE
    model, x1, x2 = make("mlp", n1=5, n2=4)
    options = {"implementation": "jacobian_contraction", "chunk_size": 2}
    got = {}
    # 1. one slot of a stacked memmap (a kernel per checkpoint), the same slot on every rank: shared memory
    shape = prepare(model, x1, x2, params=None, trace_axes=(), diagonal_axes=()).kernel_shape()
    if rank == 0:
        np.lib.format.open_memmap(out_dir / "stack.npy", "w+", np.float64, (2, *shape)).flush()
    _barrier(out_dir, "stack", rank, world)
    slot = np.lib.format.open_memmap(out_dir / "stack.npy", "r+")[1]
    got["memmap slot"] = _outcome(lambda: torchntk.ntk(model, x1, x2, out=slot, **options))
    # 2. a transposed out= on rank 0 only
    out = torch.empty(shape[1], shape[0], *shape[2:], dtype=torch.float64).transpose(0, 1) if rank == 0 else None
    got["transposed out"] = _outcome(lambda: torchntk.ntk(model, x1, x2, out=out, **options))
    # 3. models that differ where no digest sees: refused on every rank
    SCALE = 1.0 + rank
    got["hidden scale"] = _outcome(lambda: torchntk.ntk(HiddenScale(), x1[0][:, :3], **options))
    SCALE = 1.0
    # 4. a call failing on rank 1 only, before its tiles: the next calls stay matched
    small = 10 if rank == 1 else None
    method = options["implementation"]  # no chunk_size: it would override max_memory
    got["early failure"] = _outcome(lambda: torchntk.ntk(model, x1, x2, max_memory=small, implementation=method))
    got["after the failure"] = _outcome(lambda: torchntk.ntk(model, x1, x2, **options))
    # 5. linear algebra on rank 0 only (after a distributed kernel): computed in this process
    if rank == 0:
        got["eigvalsh on rank 0"] = _outcome(lambda: torchntk.eigvalsh(model, x1, k=2))
    (out_dir / f"hostile.rank{rank}.json").write_text(json.dumps(got))


def test_hostile_ranks(tmp_path):
    launch("test_distributed_hostile:hostile_ranks", 2, tmp_path)
    model, x1, x2 = make("mlp", n1=5, n2=4)
    want = oracle_ntk(model, x1, x2).numpy()
    eigenvalues = np.linalg.eigvalsh(oracle_ntk(model, x1, None).permute(0, 2, 1, 3).reshape(15, 15).numpy())
    stack = np.load(tmp_path / "stack.npy")
    np.testing.assert_allclose(stack[1], want, rtol=1e-10, atol=1e-12)  # 2× before: the ranks' sum of one memory
    assert not stack[0].any()
    for rank in range(2):
        got = json.loads((tmp_path / f"hostile.rank{rank}.json").read_text())
        for case in ("memmap slot", "transposed out", "after the failure"):
            assert not isinstance(got[case], str), (rank, case, got[case])
            np.testing.assert_allclose(np.array(got[case]), want, rtol=1e-10, atol=1e-12, err_msg=f"{rank} {case}")
        assert "give other outputs on the same examples" in got["hidden scale"], got["hidden scale"]
        assert "max_memory=10 bytes is too small" in got["early failure"], got["early failure"]
    on_rank_0 = json.loads((tmp_path / "hostile.rank0.json").read_text())["eigvalsh on rank 0"]
    np.testing.assert_allclose(np.array(on_rank_0), eigenvalues[-2:], rtol=1e-9)  # waited for rank 1 before


def test_a_store_lost_with_its_host_is_named():
    """Survivors of a killed rank 0 got torch's raw DistNetworkError ("Connection reset by peer")."""
    from torchntk import _distributed

    @_distributed.numbered_call
    def call(*, distributed=None):
        raise torch.distributed.DistNetworkError("Connection reset by peer")

    with pytest.raises(RuntimeError, match="store became unreachable.*computes only the tiles not yet written"):
        call(distributed=True)
