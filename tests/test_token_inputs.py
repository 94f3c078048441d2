"""Integer and boolean inputs (token ids, attention masks, class labels): every method against the float64
explicit-Jacobian oracle, and the embedding arguments whose torch backward is not the lookup's derivative.

torchntk's J is what torch's backward computes per example: an ``Embedding(padding_idx=p)`` leaves row p out of
the gradient (it is never trained), so the kernel leaves it out too; the tests check that this kernel differs from
the plain lookup's, so that they can fail.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import torchntk
from torchntk import UnsupportedModelError
from torchntk.converters.errors import ConversionError

VOCAB, LENGTH = 11, 5
METHODS = ("jacobian_contraction", "ntk_vector_products", "structured_derivatives")


def oracle(model: nn.Module, x1: tuple[torch.Tensor, ...], x2: tuple[torch.Tensor, ...] | None) -> torch.Tensor:
    """Θ[i, j, a, b] from torch.autograd's Jacobians, one example at a time -> Tensor[N1, N2, O, O]."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def jacobians(x: tuple[torch.Tensor, ...]) -> torch.Tensor:
        rows = []
        for i in range(x[0].shape[0]):

            def f(*values: torch.Tensor, i: int = i) -> torch.Tensor:
                example = tuple(t[i : i + 1] for t in x)
                return torch.func.functional_call(model, dict(zip(params, values, strict=True)), example)[0]

            jac = torch.autograd.functional.jacobian(f, tuple(params.values()))
            rows.append(torch.cat([j.reshape(j.shape[0], -1) for j in jac], -1))
        return torch.stack(rows)

    j1 = jacobians(x1)
    return torch.einsum("iap,jbp->ijab", j1, j1 if x2 is None else jacobians(x2))


class Bag(nn.Module):
    """Token ids -> embedding -> tanh MLP -> mean over tokens."""

    def __init__(self, **embedding: object) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 4, **embedding)
        self.hidden = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.hidden(self.embed(ids))).mean(1))


class Encoder(nn.Module):
    """Token ids and a boolean padding mask -> one transformer encoder layer -> the first token's head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.position = nn.Parameter(0.1 * torch.randn(LENGTH, 8))
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(self.embed(ids) + self.position, src_key_padding_mask=padding)[:, 0])


class Conditional(nn.Module):
    """A float input and an integer class label (a class-conditional model)."""

    def __init__(self) -> None:
        super().__init__()
        self.label = nn.Embedding(4, 3)
        self.out = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(x * self.label(label)))


class Pixels(nn.Module):
    """uint8 images scaled inside forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.out = nn.Linear(8, 2)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.conv(image.to(self.conv.weight.dtype) / 255)).flatten(1))


def _ids(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, LENGTH), generator=generator)


