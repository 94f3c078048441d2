"""Command line: ``python -m torchntk demo`` (the README's main job)."""

from __future__ import annotations

import argparse
import os
import pickle
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
    model = _cli_model(args).to(device)
    torch.manual_seed(1)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    _check_model_takes(model, x[:1], args)
    return model, x


def _check_model_takes(model: torch.nn.Module, example: torch.Tensor, args: argparse.Namespace) -> None:
    """Exit with a message (not a traceback) when the model cannot take the command line's inputs."""
    try:
        with torch.no_grad():
            model(example)
    except RuntimeError as error:
        data = getattr(args, "data", None)  # demo has no --data
        what = f"--size {args.size} inputs" if data is None else f"the inputs of --data {data}"
        fix = "use a larger --size (e.g. 32, or 224)" if data is None else "pass data of the model's input shape"
        raise SystemExit(
            f"python -m torchntk: error: --model {args.model} cannot take {what} "
            f"({str(error).splitlines()[0][:200]}); {fix}."
        ) from None


def demo(args: argparse.Namespace) -> int:
    """NTK of a torchvision model on random inputs by every method: shape, times, agreement."""
    model, x = _model_and_input(args)
    device = x.device
    methods = list(torchntk.IMPLEMENTATIONS) if args.implementation == "all" else [args.implementation]
    params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        outputs = tuple(model(x[:1]).shape[1:])  # what the model gives (a module:callable ignores --classes)
    print(f"model {args.model}: {params:,} parameters, outputs {outputs}; x: {tuple(x.shape)} on {device}")
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


def _load_callable(spec: str, what: str):
    """``module:callable`` or ``path/to/file.py:callable`` -> the callable."""
    import importlib
    import importlib.util

    location, _, name = spec.rpartition(":")
    if location.endswith(".py"):
        module_spec = importlib.util.spec_from_file_location(os.path.basename(location)[:-3], location)
        if module_spec is None or not os.path.exists(location):
            raise SystemExit(f"{what} {spec!r}: no file {location}.")
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(location)
    if not callable(getattr(module, name, None)):
        raise SystemExit(f"{what} {spec!r}: {location} has no callable {name!r}.")
    return getattr(module, name)


def _cli_model(args: argparse.Namespace) -> torch.nn.Module:
    """``--model``: a torchvision name, or ``module:callable`` / ``file.py:callable`` returning an ``nn.Module``."""
    if ":" not in args.model:
        return _torchvision_model(args.model, args.classes)
    model = _load_callable(args.model, "--model")()
    if not isinstance(model, torch.nn.Module):
        raise SystemExit(f"--model {args.model!r} returned a {type(model).__name__}, not a torch.nn.Module.")
    return model


