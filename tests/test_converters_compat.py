"""The onnx2tf compatibility layer (torchntk.converters.onnx2tf_compat) on its own: weight inputs of every Conv
kind, LayerNorm scale/bias inputs, MatMul without layout search, and the guards' clean-up."""

from __future__ import annotations

import importlib
import os

import jax
import numpy as np
import pytest
import torch
from _converters_testlib import rel_err
from torch import nn

from torchntk.converters import ConversionError, onnx2tf_compat
from torchntk.converters.onnx_export import export_onnx
from torchntk.converters.onnx_tf import onnx_tf_to_jax


def convert_and_compare(model: nn.Module, *inputs: torch.Tensor) -> None:
    """ONNX export -> onnx-tf route (no to_jax safety net), compared with torch: output and weight VJP."""
    model = model.eval()
    model(*inputs)  # materialise lazy layers
    names = [n for n, _ in model.named_parameters()]
    g = onnx_tf_to_jax(export_onnx(model, inputs, names))
    params = [jax.numpy.asarray(p.detach().numpy()) for p in model.parameters()]
    xs = [jax.numpy.asarray(x[:1].numpy()) for x in inputs]
    y, vjp = jax.vjp(lambda *p: g(*p, *xs)[0], *params)
    out = model(*(x[:1] for x in inputs))
    assert rel_err(y, out.detach().numpy()) <= 1e-5
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    want = torch.autograd.grad(out, list(model.parameters()), cot)
    for name, got, w in zip(names, vjp(jax.numpy.asarray(cot.numpy())), want, strict=True):
        assert rel_err(got, w.numpy()) <= 1e-4, name


CONVS = {
    "plain2d": (nn.Conv2d(4, 6, 3, padding=1), (4, 7, 9)),
    "strided_dilated": (nn.Conv2d(4, 6, 3, stride=2, dilation=2, padding=(2, 1)), (4, 11, 9)),
    "grouped": (nn.Conv2d(4, 6, 3, groups=2), (4, 7, 9)),
    "depthwise": (nn.Conv2d(4, 4, 3, groups=4, padding=1, bias=False), (4, 7, 9)),
    "depthwise_multiplier": (nn.Conv2d(4, 8, 3, groups=4, stride=2), (4, 7, 9)),
    "conv1d_grouped": (nn.Conv1d(4, 6, 3, groups=2, padding=1), (4, 10)),
}


@pytest.mark.parametrize("kind", list(CONVS))
def test_conv_weight_inputs(kind):
    torch.manual_seed(0)
    conv, shape = CONVS[kind]
    convert_and_compare(nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(3)), torch.randn(2, *shape))


def test_conv3d_weight_input_is_refused_with_advice():
    model = nn.Sequential(nn.Conv3d(2, 3, 2), nn.Flatten()).eval()
    x = torch.randn(1, 2, 4, 5, 3)
    with pytest.raises(ConversionError, match=r"(?s)Conv3D.*onnx-jax"):  # tf2jax has no Conv3D
        onnx_tf_to_jax(export_onnx(model, (x,), ["0.weight"]))


class _SquareLinearOnMaps(nn.Module):
    """``MatMul(x, Transpose(W))`` with a square W: onnx2tf's shape-matching Transpose would skip the transpose."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x):
        return self.lin(x.permute(0, 2, 3, 1)).flatten(1)


def test_square_weight_matrix_transpose():
    torch.manual_seed(0)
    convert_and_compare(_SquareLinearOnMaps(), torch.randn(2, 6, 4, 3))


def test_conv_on_a_computed_tensor_after_channel_last_ops():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Conv2d(5, 5, 1, groups=5), nn.Conv2d(5, 2, 2, stride=2))
    convert_and_compare(nn.Sequential(model, nn.Flatten()), torch.randn(2, 3, 9, 9))


class _TokensLayerNorm(nn.Module):
    """LayerNorm straight on a 3-D graph input, then on a tensor onnx2tf holds channel-last (after a conv)."""

    def __init__(self) -> None:
        super().__init__()
        self.ln_in = nn.LayerNorm(8)
        self.conv = nn.Conv2d(3, 8, 2, stride=2)
        self.ln_conv = nn.LayerNorm(8)
        self.head = nn.Linear(8, 2)

    def forward(self, tokens, image):
        a = self.ln_in(tokens)  # (N, 5, 8)
        b = self.conv(image).flatten(2).transpose(1, 2)  # (N, 4, 8)
        return self.head(torch.cat([a, self.ln_conv(b)], dim=1)[:, 0])


def test_layer_norm_scale_bias_inputs():
    torch.manual_seed(0)
    model = _TokensLayerNorm()
    with torch.no_grad():  # non-trivial scale/bias so that a misplaced broadcast shows
        for ln in (model.ln_in, model.ln_conv):
            ln.weight.uniform_(0.5, 1.5)
            ln.bias.uniform_(-0.5, 0.5)
    convert_and_compare(model, torch.randn(2, 5, 8), torch.randn(2, 3, 4, 4))


class _ChannelsLastLayerNorm(nn.Module):
    """convnext's pattern: permute to channels-last, LayerNorm, Linear, permute back."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, groups=3)
        self.ln = nn.LayerNorm(6)
        self.lin = nn.Linear(6, 6)

    def forward(self, x):
        y = self.ln(self.conv(x).permute(0, 2, 3, 1))
        return self.lin(y).permute(0, 3, 1, 2).flatten(1)


def test_layer_norm_channels_last_pattern():
    torch.manual_seed(0)
    convert_and_compare(_ChannelsLastLayerNorm(), torch.randn(2, 3, 6, 5))


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0].flatten(1)


def test_matmul_with_weight_inputs():
    torch.manual_seed(0)
    convert_and_compare(_Attention(), torch.randn(2, 5, 8))


def test_patches_and_environment_are_restored(tmp_path, monkeypatch):
    conv = importlib.import_module("onnx2tf.ops.Conv")
    o2t = importlib.import_module("onnx2tf.onnx2tf")
    before = (conv.make_node, o2t.download_test_image_data, o2t.check_cuda_enabled)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError, match="boom"), onnx2tf_compat.patched_onnx2tf() as tmp:
        assert os.getcwd() == tmp and conv.make_node is not before[0]
        assert o2t.check_cuda_enabled() is False
        assert o2t.download_test_image_data().shape == (20, 128, 128, 3)
        os.environ["CUDA_VISIBLE_DEVICES"] = "-1"  # what onnx2tf does
        raise RuntimeError("boom")
    assert (conv.make_node, o2t.download_test_image_data, o2t.check_cuda_enabled) == before
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    assert os.getcwd() == str(tmp_path) and not os.path.exists(tmp)


def test_float64_graph_is_refused():
    model = nn.Linear(3, 2).double().eval()
    proto = export_onnx(model, (torch.randn(1, 3, dtype=torch.float64),), ["weight", "bias"])
    with pytest.raises(ConversionError, match="float64"):
        onnx_tf_to_jax(proto)


def test_unknown_op_names_op_and_module():
    model = nn.Linear(3, 2).eval()
    proto = export_onnx(model, (torch.randn(1, 3),), ["weight"])
    proto.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(ConversionError, match=r"'NoSuchOp'.*torch module"):
        onnx_tf_to_jax(proto)


def test_channel_last_layout_error_is_explicit():
    with pytest.raises(ConversionError, match="layout"):
        onnx2tf_compat._channel_last(np.zeros((1, 2, 3, 4)), [1, 5, 6, 7], 2)
