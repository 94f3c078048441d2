"""Command line: ``python -m torchntk demo`` (the README's main job)."""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

import torchntk


def _torchvision_model(name: str, classes: int) -> torch.nn.Module:
    import torchvision

    try:
        builder = torchvision.models.get_model_builder(name)
    except ValueError as error:
        known = ", ".join(sorted(torchvision.models.list_models(module=torchvision.models))[:12])
        raise SystemExit(f"unknown --model {name!r} ({error}); try one of: {known}, ...") from None
    torch.manual_seed(0)
    return builder(weights=None, num_classes=classes).eval()


def _model_and_input(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor]:
    """The model and random inputs of the command line; an input size the model cannot take exits with a message."""
    device = torch.device(args.device)
    model = _torchvision_model(args.model, args.classes).to(device)
    torch.manual_seed(1)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    try:
        with torch.no_grad():
            model(x[:1])
    except RuntimeError as error:
        raise SystemExit(
            f"python -m torchntk: error: --model {args.model} cannot take --size {args.size} inputs "
            f"({str(error).splitlines()[0][:200]}); use a larger --size (e.g. 32, or 224)."
        ) from None
    return model, x


def demo(args: argparse.Namespace) -> int:
    """NTK of a torchvision model on random inputs by every method: shape, times, agreement."""
    model, x = _model_and_input(args)
    device = x.device
    methods = list(torchntk.IMPLEMENTATIONS) if args.implementation == "all" else [args.implementation]
    params = sum(p.numel() for p in model.parameters())
    print(f"model {args.model}: {params:,} parameters, {args.classes} outputs; x: {tuple(x.shape)} on {device}")
    kernels = {}
    for method in methods:
        start = time.perf_counter()
        try:
            kernels[method] = torchntk.ntk(model, x, implementation=method)
        except Exception as error:  # the demo reports a method that cannot run here and goes on
            print(f"  {method:24s} failed: {type(error).__name__}: {error}")
            continue
        seconds = time.perf_counter() - start
        line = f"  {method:24s} {seconds:8.2f} s   kernel {tuple(kernels[method].shape)}"
        if method in ("structured_derivatives", "auto"):
            start = time.perf_counter()  # the first call converted the model to JAX and compiled; both are cached
            torchntk.ntk(model, x, implementation=method)
            line += f"   (first call, with conversion; again: {time.perf_counter() - start:.2f} s)"
        print(line)
    if len(kernels) > 1:
        names = list(kernels)
        reference = kernels[names[0]]
        scale = reference.abs().max().item()
        for name in names[1:]:
            diff = (kernels[name] - reference).abs().max().item() / scale
            print(f"  max |{name} - {names[0]}| / max |Θ| = {diff:.2e}")
    return 0 if kernels else 1


def kernel(args: argparse.Namespace) -> int:
    """One NTK of a torchvision model: the auto choice and its estimates, the time, optionally saved to .npy."""
    model, x = _model_and_input(args)
    trace_axes = (-1,) if args.trace else ()
    explanation = torchntk.explain(model, x, trace_axes=trace_axes)
    print(f"model {args.model}, x {tuple(x.shape)}, {args.classes} outputs")
    for estimate in explanation.estimates:
        print(
            f"  estimate {estimate.implementation:24s} {estimate.flops:10.3e} multiply-adds, "
            f"{estimate.seconds:8.3f} s, {estimate.memory_bytes / 2**20:9.1f} MiB per tile"
        )
    if explanation.conversion_seconds is not None:
        print(f"  estimate conversion to JAX (once)  {explanation.conversion_seconds:8.3f} s")
    implementation = explanation.choice if args.implementation == "auto" else args.implementation
    print(f"  auto's choice: {explanation.choice} ({explanation.reason}); running {implementation}")
    out = None
    if args.save:
        import numpy as np

        shape = (args.batch, args.batch, args.classes, args.classes)[: 2 if args.trace else 4]
        dtype = np.float32 if next(model.parameters()).dtype == torch.float32 else np.float64
        out = np.lib.format.open_memmap(args.save, mode="w+", dtype=dtype, shape=shape)
    start = time.perf_counter()
    result = torchntk.ntk(model, x, implementation=args.implementation, trace_axes=trace_axes, out=out)
    print(f"  kernel {tuple(result.shape)} in {time.perf_counter() - start:.2f} s")
    if out is not None:
        out.flush()
        print(f"  saved to {args.save}")
    return 0


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (``--batch 0``, ``--classes -1`` are refused by argparse with this message)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer (1 or more)")
    return value


def torch_device(text: str) -> str:
    """argparse type: a device torch knows and this machine has (``cpu``, ``cuda``, ``cuda:1``)."""
    try:
        device = torch.device(text)
    except RuntimeError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device ({error})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"{text!r}: use cpu, cuda[:index] or mps")
    return text


def save_path(text: str) -> str:
    """argparse type: a ``.npy`` path in an existing, writable directory."""
    if not text.endswith(".npy"):
        raise argparse.ArgumentTypeError(f"{text!r} does not end in .npy (the kernel is saved as a NumPy .npy file)")
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text!r}: the directory {folder} does not exist or is not writable")
    return text


def _model_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("--model", default="resnet18", help="torchvision classification model name (default resnet18)")
    command.add_argument("--batch", type=positive_int, default=4, help="examples N (default 4)")
    command.add_argument("--classes", type=positive_int, default=10, help="outputs O (default 10)")
    command.add_argument("--size", type=positive_int, default=32, help="input height and width (default 32)")
    command.add_argument("--device", type=torch_device, default="cpu", help="torch device (default cpu)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torchntk", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("demo", help="the NTK of a torchvision model by every method, with times")
    _model_arguments(run)
    run.add_argument(
        "--implementation", default="all", choices=["all", "auto", *torchntk.IMPLEMENTATIONS], help="default all"
    )
    run.set_defaults(handler=demo)
    one = commands.add_parser("ntk", help="one NTK: auto's choice and estimates, the time, optionally saved")
    _model_arguments(one)
    one.add_argument("--implementation", default="auto", choices=["auto", *torchntk.IMPLEMENTATIONS])
    one.add_argument("--trace", action="store_true", help="average over the outputs (trace_axes=(-1,))")
    one.add_argument(
        "--save", type=save_path, metavar="PATH.npy", help="write the kernel to a .npy file (memmap, tile by tile)"
    )
    one.set_defaults(handler=kernel)
    args = parser.parse_args(argv)
    return args.handler(args)


def _run_and_exit() -> None:
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # After torch's Jacobian contraction of a large model and a TensorFlow conversion in one process, the C++
    # runtimes' thread pools abort in their destructors at interpreter exit ("terminate called without an active
    # exception", exit status 134), after all work is done; leave without running them.
    os._exit(code)


if __name__ == "__main__":
    _run_and_exit()
