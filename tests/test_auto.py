"""implementation="auto": the choice, its cache, explain(), and the fallback when conversion fails."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
from _oracle import oracle_ntk
from torch import nn

import torchntk
from torchntk import _auto as auto_module
from torchntk.converters import ConversionError


class _Square(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad

    @staticmethod
    def jvp(ctx, tangent):
        (x,) = ctx.saved_tensors
        return 2 * x * tangent


class CustomFunctionModel(nn.Module):
    """A custom autograd Function: the converter cannot export it."""

    def __init__(self, width: int = 64, outputs: int = 64):
        super().__init__()
        self.a = nn.Linear(8, width)
        self.b = nn.Linear(width, outputs)

    def forward(self, x):
        return self.b(_Square.apply(torch.tanh(self.a(x))))


def fcn(width: int, outputs: int, depth: int = 3) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width, bias=False), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, outputs, bias=False))


@pytest.fixture(autouse=True)
def fresh_auto_state(monkeypatch):
    """Each test starts with no cached choice and no torch-native seconds counted towards a conversion."""
    for name in ("_CHOICES", "_NATIVE", "_SPENT", "_FAILED"):
        monkeypatch.setattr(auto_module, name, {})


def test_tiny_model_few_examples_many_outputs_is_torch_native():
    """Table 1: one example, O=512 — Jacobian contraction's O²·P term loses to O JVPs (measured 157 vs 38 ms)."""
    torchntk.ntk(nn.Linear(2, 2), torch.randn(1, 2), implementation="ntk_vector_products")  # JVPs' one-time import
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 512))
    explanation = torchntk.explain(model, torch.randn(1, 16))
    assert explanation.choice == "ntk_vector_products"
    assert {e.implementation for e in explanation.estimates} == {"jacobian_contraction", "ntk_vector_products"}
    # not converted: auto waits for the conversion and its compilation to pay off
    assert explanation.conversion_seconds + explanation.compile_seconds > 1.0
    assert "waits until torch-native runs" in explanation.reason


def test_first_forward_mode_ad_of_the_process_is_costed(monkeypatch):
    """NTK-vector products' first JVP in a process imports torch's JVP decompositions (0.25 s): counted until then."""
    torchntk.ntk(nn.Linear(2, 2), torch.randn(1, 2), implementation="ntk_vector_products")
    model, x = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 512)), torch.randn(1, 16)
    loaded = {e.implementation: e.seconds for e in torchntk.explain(model, x).estimates}
    monkeypatch.delitem(sys.modules, auto_module._JVP_MODULE)
    auto_module._NATIVE.clear()
    fresh = {e.implementation: e.seconds for e in torchntk.explain(model, x).estimates}
    assert fresh["ntk_vector_products"] == pytest.approx(loaded["ntk_vector_products"] + 0.25)
    assert fresh["jacobian_contraction"] == pytest.approx(loaded["jacobian_contraction"])


def test_few_outputs_many_examples_is_jacobian_contraction():
    model = nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 1))
    assert torchntk.explain(model, torch.randn(32, 8)).choice == "jacobian_contraction"


def test_wide_fcn_with_many_outputs_is_structured():
    """One call long enough to pay for the conversion at once: NTK-vector products would take ~30 s."""
    torch.manual_seed(0)
    model = fcn(1024, 100)
    x = torch.randn(32, 1024)
    explanation = torchntk.explain(model, x)
    assert explanation.choice == "structured_derivatives", explanation
    assert explanation.route in ("onnx-tf", "onnx-jax")
    assert explanation.conversion_seconds is None
    assert torchntk.explain(model, x) is explanation  # cached per architecture and shapes
    # Converted now: two examples are costed with structured derivatives too, no waiting.
    assert "structured_derivatives" in {e.implementation for e in torchntk.explain(model, x[:2]).estimates}
    kernel = torchntk.ntk(model, x[:2], trace_axes=(-1,))
    reference = torchntk.ntk(model, x[:2], trace_axes=(-1,), implementation="jacobian_contraction")
    assert torch.allclose(kernel, reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())


def test_conversion_waits_until_torch_native_runs_have_taken_as_long(monkeypatch):
    """Ski rental: short calls run torch-native and count their seconds; the call that brings the sum to the
    conversion's estimate converts, and from then on every method is costed."""
    monkeypatch.setattr(auto_module, "conversion_seconds", lambda problem: 0.3)
    monkeypatch.setattr(auto_module, "compile_seconds", lambda problem: 0.0)
    torch.manual_seed(0)
    model = fcn(8, 4, depth=1).double()
    x = torch.randn(3, 8, dtype=torch.float64)
    expected = oracle_ntk(model, (x,), None)
    first = torchntk.explain(model, x)
    assert first.choice != "structured_derivatives" and first.conversion_seconds == 0.3
    calls = 0
    while torchntk.explain(model, x).conversion_seconds is not None:
        assert calls < 10_000, "auto never converted"
        assert torch.allclose(torchntk.ntk(model, x), expected, rtol=1e-10, atol=1e-12)
        calls += 1
    assert calls > 1  # one call of this tiny model takes milliseconds, far less than 0.3 s
    (spent,) = auto_module._SPENT.values()
    assert 0.3 - max(e.seconds for e in first.estimates) <= spent < 0.3 + 0.5
    final = torchntk.explain(model, x)
    assert final.route == "onnx-jax"  # float64
    assert "structured_derivatives" in {e.implementation for e in final.estimates}
    assert torch.allclose(torchntk.ntk(model, x), expected, rtol=1e-10, atol=1e-12)


