"""Token-id inputs: the NTK of a small transformer text classifier by each method, side by side in one process
(medians, ``_common.timed_side_by_side``; the first call, conversion and compile included for structured
derivatives, is the warm-up), with what ``torchntk.explain`` predicted and chose.

The model: ``nn.Embedding(V, 64)`` plus learned positions, two ``nn.TransformerEncoderLayer`` (4 heads, feed-forward
128, a boolean padding mask as the second input), mean over tokens, ``nn.Linear(64, O)``; T = 32 tokens, N = 8
examples, the kernel of x against itself. V = 1,000 and V = 30,522 (BERT's vocabulary: the embedding is 95% of
the parameters).

    python benchmarks/tokens.py  # about four minutes on 2 cores; results/tokens.json and tokens.png
    python benchmarks/tokens.py --plot-only  # the plot from the committed JSONs
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _common import RESULTS, machine, timed_side_by_side, write_json
from torch import nn

import torchntk

LENGTH, WIDTH, EXAMPLES = 32, 64, 8
METHODS = ("jacobian_contraction", "ntk_vector_products", "structured_derivatives")


class TextClassifier(nn.Module):
    def __init__(self, vocabulary: int, outputs: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, WIDTH)
        self.position = nn.Parameter(0.02 * torch.randn(LENGTH, WIDTH))
        layer = nn.TransformerEncoderLayer(WIDTH, 4, 128, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(WIDTH, outputs)

    def forward(self, ids: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(self.embed(ids) + self.position, src_key_padding_mask=padding)
        keep = (~padding).unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * keep).sum(1) / keep.sum(1))


def _case(vocabulary: int, outputs: int, trace: bool) -> dict:
    torch.manual_seed(0)
    model = TextClassifier(vocabulary, outputs).eval()
    ids = torch.randint(1, vocabulary, (EXAMPLES, LENGTH))
    lengths = torch.randint(LENGTH // 2, LENGTH + 1, (EXAMPLES,))
    padding = torch.arange(LENGTH) >= lengths[:, None]
    x = (ids, padding)
    axes = {"trace_axes": (-1,)} if trace else {}
    explanation = torchntk.explain(model, x, **axes)
    calls = {m: (lambda m=m: torchntk.ntk(model, x, implementation=m, **axes)) for m in METHODS}
    kernels, first_call_s = {}, {}
    for m, call in calls.items():  # structured derivatives' first call converts and compiles
        start = time.perf_counter()
        kernels[m] = call()
        first_call_s[m] = time.perf_counter() - start
    reference = kernels["jacobian_contraction"]
    agreement = {m: float((k - reference).abs().max() / reference.abs().max()) for m, k in kernels.items()}
    times = timed_side_by_side(calls, {})
    best = min(("jacobian_contraction", "ntk_vector_products"), key=lambda m: times[m]["median_s"])
    return {
        "vocabulary": vocabulary,
        "outputs": outputs,
        "trace_axes": list(axes.get("trace_axes", ())),
        "parameters": sum(p.numel() for p in model.parameters()),
        "times": times,
        "first_call_s": first_call_s,
        "sd_over_best_torch_native": times["structured_derivatives"]["median_s"] / times[best]["median_s"],
        "relative_difference_from_jc": agreement,
        "explain_choice": explanation.choice,
        "explain_estimates": [
            {"implementation": e.implementation, "seconds": e.seconds, "memory_bytes": e.memory_bytes}
            for e in explanation.estimates
        ],
    }


def plot(after: Path, before: Path | None, path: Path) -> None:
    """Median time per call of each method and case, structured derivatives' one-hot run beside (``before``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = json.loads(after.read_text())["cases"]
    earlier = {}
    if before is not None and before.exists():
        earlier = {(c["vocabulary"], c["outputs"]): c for c in json.loads(before.read_text())["cases"]}
    labels = [f"V={c['vocabulary']:,}\nO={c['outputs']}{' traced' if c['trace_axes'] else ''}" for c in cases]
    series = {m: [c["times"][m]["median_s"] * 1e3 for c in cases] for m in METHODS}
    series["structured_derivatives (one-hot, before)"] = [
        earlier[(c["vocabulary"], c["outputs"])]["times"]["structured_derivatives"]["median_s"] * 1e3
        if (c["vocabulary"], c["outputs"]) in earlier
        else float("nan")
        for c in cases
    ]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(series)
    for k, (name, values) in enumerate(series.items()):
        ax.bar([i + k * width for i in range(len(cases))], values, width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))], labels)
    ax.set_yscale("log")
    ax.set_ylabel("ms per call (median)")
    ax.set_title("Transformer text classifier, T = 32, N = 8: NTK by each method")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(RESULTS / "tokens.json"))
    parser.add_argument("--vocabularies", type=int, nargs="+", default=[1000, 30522])
    parser.add_argument("--plot-only", action="store_true", help="render the plot from --out (and the one-hot run)")
    args = parser.parse_args()
    before = RESULTS / "tokens_onehot_before.json"
    if args.plot_only:
        plot(Path(args.out), before, Path(args.out).with_suffix(".png"))
        return
    torch.set_num_threads(2)
    measured_on = machine()
    cases = [_case(v, o, trace) for v in args.vocabularies for o, trace in ((2, False), (10, True))]
    write_json(
        Path(args.out), {"machine": measured_on, "load_average_after": machine()["load_average"], "cases": cases}
    )
    plot(Path(args.out), before, Path(args.out).with_suffix(".png"))
    for case in cases:
        medians = {m: round(t["median_s"] * 1e3, 1) for m, t in case["times"].items()}
        first = {m: round(t, 2) for m, t in case["first_call_s"].items()}
        print(case["vocabulary"], case["outputs"], case["trace_axes"], "ms:", medians, "first s:", first)
        print("   SD/best:", round(case["sd_over_best_torch_native"], 2), "explain:", case["explain_choice"])
        print("   agreement:", case["relative_difference_from_jc"])


if __name__ == "__main__":
    main()
