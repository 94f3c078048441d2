"""A real data set end to end: the NTK of a small CNN on scikit-learn's 1,797 8×8 handwritten digits.

Computes the full Θ(X, X) (traced over the 10 classes) at initialisation with several processes sharing the tiles
(torch.distributed, gloo), then NTK kernel regression on a train/test split, the top eigenvalues and the condition
number, and saves a plot of the spectrum. The digits ship with scikit-learn: no download.

Run: ``python examples/digits.py --processes 2`` (starts the ranks itself), or under torchrun:
``torchrun --nproc-per-node 2 examples/digits.py``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import TensorDataset

import torchntk

CLASSES = 10


def digits(examples: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images Tensor[N, 1, 8, 8] float64 in [0, 1], labels Tensor[N])``, the first ``examples`` of the 1,797."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.as_tensor(data.images, dtype=torch.float64)[:examples, None] / 16.0
    return images, torch.as_tensor(data.target)[:examples]


def small_cnn() -> nn.Module:
    """1,898 parameters: two 3×3 convolutions with average pooling, a linear read-out of 10 logits (float64)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(64, CLASSES),
    ).double()


def analyse(kernel: torch.Tensor, labels: torch.Tensor, ridge: float = 1e-4) -> dict:
    """NTK regression on a 2/3 : 1/3 split of the examples (one-hot targets), and the spectrum of Θ(X, X).

    ``kernel: Tensor[N, N]`` (traced over the classes). The prediction of test example s is
    Θ(s, train) (Θ(train, train) + ridge·mean(diag Θ)·I)⁻¹ Y; the class is its largest entry.
    """
    n = len(labels)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    train, test = order[: 2 * n // 3], order[2 * n // 3 :]
    targets = torch.nn.functional.one_hot(labels[train], CLASSES).double() - 1.0 / CLASSES
    k_train = kernel[train][:, train]
    shift = ridge * k_train.diagonal().mean()
    alpha = torch.linalg.solve(k_train + shift * torch.eye(len(train), dtype=kernel.dtype), targets)
    predicted = (kernel[test][:, train] @ alpha).argmax(dim=1)
    eigenvalues = torch.linalg.eigvalsh(kernel).flip(0)  # descending
    return {
        "examples": n,
        "train": len(train),
        "test": len(test),
        "accuracy": (predicted == labels[test]).double().mean().item(),
        "top_eigenvalues": eigenvalues[:5].tolist(),
        "condition_number": (eigenvalues[0] / eigenvalues[-1]).item(),
        "eigenvalues": eigenvalues.tolist(),
    }


def plot_spectrum(eigenvalues: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    axes.semilogy(range(1, len(eigenvalues) + 1), eigenvalues)
    axes.set_xlabel("index i")
    axes.set_ylabel("eigenvalue λ_i of Θ(X, X)")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def rank_main(rank: int, world: int, init_file: str, args: argparse.Namespace) -> None:
    """One rank: its share of the kernel's tiles; rank 0 then analyses the kernel (every rank has it)."""
    torch.set_num_threads(args.threads)
    if not dist.is_initialized():
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=datetime.timedelta(0, 600)
        )
    images, labels = digits(args.examples)
    inputs = torchntk.DatasetInputs(TensorDataset(images, labels), input_key=0)  # (image, label) items
    start = time.perf_counter()
    kernel = torchntk.ntk(
        small_cnn(), inputs, trace_axes=-1, implementation=args.implementation, chunk_size=args.chunk, progress=False
    )
    seconds = time.perf_counter() - start
    from torchntk import _distributed

    tiles = len(_distributed.last_schedule.claimed)
    # One write with its newline: the ranks share stdout, and print's separate newline write could interleave.
    print(f"rank {rank}/{world}: {tiles} tiles in {seconds:.2f} s\n", end="", flush=True)
    if rank == 0:
        result = analyse(kernel, labels)
        result.update(processes=world, kernel_seconds=seconds, implementation=args.implementation, chunk=args.chunk)
        parameters = sum(p.numel() for p in small_cnn().parameters())
        print(f"NTK of a {parameters:,}-parameter CNN on {result['examples']} digits")
        print(f"kernel {tuple(kernel.shape)} with {world} process(es): {seconds:.2f} s")
        split = f"{result['train']} train, {result['test']} test"
        print(f"kernel regression: test accuracy {result['accuracy']:.4f} ({split})")
        print("top eigenvalues: " + ", ".join(f"{v:.4g}" for v in result["top_eigenvalues"]))
        print(f"condition number: {result['condition_number']:.4g}")
        if args.plot:
            title = f"NTK spectrum, small CNN at init, {result['examples']} digits"
            plot_spectrum(result["eigenvalues"], Path(args.plot), title)
            print(f"spectrum plot: {args.plot}")
        if args.json:
            Path(args.json).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, default=2, help="ranks to start (ignored under torchrun)")
    parser.add_argument("--examples", type=int, default=None, help="the first N digits (default all 1,797)")
    parser.add_argument("--chunk", type=int, default=128, help="examples per tile side (default 128)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    parser.add_argument("--implementation", default="jacobian_contraction", choices=list(torchntk.IMPLEMENTATIONS))
    parser.add_argument("--plot", default=str(Path(__file__).with_name("digits_spectrum.png")), help="PNG path")
    parser.add_argument("--json", default=None, help="write accuracy, spectrum and time to this JSON file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if "RANK" in os.environ:  # under torchrun: this process is one rank
        dist.init_process_group("gloo")
        rank_main(dist.get_rank(), dist.get_world_size(), "", args)
        return
    with tempfile.TemporaryDirectory() as directory:
        torch.multiprocessing.start_processes(
            rank_main,
            args=(args.processes, os.path.join(directory, "rendezvous"), args),
            nprocs=args.processes,
            start_method="fork",  # torch only, no JAX: the ranks start at once
        )


if __name__ == "__main__":
    main()