def _double(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return model.double().eval()


@pytest.fixture(scope="module")
def token_ids() -> tuple[torch.Tensor, torch.Tensor]:
    x1, x2 = _ids(4, 1), _ids(3, 2)
    x1[0, 0], x2[1] = 0, 0  # the padding id, shared across examples, repeated within one
    x2[0, :2] = x1[0, :2]
    return x1, x2


@pytest.mark.parametrize("method", METHODS)
def test_embedding_model_matches_oracle(method: str, token_ids: tuple[torch.Tensor, torch.Tensor]) -> None:
    model = _double(Bag())
    x1, x2 = token_ids
    before = x1.clone()
    kernel = torchntk.ntk(model, x1, x2, implementation=method)
    torch.testing.assert_close(kernel, oracle(model, (x1,), (x2,)), atol=1e-12, rtol=1e-10)
    assert torch.equal(x1, before)


@pytest.mark.parametrize("method", ("jacobian_contraction", "structured_derivatives"))
def test_token_kernel_layouts(method: str, token_ids: tuple[torch.Tensor, torch.Tensor]) -> None:
    model = _double(Bag())
    x1, _ = token_ids
    full = oracle(model, (x1,), (x1,))
    traced = torchntk.ntk(model, x1, implementation=method, trace_axes=(-1,), chunk_size=3)
    torch.testing.assert_close(traced, full.diagonal(dim1=-2, dim2=-1).mean(-1), atol=1e-12, rtol=1e-10)
    diagonal = torchntk.ntk(model, x1, implementation=method, diagonal_axes=(-1,))
    torch.testing.assert_close(diagonal, full.diagonal(dim1=-2, dim2=-1), atol=1e-12, rtol=1e-10)


def test_padding_row_is_left_out_as_torch_trains_it(token_ids: tuple[torch.Tensor, torch.Tensor]) -> None:
    model = _double(Bag(padding_idx=0))
    x1, x2 = token_ids
    want = oracle(model, (x1,), (x2,))
    plain = copy.deepcopy(model)
    plain.embed.padding_idx = None
    assert (oracle(plain, (x1,), (x2,)) - want).abs().max() > 1e-3  # the padding row matters on these ids
    for method in ("jacobian_contraction", "ntk_vector_products", "auto"):
        torch.testing.assert_close(torchntk.ntk(model, x1, x2, implementation=method), want, atol=1e-12, rtol=1e-10)
    with pytest.raises(ConversionError, match=r"'embed'.*padding_idx=0.*jacobian_contraction"):
        torchntk.ntk(model, x1, x2, implementation="structured_derivatives")


def test_scale_grad_by_freq_follows_torch_backward() -> None:
    model = _double(Bag(scale_grad_by_freq=True))
    # the first examples repeat no id, the later ones do: forward mode (NTK-vector products) agrees with the
    # backward on the first and not on the others, so only a refusal made before any example is safe
    x1 = torch.stack([torch.arange(LENGTH), torch.arange(LENGTH) + 5, torch.tensor([1, 1, 1, 2, 2])])
    x2 = torch.tensor([[3, 3, 4, 4, 4], [0, 1, 2, 3, 4]])
    want = oracle(model, (x1,), (x2,))
    plain = copy.deepcopy(model)
    plain.embed.scale_grad_by_freq = False
    assert (oracle(plain, (x1,), (x2,)) - want).abs().max() > 1e-3
    for method in ("jacobian_contraction", "auto"):
        torch.testing.assert_close(torchntk.ntk(model, x1, x2, implementation=method), want, atol=1e-12, rtol=1e-10)
    with pytest.raises(UnsupportedModelError, match="scale_grad_by_freq=True"):
        torchntk.ntk(model, x1, x2, implementation="ntk_vector_products")
    with pytest.raises(UnsupportedModelError, match="scale_grad_by_freq=True"):
        torchntk.ntk_vp(model, x1, x2, torch.ones(2, 3, dtype=torch.float64))
    with pytest.raises(ConversionError, match="scale_grad_by_freq=True"):
        torchntk.ntk(model, x1, x2, implementation="structured_derivatives")


def test_functional_lookup_scaled_by_count_is_seen() -> None:
    class Functional(Bag):
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            looked_up = nn.functional.embedding(ids, self.embed.weight, scale_grad_by_freq=True)
            return self.head(torch.tanh(self.hidden(looked_up)).mean(1))

    model = _double(Functional())
    x = torch.tensor([[0, 1, 2, 3, 4], [1, 1, 1, 2, 2]])
    with pytest.raises(UnsupportedModelError, match="scale_grad_by_freq=True"):
        torchntk.ntk(model, x, implementation="ntk_vector_products")
    torch.testing.assert_close(
        torchntk.ntk(model, x, implementation="jacobian_contraction"), oracle(model, (x,), (x,)), atol=1e-12, rtol=0
    )


def test_sparse_lookup(token_ids: tuple[torch.Tensor, torch.Tensor]) -> None:
    model = _double(Bag(sparse=True))
    dense = copy.deepcopy(model)
    dense.embed.sparse = False
    x1, x2 = token_ids
    want = oracle(dense, (x1,), (x2,))
    for method in ("jacobian_contraction", "ntk_vector_products"):
        with pytest.raises(UnsupportedModelError, match="sparse=False"):
            torchntk.ntk(model, x1, x2, implementation=method)
    for method in ("structured_derivatives", "auto"):
        torch.testing.assert_close(torchntk.ntk(model, x1, x2, implementation=method), want, atol=1e-12, rtol=1e-10)


def test_transformer_with_padding_mask(token_ids: tuple[torch.Tensor, torch.Tensor]) -> None:
    model = _double(Encoder())
    x1, x2 = token_ids
    mask1, mask2 = torch.zeros(4, LENGTH, dtype=torch.bool), torch.zeros(3, LENGTH, dtype=torch.bool)
    mask1[1, 3:], mask2[2, 2:] = True, True
    want = oracle(model, (x1, mask1), (x2, mask2))
    for method in METHODS:
        kernel = torchntk.ntk(model, (x1, mask1), (x2, mask2), implementation=method)
        torch.testing.assert_close(kernel, want, atol=1e-11, rtol=1e-9)


@pytest.mark.parametrize("method", ("jacobian_contraction", "ntk_vector_products"))
def test_float_and_integer_inputs_and_dataset(method: str) -> None:
    model = _double(Conditional())
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, generator=generator)  # float32 data for a float64 model: the dataset casts it
    label = torch.randint(0, 4, (5,), generator=generator)
    want = oracle(model, (x.double(), label), (x.double(), label))
    dataset = torch.utils.data.TensorDataset(x, label)
    kernel = torchntk.ntk(model, torchntk.DatasetInputs(dataset, dtype=torch.float64), implementation=method)
    torch.testing.assert_close(kernel, want, atol=1e-12, rtol=1e-10)


def test_dataset_target_taken_for_an_input_names_input_key() -> None:
    model = _double(Bag())
    dataset = torch.utils.data.TensorDataset(_ids(4, 5), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"input_key=0"):
        torchntk.ntk(model, dataset)