def _model_dtype(model: torch.nn.Module, spec: str) -> torch.dtype:
    """The dtype floating inputs are cast to: the model's first floating parameter's."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if dtype is None:
        raise SystemExit(f"--model {spec!r} has no floating parameters: its NTK is empty. Pass a model with weights.")
    return dtype


def _cli_data(args: argparse.Namespace, dtype: torch.dtype, device: torch.device):
    """``--data``: a tensor file (.npy, .pt), ``module:callable`` returning a Dataset or tensor, ``digits``, or
    (none) random inputs of ``--batch`` × 3 × ``--size`` × ``--size``."""
    import numpy as np

    if args.data is None:
        torch.manual_seed(1)
        return torch.randn(args.batch, 3, args.size, args.size, device=device, dtype=dtype)
    if args.data == "digits":
        from sklearn.datasets import load_digits

        return torch.as_tensor(load_digits().images, dtype=dtype, device=device)[: args.batch_limit, None] / 16.0
    if args.data.endswith(".npy"):
        data = torch.from_numpy(np.load(args.data, allow_pickle=False))  # data only: never runs code
    elif args.data.endswith(".pt"):
        try:
            data = torch.load(args.data, weights_only=True)  # data only: a pickle that would run code is refused
        except pickle.UnpicklingError as error:
            raise SystemExit(
                f"--data {args.data!r} holds more than tensors (torch.load(weights_only=True) refused it: "
                f"{str(error).splitlines()[0]}); torchntk never runs code from a data file. Save a plain tensor "
                "(torch.save(x, path)) or a .npy array."
            ) from None
    elif ":" in args.data:
        data = _load_callable(args.data, "--data")()
    else:
        raise SystemExit(f"--data {args.data!r}: pass a .npy or .pt tensor file, module:callable, or digits.")
    if isinstance(data, torch.Tensor):
        if data.ndim == 0 or data.is_complex():
            what = "a scalar" if data.ndim == 0 else f"complex ({data.dtype})"
            raise SystemExit(
                f"--data {args.data!r} is {what}; pass a real tensor of shape (N, ...) with the examples on axis 0 "
                "(for complex data, torch.view_as_real and a model that takes it)."
            )
        # integer and boolean data (token ids, masks) stay as they are; floating data takes the model's dtype
        return data[: args.batch_limit].to(device=device, dtype=dtype if data.is_floating_point() else None)
    if isinstance(data, torch.utils.data.Dataset):
        key = int(args.input_key) if args.input_key and args.input_key.lstrip("-").isdigit() else args.input_key
        return torchntk.DatasetInputs(data, input_key=key, num_workers=args.workers, dtype=dtype)
    raise SystemExit(f"--data {args.data!r} gave a {type(data).__name__}; it must give a tensor or a Dataset.")


def kernel(args: argparse.Namespace) -> int:
    """One NTK: auto's choice and estimates, tiles, time and throughput; optionally into a .npy memmap.

    Under ``torchrun`` every rank runs this; the ranks share the tiles and rank 0 prints.
    """
    from torchntk import _distributed
    from torchntk._problem import prepare

    world, rank = 1, 0
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun
        torch.distributed.init_process_group()
        world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    say = print if rank == 0 else (lambda *a, **k: None)
    device = torch.device(args.device)
    model = _cli_model(args).to(device)
    dtype = _model_dtype(model, args.model)
    x = _cli_data(args, dtype, device)
    if isinstance(x, torch.Tensor):
        _check_model_takes(model, x[:1], args)
    if args.trace and args.trace_axes:
        raise ValueError("pass --trace (the last output axis) or --trace-axes, not both.")
    trace_axes = (-1,) if args.trace else tuple(args.trace_axes)
    problem = prepare(model, x, None, params=None, trace_axes=trace_axes, diagonal_axes=())
    explanation = torchntk.explain(model, x, trace_axes=trace_axes, chunk_size=args.chunk_size)
    say(f"model {args.model}, {problem.n1} examples of shape {[tuple(t.shape[1:]) for t in problem.x1]}, ", end="")
    say(f"outputs {problem.out_shape}, {world} process(es)")
    for estimate in explanation.estimates:
        say(
            f"  estimate {estimate.implementation:24s} {estimate.flops:10.3e} multiply-adds, "
            f"{estimate.seconds:8.3f} s, {estimate.memory_bytes / 2**20:9.1f} MiB per tile"
        )
    if explanation.conversion_seconds is not None:
        say(f"  estimate conversion to JAX (once)  {explanation.conversion_seconds:8.3f} s")
    if explanation.conversion_bytes is not None:
        say(f"  estimate conversion's peak memory  {explanation.conversion_bytes / 2**20:8.1f} MiB")
    for note in explanation.notes:
        say(f"  note: {note}")
    implementation = explanation.choice if args.implementation == "auto" else args.implementation
    say(f"  auto's choice: {explanation.choice} ({explanation.reason}); running {implementation}")
    seconds = next((e.seconds for e in explanation.estimates if e.implementation == implementation), None)
    if seconds is None:  # structured derivatives before a conversion: auto estimates them only once converted
        say(f"  ETA unknown: {implementation} has no estimate before the model is converted")
    else:
        say(f"  ETA about {seconds / world:.1f} s ({seconds:.1f} s estimated in one process, shared by {world})")
    path = args.out or args.save  # not both: refused by main
    start = time.perf_counter()
    result = torchntk.ntk(
        model,
        x,
        # several ranks run the one choice printed (all must agree); one process keeps auto's fallback on failure
        implementation=implementation if world > 1 else args.implementation,
        trace_axes=trace_axes,
        chunk_size=args.chunk_size,
        out=path,  # a .npy / .zarr store every rank opens: created, or resumed with only its missing tiles
        progress=True if rank == 0 else False,
    )
    elapsed = time.perf_counter() - start
    tiles = len(_distributed.last_schedule.claimed)
    say(f"  kernel {tuple(result.shape)} in {elapsed:.2f} s")
    pairs = problem.n1 * (problem.n1 + 1) / 2
    say(f"  tiles: {tiles} on rank 0; throughput {pairs / elapsed:,.0f} example pairs/s ({world} process(es))")
    if path is not None:
        say(f"  saved to {path}")
    if world > 1:
        torch.distributed.destroy_process_group()
    return 0


def _integer_at_least(minimum: int, what: str):
    """An argparse type: an integer >= ``minimum`` (``--batch 0``, ``--classes -1`` are refused with the message)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is not {what}")
        return value

    return parse