def test_converted_model_is_costed_without_waiting():
    torch.manual_seed(0)
    model = fcn(8, 4, depth=1).double()
    x = torch.randn(3, 8, dtype=torch.float64)
    torchntk.ntk(model, x, implementation="structured_derivatives")  # converts
    explanation = torchntk.explain(model, torch.randn(5, 8, dtype=torch.float64))
    assert explanation.conversion_seconds is None
    assert "structured_derivatives" in {e.implementation for e in explanation.estimates}


def test_unconvertible_model_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(auto_module, "conversion_seconds", lambda problem: 0.0)
    monkeypatch.setattr(auto_module, "compile_seconds", lambda problem: 0.0)  # convert even a small model
    torch.manual_seed(0)
    model = CustomFunctionModel(width=16, outputs=5).double()
    x = torch.randn(6, 8, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="falls back to"):
        kernel = torchntk.ntk(model, x)
    expected = oracle_ntk(model, (x,), None)
    assert torch.allclose(kernel, expected, rtol=1e-10, atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the choice is cached: no second warning
        torchntk.ntk(model, x)
        other = torchntk.ntk(model, x[:4])  # another shape of the same model does not try (and warn) again
    assert torch.allclose(other, expected[:4, :4], rtol=1e-10, atol=1e-12)


def test_explicit_structured_never_falls_back():
    model = CustomFunctionModel(width=4, outputs=2)
    with pytest.raises(ConversionError):
        torchntk.ntk(model, torch.randn(2, 8), implementation="structured_derivatives")


def test_auto_skips_methods_that_do_not_fit_in_memory():
    """Many outputs: Jacobian contraction needs 3·O·P bytes per example; NTK-vector products fit by building the
    rows of J(x2) a block of outputs at a time, structured derivatives by output blocks."""
    torch.manual_seed(0)
    model = fcn(64, 500, depth=1)
    x = torch.randn(2, 64)
    budget = 2 * 500 * sum(p.numel() for p in model.parameters()) * 4 // 4  # a quarter of NVP's unblocked pair
    explanation = torchntk.explain(model, x, max_memory=budget)
    jc = next(e for e in explanation.estimates if e.implementation == "jacobian_contraction")
    assert jc.memory_bytes > budget and explanation.choice != "jacobian_contraction", explanation
    kernel = torchntk.ntk(model, x, max_memory=budget, trace_axes=(-1,))
    reference = torchntk.ntk(model, x, implementation="jacobian_contraction", trace_axes=(-1,))
    assert torch.allclose(kernel, reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())
    blocked = torchntk.ntk(model, x, max_memory=budget, implementation="ntk_vector_products", trace_axes=(-1,))
    assert torch.allclose(blocked, reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())
    with pytest.raises(ValueError, match="too small for even one tile"):
        torchntk.ntk(model, x, max_memory=budget, implementation="jacobian_contraction")


def test_when_no_method_fits_auto_says_so_and_refuses_before_any_work(monkeypatch):
    from torchntk.bridge import torch_glue

    torch.manual_seed(0)
    model = fcn(64, 500, depth=1)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="too small for even one tile"):  # below every method's formula
        torchntk.explain(model, x, max_memory=1000)
    # Above structured derivatives' formula (1.04 MB) and below NVP's one output (1.29 MB), and XLA's plan of every
    # structured tile needs more (as for the grouped convolutions of test_sd_memory_plan; this FCN's plan of 4
    # output rows, 1.04 MB, would fit): auto says nothing fits, and the least hungry method refuses.
    monkeypatch.setattr(torch_glue, "tile_memory", lambda programs: 10.0**9)
    explanation = torchntk.explain(model, x, max_memory=1_200_000)
    assert "no method's one-pair tile fits the 1,200,000-byte memory budget" in explanation.reason, explanation
    with pytest.raises(ValueError, match="too small for even one tile"):
        torchntk.ntk(model, x, max_memory=1_200_000)


def test_time_model_constants_are_the_committed_calibration():
    """_SECONDS_PER_TERM is what benchmarks/calibrate_auto.py fitted (results/auto_calibration.json), term by term."""
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "auto_calibration.json"
    fitted = json.loads(path.read_text())["coefficients"]
    for method, constants in auto_module._SECONDS_PER_TERM.items():
        assert constants == pytest.approx(fitted[method], rel=1e-3, abs=1e-15), method
    assert auto_module._FIRST_USE_SECONDS["export"] == pytest.approx(fitted["first_export"][0], rel=1e-2)