@pytest.mark.parametrize("method", METHODS)
def test_uint8_images(method: str) -> None:
    model = _double(Pixels())
    images = torch.randint(0, 256, (3, 1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    kernel = torchntk.ntk(model, images, implementation=method)
    torch.testing.assert_close(kernel, oracle(model, (images,), (images,)), atol=1e-12, rtol=1e-10)


def test_float_inputs_of_another_dtype_still_refused() -> None:
    with pytest.raises(TypeError, match="float32 but the model's weights are torch.float64"):
        torchntk.ntk(_double(Pixels()), torch.rand(3, 1, 4, 4))


def test_store_refuses_other_token_ids(tmp_path, token_ids: tuple[torch.Tensor, torch.Tensor]) -> None:
    model = _double(Bag())
    x1, _ = token_ids
    path = tmp_path / "kernel.npy"
    torchntk.ntk(model, x1, out=path, implementation="jacobian_contraction", chunk_size=2)
    changed = x1.clone()
    changed[3, 4] = (changed[3, 4] + 1) % VOCAB
    with pytest.raises(ValueError, match="inputs differ"):
        torchntk.ntk(model, changed, out=path, implementation="jacobian_contraction", chunk_size=2)


def test_cli_keeps_integer_data(tmp_path) -> None:
    ids = tmp_path / "ids.npy"
    np.save(ids, _ids(3, 6).numpy())
    model_file = tmp_path / "token_model.py"
    model_file.write_text(
        "import torch\n"
        "class Bag(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__(); self.embed = torch.nn.Embedding(11, 4); self.head = torch.nn.Linear(4, 2)\n"
        "    def forward(self, ids):\n"
        "        return self.head(self.embed(ids).mean(1))\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    return Bag()\n"
    )
    out = tmp_path / "kernel.npy"
    command = [sys.executable, "-m", "torchntk", "ntk", "--model", f"{model_file}:build", "--data", str(ids)]
    command += ["--implementation", "jacobian_contraction", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    sys.path.insert(0, str(tmp_path))
    try:
        from token_model import build  # noqa: PLC0415
    finally:
        sys.path.remove(str(tmp_path))
    model = build()
    x = torch.from_numpy(np.load(ids))
    want = torchntk.ntk(model, x, implementation="jacobian_contraction")
    np.testing.assert_allclose(np.load(out), want.numpy(), rtol=1e-5, atol=1e-6)


class TiedHead(nn.Module):
    """A language model's tied input embedding and output head, with a padding row."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 4, padding_idx=0)
        self.hidden = nn.Linear(4, 4)
        self.head = nn.Linear(4, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.hidden(self.embed(ids))).mean(1))


class Routed(nn.Module):
    """Token features written to the slots their ids name (``scatter``): duplicates keep one write."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Linear(1, 4)
        self.head = nn.Linear(VOCAB * 4, 3)

    def forward(self, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.features(x[..., None]))
        slots = torch.zeros(ids.shape[0], VOCAB, 4, dtype=h.dtype).scatter(1, ids[..., None].expand(-1, -1, 4), h)
        return self.head(slots.flatten(1))


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32))
def test_forward_mode_refused_where_only_later_examples_differ(dtype: torch.dtype) -> None:
    """Found in this session: the padding id (tied head) and duplicate ids (scatter) only in examples 2+, past the
    examples the forward-mode check looks at one by one: NTK-vector products were silently off."""
    torch.manual_seed(0)
    tied = TiedHead().to(dtype).eval()
    with torch.no_grad():
        tied.embed.weight[0].normal_()  # the padding row is a real class of the tied head
    ids = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [1, 0, 0, 2, 3], [0, 4, 0, 5, 0]])
    routed = Routed().to(dtype).eval()
    slots = torch.stack([torch.randperm(VOCAB, generator=torch.Generator().manual_seed(i))[:LENGTH] for i in range(4)])
    slots[2, 1], slots[3, 2:] = slots[2, 0], slots[3, 1]
    x = torch.randn(4, LENGTH, dtype=dtype, generator=torch.Generator().manual_seed(5))
    tolerance = {"atol": 1e-12, "rtol": 1e-10} if dtype == torch.float64 else {"atol": 1e-5, "rtol": 1e-4}
    for model, inputs, named in ((tied, (ids,), "padding_idx"), (routed, (ids.clone(), x), "scatter")):
        want = oracle(model.double(), tuple(t.double() if t.is_floating_point() else t for t in inputs), None)
        model.to(dtype)
        with pytest.raises(UnsupportedModelError, match=named):
            torchntk.ntk(model, inputs, implementation="ntk_vector_products")
        with pytest.raises(UnsupportedModelError, match=named):
            torchntk.ntk_vp(model, inputs, None, torch.ones(4, model.head.out_features, dtype=dtype))
        for method in ("jacobian_contraction", "auto"):
            kernel = torchntk.ntk(model, inputs, implementation=method, max_memory=None)
            torch.testing.assert_close(kernel.double(), want, **tolerance)


