"""to_jax on the onnx-tf route: fidelity, parameter selection, cache, isolation (network, PATH, env) and errors."""

from __future__ import annotations

import os
import socket
import time

import jax
import numpy as np
import pytest
import torch
from _converters_testlib import check_fidelity, rel_err
from _zoo import TiedAutoencoder, TwoInputs
from torch import nn

from torchntk.converters import ConversionError, clear_memory_cache, onnx2tf_compat, to_jax
from torchntk.converters import cache as conv_cache


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test gets an empty disk cache under tmp_path and an empty memory cache: never the real home."""
    monkeypatch.setenv("TORCHNTK_CACHE_DIR", str(tmp_path / "cache"))
    clear_memory_cache()
    yield
    clear_memory_cache()


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 3)).eval()


def cnn_bn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1, groups=2),  # grouped
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),  # depthwise
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )
    with torch.no_grad():  # non-trivial running statistics, so the baked buffers matter
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_mlp_fidelity():
    jm, err = check_fidelity(mlp(), (torch.randn(4, 6),))
    assert jm.route == "onnx-tf"
    assert jm.param_names == tuple(n for n, _ in mlp().named_parameters())
    assert jm.input_shapes == ((6,),) and jm.output_shape == (3,)
    assert {"export", "onnx2tf", "tf2jax"} <= set(jm.timings)


def test_cnn_batchnorm_fidelity_and_vmap():
    model = cnn_bn()
    x = torch.randn(3, 3, 8, 8)
    jm, _ = check_fidelity(model, (x,))
    batched = jax.vmap(lambda xi: jm.fn(jm.params, xi))(jax.numpy.asarray(x.numpy()))
    assert rel_err(batched, model(x).detach().numpy()) <= 1e-5


def test_param_selection_list_dict_and_tied():
    model = mlp()
    jm, _ = check_fidelity(model, (torch.randn(2, 6),), params=["2.weight", "0.bias"])
    assert jm.param_names == ("0.bias", "2.weight")  # named_parameters() order, whatever the caller's order

    new_w = torch.randn(16, 16)
    jm = to_jax(model, (torch.randn(2, 6),), params={"2.weight": new_w})
    np.testing.assert_array_equal(np.asarray(jm.params["2.weight"]), new_w.numpy())

    tied = TiedAutoencoder().eval()
    jm, _ = check_fidelity(tied, (torch.randn(2, 4),))
    assert jm.param_names == tuple(n for n, _ in tied.named_parameters())  # shared parameters once
    assert "shared.weight" not in jm.param_names


def test_two_inputs():
    torch.manual_seed(0)
    jm, _ = check_fidelity(TwoInputs().eval(), (torch.randn(2, 4), torch.randn(2, 2)))
    assert jm.input_shapes == ((4,), (2,))


def test_cache_second_conversion_fast_and_new_weights_without_reconversion():
    model = cnn_bn()
    x = torch.randn(2, 3, 8, 8)
    t = time.perf_counter()
    first = to_jax(model, (x,))
    t_first = time.perf_counter() - t
    with torch.no_grad():
        model[0].weight.mul_(-2.0)  # a training step: new weight values, same architecture
    t = time.perf_counter()
    second = to_jax(model, (x,))
    t_second = time.perf_counter() - t
    assert "cache" in second.timings and "export" not in second.timings
    assert t_second * 20 <= t_first, (t_first, t_second)
    x0 = jax.numpy.asarray(x[0].numpy())
    want = model(x[:1])[0].detach().numpy()
    assert rel_err(second.fn(second.params, x0), want) <= 1e-5
    assert rel_err(first.fn(first.convert_params(model), x0), want) <= 1e-5  # same function, new values


def test_changed_buffer_reconverts():
    model = cnn_bn()
    x = torch.randn(2, 3, 8, 8)
    to_jax(model, (x,))
    with torch.no_grad():
        model[1].running_mean.add_(1.0)  # buffers are baked constants: a stale conversion would be wrong
    jm = to_jax(model, (x,))
    assert "cache" not in jm.timings
    assert rel_err(jm.fn(jm.params, jax.numpy.asarray(x[0].numpy())), model(x[:1])[0].detach().numpy()) <= 1e-5


def test_disk_cache_reuse_corrupt_and_stale_entries():
    model = mlp()
    x = torch.randn(2, 6)
    to_jax(model, (x,))
    key = conv_cache.fingerprint(model, (x,), tuple(n for n, _ in model.named_parameters()), "auto")
    path = conv_cache.entry_path(key)
    assert path.is_file() and conv_cache.read_entry(key) is not None
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp-")]  # atomic write left no temp file

    clear_memory_cache()
    jm = to_jax(model, (x,))
    assert "disk_cache" in jm.timings and "export" not in jm.timings

    older = (f'"format": {conv_cache.FORMAT}'.encode(), f'"format": {conv_cache.FORMAT - 1}'.encode())
    for damage in (lambda b: b[: len(b) // 2], lambda b: b.replace(*older), lambda b: b"x"):
        path.write_bytes(damage(path.read_bytes()))
        assert conv_cache.read_entry(key) is None
        clear_memory_cache()
        jm = to_jax(model, (x,))
        assert "export" in jm.timings  # rebuilt ...
        assert conv_cache.read_entry(key) is not None  # ... and the entry is valid again
        assert rel_err(jm.fn(jm.params, jax.numpy.asarray(x[0].numpy())), model(x[:1])[0].detach().numpy()) <= 1e-5


def test_other_input_shape_new_conversion_and_clear_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    jm8 = to_jax(model, (torch.randn(2, 3, 8, 8),))
    with pytest.raises(ValueError, match=r"call to_jax again"):
        jm8.fn(jm8.params, jax.numpy.zeros((3, 10, 10)))
    with pytest.raises(ValueError, match=r"no batch axis"):
        jm8.fn(jm8.params, jax.numpy.zeros((1, 3, 8, 8)))
    jm10 = to_jax(model, (torch.randn(2, 3, 10, 10),))
    assert "cache" not in jm10.timings and jm10.input_shapes == ((3, 10, 10),)


class _AllInputsLookLikeImages(nn.Module):
    """Every graph input is 4-D, ends in 3 and has the same leading size: onnx2tf's calibration-download trigger."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 3, padding=1, bias=False)  # weight (1, 3, 3, 3), input (1, 3, 5, 3)

    def forward(self, x):
        return self.conv(x).flatten(1)