def test_torch_native_multiply_adds_follow_table_1():
    """Estimate.flops: Jacobian contraction (N1+N2)·O·3·FP + N²·O²·P, NTK-vector products N·O·3·FP + N²·O·3·FP."""
    model = nn.Sequential(nn.Linear(16, 32, bias=False), nn.Tanh(), nn.Linear(32, 5, bias=False))
    forward = 16 * 32 + 32 * 5  # = P as well
    flops = {e.implementation: e.flops for e in torchntk.explain(model, torch.randn(4, 16)).estimates}
    assert flops["jacobian_contraction"] == 4 * 5 * 3 * forward + 16 * 5 * 5 * forward
    assert flops["ntk_vector_products"] == 4 * 5 * 3 * forward + 16 * 5 * 3 * forward


class ActivatedMLP(nn.Module):
    """One module tree for every activation: only the forward's code reads ``self.kind``."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind, self.hidden, self.head = kind, nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.hidden(x)
        h = torch.fft.fft(h).real if self.kind == "fft" else torch.tanh(h)  # no ONNX/JAX route converts the FFT
        return self.head(h)


def test_a_failure_is_remembered_only_for_its_own_architecture(monkeypatch):
    monkeypatch.setattr(auto_module, "conversion_seconds", lambda problem: 0.0)
    monkeypatch.setattr(auto_module, "compile_seconds", lambda problem: 0.0)
    torch.manual_seed(0)
    x = torch.randn(4, 8, dtype=torch.float64)
    unconvertible = ActivatedMLP("fft").double()
    with pytest.warns(RuntimeWarning, match="falls back to"):
        torchntk.explain(unconvertible, x)
    convertible = ActivatedMLP("tanh").double()  # the same modules and reprs, another forward
    explanation = torchntk.explain(convertible, x)
    assert not explanation.notes and "structured_derivatives" in {e.implementation for e in explanation.estimates}


def test_nan_weights_are_not_remembered_as_the_architectures_failure(monkeypatch):
    monkeypatch.setattr(auto_module, "conversion_seconds", lambda problem: 0.0)
    monkeypatch.setattr(auto_module, "compile_seconds", lambda problem: 0.0)
    torch.manual_seed(0)
    model = fcn(8, 3, depth=1).double()
    x = torch.randn(4, 8, dtype=torch.float64)
    finite = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="NaN|Inf|non-finite|finite"):
        torchntk.explain(model, x)
    model.load_state_dict(finite)
    explanation = torchntk.explain(model, x)
    assert not explanation.notes and "structured_derivatives" in {e.implementation for e in explanation.estimates}
    kernel = torchntk.ntk(model, x, implementation="structured_derivatives")
    assert torch.allclose(kernel, oracle_ntk(model, (x,), None), rtol=1e-10, atol=1e-12)


def test_auto_does_not_convert_a_model_whose_conversion_exceeds_the_memory_budget(monkeypatch):
    """Conversion takes several copies of the model's weights at once: where that exceeds max_memory, auto runs a
    torch-native method (which fits) and never starts the conversion; explain says why and how much."""
    from torchntk.bridge import torch_glue

    started = []

    def no_conversion(*args, **kwargs):
        started.append(True)
        raise RuntimeError("a conversion started")

    monkeypatch.setattr(torch_glue, "structured_cost", no_conversion)
    monkeypatch.setattr(torch_glue, "convert", no_conversion)
    monkeypatch.setattr(auto_module, "conversion_seconds", lambda problem: 0.0)  # would convert at once otherwise
    monkeypatch.setattr(auto_module, "compile_seconds", lambda problem: 0.0)
    torch.manual_seed(0)
    model = fcn(256, 1, depth=2)
    x = torch.randn(3, 256)
    weight_bytes = 4 * sum(p.numel() for p in model.parameters())
    max_memory = 5 * weight_bytes  # one torch-native pair fits (~4 weight copies with its check), conversion (~8) not
    explanation = torchntk.explain(model, x, max_memory=max_memory)
    assert explanation.choice in ("jacobian_contraction", "ntk_vector_products"), explanation
    assert explanation.conversion_bytes == pytest.approx(auto_module._CONVERSION_BYTES_PER_MODEL_BYTE * weight_bytes)
    assert any("host memory" in note and "budget" in note for note in explanation.notes), explanation.notes
    kernel = torchntk.ntk(model, x, max_memory=max_memory)
    expected = oracle_ntk(model, (x,), None)
    assert torch.allclose(kernel, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
    assert not started
    # With room for it, the same model converts (here: starts to, and falls back when that fails).
    with pytest.warns(RuntimeWarning, match="a conversion started"):
        torchntk.explain(model, x, max_memory=100 * weight_bytes)
    assert started


def test_the_host_budget_is_max_memory_on_the_cpu_and_free_ram_beside_an_accelerator(monkeypatch):
    from torchntk import _tiles

    monkeypatch.setattr(_tiles, "free_memory", lambda device: 8_000_000 if device.type == "cpu" else 1)
    assert _tiles.host_memory_budget(torch.device("cpu"), 12345) == 12345
    assert _tiles.host_memory_budget(torch.device("cpu"), None) == 4_000_000
    # Beside an accelerator max_memory bounds the accelerator's memory, not the host's (no GPU needed to ask).
    assert _tiles.host_memory_budget(torch.device("cuda"), 12345) == 4_000_000