positive_int = _integer_at_least(1, "a positive integer (1 or more)")
non_negative_int = _integer_at_least(0, "0 or more")


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


def store_path(text: str) -> str:
    """argparse type: a ``.npy`` or ``.zarr`` store (a local path in an existing, writable directory, or a URL)."""
    if text.rstrip("/").endswith(".zarr") and "://" in text:
        return text
    if not text.rstrip("/").endswith((".npy", ".zarr")):
        raise argparse.ArgumentTypeError(f"{text!r} does not end in .npy or .zarr (the kernel stores torchntk writes)")
    folder = os.path.dirname(os.path.abspath(text.rstrip("/")))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text!r}: the directory {folder} does not exist or is not writable")
    return text


def _model_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--model",
        default="resnet18",
        help="a torchvision classification model name (default resnet18), or module:callable / file.py:callable "
        "returning an nn.Module",
    )
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
    one.add_argument("--trace-axes", type=int, nargs="*", default=[], help="output axes to trace, e.g. -1")
    one.add_argument(
        "--save", type=save_path, metavar="PATH.npy", help="write the kernel to a .npy file (memmap, tile by tile)"
    )
    one.add_argument(
        "--out", type=store_path, metavar="PATH", help="a .npy or .zarr store; re-running resumes after a failure"
    )
    one.add_argument(
        "--data",
        metavar="SPEC",
        help="inputs: a .npy/.pt tensor file, module:callable (or file.py:callable) returning a Dataset or a "
        "tensor, or digits (scikit-learn's 8x8 digits); default random (--batch, --size)",
    )
    one.add_argument("--batch-limit", type=positive_int, default=None, help="use the first N examples of --data only")
    one.add_argument("--input-key", default=None, help="the model inputs of a Dataset item (e.g. 0 for (x, label))")
    one.add_argument(
        "--workers", type=non_negative_int, default=0, help="DataLoader worker processes for a Dataset (default 0)"
    )
    one.add_argument(
        "--chunk-size", type=positive_int, default=None, help="examples per tile side (default: by memory)"
    )
    one.set_defaults(handler=kernel)
    args = parser.parse_args(argv)
    if getattr(args, "save", None) and getattr(args, "out", None):
        parser.error("--save and --out both say where the kernel goes; pass one (--out also resumes).")
    try:
        return args.handler(args)
    except Exception as error:  # noqa: BLE001 - one line for the user, the traceback on request
        # what the user passed (a file, a module and the code it runs, axes) or torchntk refused: one line, as
        # argparse's own errors (a NameError in the user's file.py:callable was a bare traceback)
        if os.environ.get("TORCHNTK_TRACEBACK"):
            raise
        parser.exit(2, f"{parser.prog}: error: {type(error).__name__}: {error}\n(TORCHNTK_TRACEBACK=1 shows where)\n")


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