def test_no_network_no_path_env_restored(monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise AssertionError("a converter tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setenv("PATH", "")  # onnx2tf runs onnxsim / nvidia-smi by bare name: nothing may depend on it
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # onnx2tf sets it to -1 for the whole process
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    calls = []
    stub = onnx2tf_compat._no_download
    monkeypatch.setattr(onnx2tf_compat, "_no_download", lambda: calls.append(1) or stub())
    torch.manual_seed(0)
    check_fidelity(_AllInputsLookLikeImages().eval(), (torch.randn(2, 3, 5, 3),))
    assert calls, "the download trigger was not exercised"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"
    assert os.getcwd() == str(work) and not list(work.iterdir())  # nothing written next to the user


def test_training_mode_is_refused():
    with pytest.raises(ConversionError, match=r"model\.eval\(\)"):
        to_jax(mlp().train(), (torch.randn(2, 6),))


class _Twice(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, g):
        return 2 * g


class _CustomAct(nn.Module):
    def forward(self, x):
        return _Twice.apply(x)


def test_custom_autograd_function_is_refused():
    model = nn.Sequential(nn.Linear(3, 3), _CustomAct()).eval()
    with pytest.raises(ConversionError, match=r"'1'.*custom autograd Function '_Twice'"):
        to_jax(model, (torch.randn(2, 3),))


class _Detached(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return self.lin(x) * self.lin(x).detach()


def test_stop_gradient_is_refused():
    with pytest.raises(ConversionError, match=r"detach\(\).*ONNX has no stop-gradient"):
        to_jax(_Detached().eval(), (torch.randn(2, 3),))


class _TwoOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return self.lin(x), x


def test_several_outputs_refused():
    with pytest.raises(ConversionError, match=r"single tensor"):
        to_jax(_TwoOutputs().eval(), (torch.randn(2, 3),))


def test_float64_refused_on_onnx_tf():
    model = mlp().double()
    with pytest.raises(ConversionError, match=r"float64.*route='onnx-jax'"):
        to_jax(model, (torch.randn(2, 6, dtype=torch.float64),), route="onnx-tf")


def test_float64_auto_falls_back_to_onnx_jax():
    pytest.importorskip("torchntk.converters.onnx_jax")
    model = mlp().double()
    x = torch.randn(2, 6, dtype=torch.float64)
    jm = to_jax(model, (x,))  # route="auto": onnx-tf refuses float64, onnx-jax takes it
    assert jm.route == "onnx-jax" and jm.x64
    assert all(p.dtype == np.float64 for p in jm.params.values())
    # A numpy input: jnp.asarray outside an x64 scope would already have rounded it to float32.
    y = jm.fn(jm.params, x[0].numpy())  # no global x64 needed by the caller
    assert y.dtype == np.float64
    assert rel_err(y, model(x[:1])[0].detach().numpy()) <= 1e-12
    assert not jax.config.jax_enable_x64  # the user's process is left as it was


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"route must be"):
        to_jax(mlp(), (torch.randn(2, 6),), route="tf")
    with pytest.raises(ConversionError, match=r"not a parameter"):
        to_jax(mlp(), (torch.randn(2, 6),), params=["nope"])
    with pytest.raises(ConversionError, match=r"batch axis"):
        to_jax(mlp(), (torch.randn(2, 6)[0, 0],))
    with pytest.raises(ConversionError, match=r"same shape and dtype"):
        to_jax(mlp(), (torch.randn(2, 6),), params={"0.weight": torch.zeros(3)})