def test_padding_row_of_an_untied_weight_keeps_forward_mode() -> None:
    """The padding row is zero in every row of Jᵀ when nothing else reads the weight: NTK-vector products agree."""
    model = _double(Bag(padding_idx=0))
    x = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [1, 0, 0, 2, 3], [0, 4, 0, 5, 0]])
    kernel = torchntk.ntk(model, x, implementation="ntk_vector_products")
    torch.testing.assert_close(kernel, oracle(model, (x,), (x,)), atol=1e-12, rtol=1e-10)


class HashedIds(nn.Module):
    """A per-user bias table looked up with raw 64-bit ids modulo its size (zero-initialised: outputs agree whatever
    rows a lookup picks, derivatives do not)."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Embedding(VOCAB, 1)
        nn.init.zeros_(self.bias.weight)
        self.scale = nn.Linear(1, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.scale(self.bias(ids % VOCAB).sum(1))


def test_int64_ids_beyond_int32_are_refused_by_structured_derivatives() -> None:
    """JAX imports int64 as int32 for a float32 model: ids of 2**33 + k picked row k (a kernel 2.0 off, served when
    the check kept no program for the cached conversion)."""
    model = HashedIds().eval()
    small = torch.tensor([[1, 2], [3, 4], [5, 5]])
    torchntk.ntk(model, small, implementation="structured_derivatives")  # converted and checked: cached
    wide = small + 2**33
    with pytest.raises(ConversionError, match="int64 input holds values beyond the 32-bit range"):
        torchntk.ntk(model, wide, implementation="structured_derivatives")
    torch.testing.assert_close(torchntk.ntk(model, wide), oracle(model.double(), (wide,), None).float())


def test_a_cached_conversion_without_its_check_program_is_checked_with_derivatives(monkeypatch) -> None:
    """The check of a memory-cached conversion whose check program was dropped (the last 8 are kept) compared
    values only; a function whose outputs agree and derivatives do not is now found."""
    import jax

    from torchntk._problem import prepare
    from torchntk.bridge import reuse_check
    from torchntk.bridge.device import jax_scope

    model = _double(Bag())
    x = _ids(3, 7)
    problem = prepare(model, x, None, params=None, trace_axes=(), diagonal_axes=())
    weight = {name: jax.numpy.asarray(p.detach().numpy()) for name, p in problem.params.items()}

    def function(params: dict, inputs: tuple, frozen: bool) -> object:
        def value(p: dict) -> object:
            h = jax.numpy.tanh(p["embed.weight"][inputs[0]] @ p["hidden.weight"].T + p["hidden.bias"]).mean(1)
            return h @ p["head.weight"].T + p["head.bias"]

        return value(weight) + jax.lax.stop_gradient(value(params) - value(weight)) if frozen else value(params)

    with jax_scope(problem) as target:
        right = reuse_check.disagreement(problem, lambda p, i: function(p, i, False), "no-program-a", target)
        frozen = reuse_check.disagreement(problem, lambda p, i: function(p, i, True), "no-program-b", target)
    assert right is None
    assert frozen is not None and frozen.startswith("derivatives")


class PackedGRU(nn.Module):
    """Token ids and their lengths through a GRU over a packed sequence, the last hidden state to a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 3)
        self.rnn = nn.GRU(3, 3, batch_first=True)
        self.head = nn.Linear(3, 2)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = nn.utils.rnn.pack_padded_sequence(self.embed(ids), lengths, batch_first=True, enforce_sorted=False)
        return self.head(self.rnn(packed)[1][-1])


def test_gru_over_a_packed_sequence_runs_one_example_at_a_time() -> None:
    """vmap could not batch it, nor jacrev's vmap over the outputs one example at a time (a raw torch error)."""
    model = _double(PackedGRU())
    x = (_ids(3, 8), torch.tensor([5, 2, 4]))
    for method in ("jacobian_contraction", "auto"):
        kernel = torchntk.ntk(model, x, implementation=method)
        torch.testing.assert_close(kernel, oracle(model, x, None), atol=1e-12, rtol=1e-10)


def test_frozen_float64_weights_folded_by_the_export_are_not_refused() -> None:
    """A frozen Linear's float64 weight, made from float32 values by .double(), is folded (transposed) into a
    constant of the graph, which was refused as a float32-rounded constant."""
    model = _double(Bag())
    model.hidden.requires_grad_(False)
    x = _ids(3, 9)
    kernel = torchntk.ntk(model, x, implementation="structured_derivatives")
    torch.testing.assert_close(kernel, oracle(model, (x,), None), atol=1e-12, rtol=1e-10)


class BagOfWords(nn.Module):
    """An EmbeddingBag (torch has no forward-mode derivative for it: NTK-vector products refuse it)."""

    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(VOCAB, 4, mode="mean")
        self.head = nn.Linear(4, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.bag(ids)))


