"""Inputs from a map-style Dataset, read tile by tile through a DataLoader: the kernel equals the tensor inputs' one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _oracle import oracle_ntk
from _zoo import make
from torch.utils.data import Dataset, IterableDataset, TensorDataset

import torchntk
from torchntk import DatasetInputs
from torchntk._data import DatasetSource

METHODS = ["jacobian_contraction", "ntk_vector_products"]


class Records(Dataset):
    """Items as dicts ``{"image": x, "label": int}``, with numpy arrays for the image."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.x[index].numpy(), "label": index % 3}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("x2_none", [True, False])
def test_dataset_inputs_equal_the_oracle(method, x2_none):
    model, x1, x2 = make("cnn_bn", n1=5, n2=4)
    x2 = None if x2_none else x2
    labels = torch.arange(5)
    data1 = DatasetInputs(TensorDataset(*x1, labels), input_key=0)
    data2 = None if x2 is None else TensorDataset(*x2)  # items (x,): a tuple of one tensor, no key needed
    kernel = torchntk.ntk(model, data1, data2, implementation=method, chunk_size=2)
    expected = oracle_ntk(model, x1, x2)
    assert torch.allclose(kernel, expected, rtol=1e-10, atol=1e-12)
    tensors = torchntk.ntk(model, x1, x2, implementation=method, chunk_size=2)
    assert torch.equal(kernel, tensors)  # the same tiles: the same bits


def test_multi_input_items_dict_items_and_workers():
    model, x1, x2 = make("two_inputs", n1=6, n2=3)
    expected = oracle_ntk(model, x1, x2, trace_axes=(-1,))
    as_tuple = DatasetInputs(TensorDataset(*x1), num_workers=2)
    kernel = torchntk.ntk(model, as_tuple, x2, trace_axes=-1, chunk_size=4, implementation="jacobian_contraction")
    assert torch.allclose(kernel, expected, rtol=1e-10, atol=1e-12)
    model, x1, x2 = make("mlp", n1=5, n2=2)
    records = DatasetInputs(Records(x1[0]), input_key="image", num_workers=1)
    kernel = torchntk.ntk(model, records, x2, chunk_size=2, implementation="ntk_vector_products")
    assert torch.allclose(kernel, oracle_ntk(model, x1, x2), rtol=1e-10, atol=1e-12)


def test_dtype_cast_and_structured_derivatives():
    model, x1, _ = make("mlp", n1=4)
    data = DatasetInputs(TensorDataset(x1[0].float()), dtype=torch.float64)
    kernel = torchntk.ntk(model, data, implementation="structured_derivatives", chunk_size=3)
    rounded = x1[0].float().double()  # what the cast gives the model
    assert torch.allclose(kernel, oracle_ntk(model, (rounded,), None), rtol=1e-10, atol=1e-12)


def test_examples_are_read_tile_by_tile(monkeypatch):
    model, x1, _ = make("mlp", n1=9)
    spans = []
    real = DatasetSource.read

    def recording(self, start, stop):
        spans.append(stop - start)
        return real(self, start, stop)

    monkeypatch.setattr(DatasetSource, "read", recording)
    torchntk.ntk(model, TensorDataset(*x1), chunk_size=3, implementation="jacobian_contraction")
    assert spans and max(spans[1:]) <= 3  # spans[0]: the probe of one example


def test_memmap_resume_fingerprints_the_dataset(tmp_path):
    model, x1, x2 = make("mlp", n1=4, n2=3)
    path = tmp_path / "k.npy"
    out = np.lib.format.open_memmap(path, "w+", np.float64, (4, 3, 3, 3))
    first = torchntk.ntk(model, TensorDataset(*x1), x2, out=out, chunk_size=2).clone()
    changed = x1[0].clone()
    changed[-1] += 1.0  # another input set in the same file: its journal must not be trusted
    again = torchntk.ntk(model, TensorDataset(changed), x2, out=out, chunk_size=2)
    assert torch.allclose(again, oracle_ntk(model, (changed,), x2), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(again, first)


class Stream(IterableDataset):
    def __iter__(self):
        yield torch.zeros(4, dtype=torch.float64)


class Ragged(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.zeros(4 if index < 2 else 5, dtype=torch.float64)


@pytest.mark.parametrize(
    "data, error, match",
    [
        (lambda x: TensorDataset(x, torch.arange(len(x))), ValueError, "input_key=0"),
        (lambda x: DatasetInputs(TensorDataset(x), input_key=3), ValueError, "input_key=3 does not select"),
        (lambda x: Stream(), TypeError, "IterableDataset"),
        (lambda x: Ragged(), ValueError, "every item must have inputs of one shape"),
        (lambda x: TensorDataset(x[:0]), ValueError, "empty dataset"),
        (lambda x: DatasetInputs(TensorDataset(x), num_workers=-1), ValueError, "num_workers"),
        (lambda x: DatasetInputs(TensorDataset(x), dtype=torch.int64), TypeError, "floating torch.dtype"),
        (lambda x: TensorDataset(x.float()), TypeError, "cast the inputs"),
    ],
)
def test_bad_datasets_are_refused_with_the_fix(data, error, match):
    model, x1, _ = make("mlp", n1=4)
    with pytest.raises(error, match=match):
        torchntk.ntk(model, data(x1[0]), chunk_size=2, implementation="jacobian_contraction")


class Augmented(Dataset):
    """Items with a random transform: each read of an example gives another version of it."""

    def __init__(self, noise: float) -> None:
        self.x, self.noise = torch.randn(6, 3, dtype=torch.float64), noise

    def __len__(self) -> int:
        return 6

    def __getitem__(self, index: int):
        return self.x[index] + self.noise * torch.randn(3, dtype=torch.float64), index


@pytest.mark.parametrize("method", ["jacobian_contraction", "ntk_vector_products", "structured_derivatives", "auto"])
def test_a_dataset_with_random_items_is_refused(method):
    """Tiles read an example several times: random items gave each tile another draw, and the kernel of mixed
    draws came back without a word (11 to 36 reads of 6 examples). Deterministic items still equal the oracle."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    with pytest.raises(ValueError, match="gave example 0 other values on a later read: its items are random"):
        torchntk.ntk(model, DatasetInputs(Augmented(0.1), input_key=0), implementation=method, chunk_size=2)
    fixed = Augmented(0.0)
    got = torchntk.ntk(model, DatasetInputs(fixed, input_key=0), implementation=method, chunk_size=2)
    torch.testing.assert_close(got, oracle_ntk(model, (fixed.x,), None), rtol=1e-10, atol=1e-12)