def test_kernel_regression_predicts_where_forward_mode_cannot_run() -> None:
    """The dense route solved by Jacobian contraction, then the prediction's ntk_vp refused the model (late)."""
    model = _double(BagOfWords())
    x_train, x_test = _ids(5, 10), _ids(3, 11)
    y = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    train = oracle(model, (x_train,), None).permute(0, 2, 1, 3).reshape(10, 10)
    cross = oracle(model, (x_test,), (x_train,)).permute(0, 2, 1, 3).reshape(6, 10)
    want = (cross @ torch.linalg.solve(train + 1e-3 * torch.eye(10, dtype=torch.float64), y.reshape(10))).reshape(3, 2)
    got = torchntk.kernel_regression(model, x_train, y, x_test, ridge=1e-3, method="dense")
    torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-7)


def test_python_number_labels_of_dataset_items_are_inputs() -> None:
    """(x, label) items with a Python int label, as torchvision's datasets give them, for a class-conditional
    model: the label was refused as "not a tensor"."""

    class Items(torch.utils.data.Dataset):
        def __init__(self) -> None:
            generator = torch.Generator().manual_seed(13)
            self.x = torch.randn(4, 3, dtype=torch.float64, generator=generator)
            self.labels = [0, 3, 1, 3]

        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            return self.x[i], self.labels[i]

    model, items = _double(Conditional()), Items()
    want = oracle(model, (items.x, torch.tensor(items.labels)), None)
    kernel = torchntk.ntk(model, items, implementation="jacobian_contraction")
    torch.testing.assert_close(kernel, want, atol=1e-12, rtol=1e-10)


class WrittenAtIds(nn.Module):
    """Token features written (or added) into per-id slots by ``index_put`` with the ids: ONNX's ScatterND with
    indices computed from the inputs, which structured derivatives refused with a raw error."""

    def __init__(self, accumulate: bool) -> None:
        super().__init__()
        self.accumulate = accumulate
        self.table = nn.Parameter(torch.randn(VOCAB, 3))
        self.head = nn.Linear(VOCAB * 3, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(ids.shape[0]).unsqueeze(1).expand_as(ids)
        slots = torch.zeros(ids.shape[0], VOCAB, 3, dtype=self.table.dtype)
        slots = slots.index_put((rows, ids), torch.tanh(self.table[ids]), accumulate=self.accumulate)
        return self.head(slots.flatten(1))


@pytest.mark.parametrize("accumulate", (True, False))
def test_writes_at_token_ids_through_structured_derivatives(accumulate: bool) -> None:
    model = _double(WrittenAtIds(accumulate))
    generator = torch.Generator().manual_seed(14)
    x = torch.stack([torch.randperm(VOCAB, generator=generator)[:LENGTH] for _ in range(3)])  # no repeats: one write
    if accumulate:
        x[1, 1:3] = x[1, 0]  # repeated ids add up
    kernel = torchntk.ntk(model, x, implementation="structured_derivatives")
    torch.testing.assert_close(kernel, oracle(model, (x,), None), atol=1e-12, rtol=1e-10)


class ScatteredAtIds(nn.Module):
    """``scatter`` / ``scatter_add`` of token features along the slot axis at their ids (ONNX ScatterElements, which
    onnx-jax refused as unsupported), and of a constant index buffer."""

    def __init__(self, add: bool, from_buffer: bool) -> None:
        super().__init__()
        self.add, self.from_buffer = add, from_buffer
        self.table = nn.Parameter(torch.randn(VOCAB, 2))
        self.head = nn.Linear(VOCAB * 2, 2)
        self.register_buffer("slots_of", torch.randperm(VOCAB, generator=torch.Generator().manual_seed(3))[:LENGTH])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.table[ids])  # (N, LENGTH, 2)
        where = self.slots_of.expand_as(ids) if self.from_buffer else ids
        where = where[..., None].expand(-1, -1, 2)
        base = torch.full((ids.shape[0], VOCAB, 2), 0.25, dtype=h.dtype)
        slots = base.scatter_add(1, where, h) if self.add else base.scatter(1, where, h)
        return self.head(slots.flatten(1))


@pytest.mark.parametrize("from_buffer", (False, True), ids=("ids", "buffer"))
@pytest.mark.parametrize("add", (True, False), ids=("scatter_add", "scatter"))
def test_scatter_elements_through_structured_derivatives(add: bool, from_buffer: bool) -> None:
    model = _double(ScatteredAtIds(add, from_buffer))
    generator = torch.Generator().manual_seed(15)
    x = torch.stack([torch.randperm(VOCAB, generator=generator)[:LENGTH] for _ in range(3)])  # no repeats: one write
    if add:
        x[1, 1:3] = x[1, 0]  # repeated ids add up
    kernel = torchntk.ntk(model, x, implementation="structured_derivatives")
    torch.testing.assert_close(kernel, oracle(model, (x,), None), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("example", (0, 1))
def test_scatter_at_a_repeated_id_is_refused_by_structured_derivatives(example: int) -> None:
    """torch's backward gives each of two writes at one id its gradient, the forward keeps one: the conversion's
    checks refuse, on the first example or on every example (a repeat in the second, past the first's check)."""
    model = _double(ScatteredAtIds(False, False))
    generator = torch.Generator().manual_seed(16)
    x = torch.stack([torch.randperm(VOCAB, generator=generator)[:LENGTH] for _ in range(3)])
    x[example, 1] = x[example, 0]
    with pytest.raises(ConversionError, match="a repeated index"):
        torchntk.ntk(model, x, implementation="structured_derivatives")


def test_transformer_fast_path_with_nested_tensors() -> None:
    """nn.TransformerEncoder's no-grad fast path makes nested tensors in the probe's forward, which the watch of
    backward conventions read the shape of (a raw "NestedTensorImpl doesn't support sizes")."""

    class Nested(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(VOCAB, 8)
            layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
            self.head = nn.Linear(8, 2)

        def forward(self, ids: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
            return self.head(self.encoder(self.embed(ids), src_key_padding_mask=padding)[:, 0])

    torch.manual_seed(0)
    model = Nested().eval()
    padding = torch.zeros(4, LENGTH, dtype=torch.bool)
    padding[1, 3:], padding[2, 4:] = True, True
    x = (_ids(4, 15), padding)
    want = oracle(model.double(), x, None).float()
    model.float()
    for method in ("jacobian_contraction", "ntk_vector_products"):
        torch.testing.assert_close(torchntk.ntk(model, x, implementation=method), want, atol=1e-5, rtol=1e-4)


class TwoLookups(nn.Module):
    """One table looked up with padding_idx=0 and, for a second input, without: row 0 is trained by the second."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 3, padding_idx=0)
        self.head = nn.Linear(3, 2)

    def forward(self, ids: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        looked_up = self.embed(ids) + nn.functional.embedding(other, self.embed.weight)
        return self.head(torch.tanh(looked_up).mean(1))


def test_a_padded_table_looked_up_again_without_padding_is_refused_by_forward_mode() -> None:
    """Second round: the other lookup of the same table was not counted as a read (NTK-vector products 0.097 off)."""
    model = _double(TwoLookups())
    with torch.no_grad():
        model.embed.weight[0].normal_()
    x = (_ids(3, 16), _ids(3, 17))
    with pytest.raises(UnsupportedModelError, match="padding_idx"):
        torchntk.ntk(model, x, implementation="ntk_vector_products")
    kernel = torchntk.ntk(model, x, implementation="auto")
    torch.testing.assert_close(kernel, oracle(model, x, None), atol=1e-12, rtol=1e-10)


class WrittenConstants(nn.Module):
    """Index writes of constants and adding writes: consistent in both directions (forward mode is kept)."""

    def forward_parts(self, h: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        h = h.clone()
        h[:, torch.tensor([0, 0, 2])] = 0.0  # repeated columns, a constant
        h[torch.arange(h.shape[0]), label] = 0.0
        one_hot = torch.zeros_like(h).scatter_(1, label[:, None], torch.ones(h.shape[0], 1, dtype=h.dtype))
        added = torch.zeros_like(h).index_put((torch.arange(h.shape[0]), label), h[:, 1], accumulate=True)
        return h * one_hot + h + added

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.forward_parts(self.inner(x), label)))


def test_index_writes_of_constants_keep_forward_mode() -> None:
    model = _double(WrittenConstants())
    x = (
        torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(18)),
        torch.tensor([1, 3, 3, 0]),
    )
    kernel = torchntk.ntk(model, x, implementation="ntk_vector_products")
    torch.testing.assert_close(kernel, oracle(model, x, None), atol=1e-12, rtol=1e-10)


class TiedMaximum(nn.Module):
    """``max()`` over each example's features: torch's backward spreads a tie, forward mode picks one entry."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))
        self.mix = nn.Parameter(0.5 * torch.randn(4, 4, generator=torch.Generator().manual_seed(19)))
        self.out = nn.Parameter(torch.randn(2, 4, generator=torch.Generator().manual_seed(20)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * self.scale
        return (h @ self.mix + torch.stack([row.max() for row in h])[:, None]) @ self.out.T


def test_one_tie_among_forty_float32_examples_is_not_diluted() -> None:
    """Second round: the whole-chunk check compared one sum, where a float32 example's error was diluted by 39
    others (NTK-vector products 0.097 off); each example is now weighed by its own size."""
    model = TiedMaximum()
    x = torch.rand(40, 4, generator=torch.Generator().manual_seed(21)) * 1.5 + 0.1
    x[30] = 2.0
    with pytest.raises(UnsupportedModelError, match="a tile of 40 examples"):
        torchntk.ntk(model, x, implementation="ntk_vector_products")
    want = oracle(copy.deepcopy(model).double(), (x.double(),), None)
    torch.testing.assert_close(torchntk.ntk(model, x).double(), want, atol=1e-4, rtol=1e-4)


class ScaledWrites(nn.Module):
    """``y[rows, ids] = h`` and a per-example output scale: one example 300× larger than the others."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Linear(1, 2)
        self.head = nn.Linear(6 * 2, 2)

    def forward(self, ids: torch.Tensor, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        y = torch.zeros(ids.shape[0], 6, 2, dtype=x.dtype)
        y[torch.arange(ids.shape[0])[:, None], ids] = self.features(x[..., None])
        return self.head(torch.tanh(y).flatten(1)) * scale


def test_a_later_examples_conversion_error_is_not_hidden_by_a_larger_example() -> None:
    """Second round: the every-example check compared the chunk's sum to its largest example: a duplicate id's
    derivative (the backward gives both writes a gradient, the conversion one) passed beside an example 300× larger
    (3e-2 off); each example is now weighed by its own size."""
    torch.manual_seed(0)
    model = ScaledWrites().eval()
    ids = torch.tensor([[0, 1, 2], [3, 4, 5], [5, 0, 3], [4, 1, 4]])  # example 3 writes row 4 twice
    scale = torch.ones(4, 1)
    scale[0] = 300.0
    x = (ids, torch.randn(4, 3, generator=torch.Generator().manual_seed(22)), scale)
    with pytest.raises(ConversionError, match="derivatives"):
        torchntk.ntk(model, x, implementation="structured_derivatives")


def test_uint64_ids_beyond_32_bits_are_refused_by_structured_derivatives() -> None:
    class Unsigned(HashedIds):
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return super().forward(ids.long())  # torch has no remainder of uint64

    model = Unsigned().eval()
    ids = torch.tensor([[1, 2], [3, 4], [5, 2**33 + 5]], dtype=torch.uint64)
    with pytest.raises(ConversionError, match="uint64 input holds values beyond the 32-bit range"):
        torchntk.ntk(model, ids, implementation="structured_derivatives")


class ProductOfRepeated(nn.Module):
    """``scatter_reduce(..., "prod")`` into a repeated index: its backward reads ``.data`` where a factor is zero."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Parameter(0.5 * torch.randn(4, 4, generator=torch.Generator().manual_seed(23)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x @ self.mix
        return h.scatter_reduce(1, torch.tensor([[0, 0]]).expand(x.shape[0], 2), h[:, :2], "prod")


def test_a_backward_reading_data_under_vmap_runs_one_example_at_a_time() -> None:
    """A raw "accessing `data` under vmap transform" escaped Jacobian contraction and auto."""
    model = ProductOfRepeated().double()
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(24))
    x[2] = 0.0
    for method in ("jacobian_contraction", "auto"):
        torch.testing.assert_close(torchntk.ntk(model, x, implementation=method), oracle(model, (x,), None))


class FrozenThird(nn.Module):
    """A frozen float64 vector holding float32(1/3) and a ``full_like(h, 1/3)`` the export folds in float32: the same
    values, only the second a rounded constant."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(3, 4)
        self.frozen = nn.Parameter(torch.full((4,), 1 / 3, dtype=torch.float32).double(), requires_grad=False)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inner(x))
        return self.head(h * self.frozen + h * torch.full_like(h, 1 / 3))


def test_a_rounded_constant_equal_to_a_frozen_weight_is_still_refused() -> None:
    model = _double(FrozenThird())
    with pytest.raises(ConversionError, match="float32 rounding"):
        torchntk.ntk(model, torch.randn(3, 3, dtype=torch.float64), implementation="structured_derivatives")


def test_conversion_cache_keys_follow_torchntk_source(monkeypatch) -> None:
    """An entry exported by other torchntk code (before an export-time refusal existed) is another key."""
    from torchntk.converters import cache

    model, x = _double(Bag()), _ids(2, 25)
    names = [n for n, _ in model.named_parameters()]
    before = cache.fingerprint(model, (x,), names, "onnx-jax")
    monkeypatch.setattr(cache, "_source_digest", lambda: "other source")
    cache.tool_versions.cache_clear()
    try:
        assert cache.fingerprint(model, (x,), names, "onnx-jax") != before
    finally:
        monkeypatch.undo()
        cache.tool_versions.cache_clear()
    assert cache.fingerprint(model, (x,), names, "onnx-jax") == before


class ThreeTables(nn.Module):
    """Three tables of one shape (their pairs of uses are contracted stacked) and a tied output head (an indexed
    use paired with a dense one)."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second, self.third = (nn.Embedding(VOCAB, 4) for _ in range(3))
        self.head = nn.Linear(4, VOCAB, bias=False)
        self.head.weight = self.first.weight

    def forward(self, ids: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.first(ids) + self.second(other) + self.third(ids)).mean(1)
        return self.head(h)[:, :3]


@pytest.mark.parametrize("axes", ({}, {"trace_axes": (-1,)}, {"diagonal_axes": (0,)}))
def test_lookups_contracted_by_their_indices(axes: dict) -> None:
    """Structured derivatives keep a lookup's one-hot Jacobian as its indices and contract two lookups by the
    equality of their ids (tokens × tokens, where the one-hots were tokens × vocabulary: 14.5× NTK-vector products'
    time at 30,522 ids, 0.14× after): stacked tables, a tied head, a batch axis shared by both sides."""
    model = _double(ThreeTables())
    x1 = (_ids(3, 26), _ids(3, 27))
    x2 = x1 if "diagonal_axes" in axes else (_ids(2, 28), _ids(2, 29))
    want = torchntk.ntk(model, x1, x2, implementation="jacobian_contraction", **axes)
    torch.testing.assert_close(
        torchntk.ntk(model, x1, x2, implementation="structured_derivatives", **axes), want, atol=1e-12, rtol=1e-10
    )
    if not axes:
        torch.testing.assert_close(want, oracle(model, x1, x2), atol=1e-12, rtol=1e-10)


class RelativeBias(nn.Module):
    """A table of 5 rows read at 36 constant positions (swin's relative position bias): more positions than rows,
    where the one-hots (positions × rows) are smaller than the equality of positions (positions²)."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(5, 2))
        self.register_buffer("position", torch.arange(36) % 5)
        self.mix = nn.Linear(3, 36)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.table[self.position]  # (36, 2)
        return torch.tanh(self.mix(x)) @ bias


def test_a_table_read_at_more_positions_than_rows() -> None:
    model = _double(RelativeBias())
    x = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(30))
    kernel = torchntk.ntk(model, x, implementation="structured_derivatives")
    torch.testing.assert_close(kernel, oracle(model, (x,), None), atol=1e-12, rtol=1e-10)


def test_one_table_read_three_times_takes_the_smaller_operand(private_cache) -> None:
    """Third round: with the pairs of uses stacked (one table read 3 times: 9 pairs), the stack's axis was counted
    twice in the equality's size and the larger one-hots were built (values right, time not)."""
    from torchntk.bridge import mjjmp

    class Thrice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(VOCAB, 3)
            self.head = nn.Linear(3, 2)

        def forward(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.embed(a) + self.embed(b) * self.embed(c)).mean(1))

    chosen = []
    original = mjjmp._indexed_terms

    def spy(*args: object) -> object:
        terms, operands = original(*args)
        chosen.append(len(terms))  # one term: the equality; two: the one-hots
        return terms, operands

    model = _double(Thrice())
    x = tuple(_ids(2, 31 + i)[:, :3] for i in range(3))
    mjjmp._indexed_terms = spy
    try:
        kernel = torchntk.ntk(model, x, implementation="structured_derivatives")
    finally:
        mjjmp._indexed_terms = original
    torch.testing.assert_close(kernel, oracle(model, x, None), atol=1e-12, rtol=1e-10)
    assert chosen and set(chosen) == {1}


def test_scatter_reductions_onnx_jax_cannot_take_are_refused_with_the_fix() -> None:
    """Found in a second probing round: scatter_reduce('amax') reached the user as a raw UnsupportedOnnxOp naming no
    fix (raised while tracing, past the route's own error handling); auto falls back."""

    class MaxAtIds(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Parameter(torch.randn(VOCAB, 2))
            self.head = nn.Linear(VOCAB * 2, 2)

        def forward(self, ids):
            h = torch.tanh(self.table[ids])
            where = ids[..., None].expand(-1, -1, 2)
            slots = torch.zeros(ids.shape[0], VOCAB, 2, dtype=h.dtype).scatter_reduce(1, where, h, "amax")
            return self.head(slots.flatten(1))

    model = _double(MaxAtIds())
    x = torch.stack([torch.randperm(VOCAB, generator=torch.Generator().manual_seed(i))[:LENGTH] for i in range(3)])
    with pytest.raises(ConversionError, match="reduction=.max.*jacobian_contraction"):
        torchntk.ntk(model, x, implementation="structured_derivatives")
    torch.testing.assert_close(torchntk.ntk(model, x), oracle(model, (x,), None), atol=1e-12, rtol=1e-10)


def test_scatter_smaller_index_than_src_through_structured_derivatives() -> None:
    """torch allows index.size(d) <= src.size(d); the ScatterElements handler reshaped all of src (a raw error)."""

    class Smaller(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 6)
            self.head = nn.Linear(6, 2)

        def forward(self, x):
            h = torch.tanh(self.lin(x))  # (N, 6)
            src = torch.ones(x.shape[0], 3, 4, dtype=x.dtype)  # larger than the index on the last axis
            index = torch.tensor([[[0, 2], [1, 3], [5, 4]]]).expand(x.shape[0], 3, 2)
            return self.head(h + torch.zeros(x.shape[0], 3, 6, dtype=x.dtype).scatter(2, index, src).sum(1) * h)

    model = _double(Smaller())
    x = torch.randn(3, 4, dtype=torch.float64)
    kernel = torchntk.ntk(model, x, implementation="structured_derivatives")
    torch.testing.assert_close(kernel, oracle(model, (x,), None), atol=1e-12, rtol=1e-10)
