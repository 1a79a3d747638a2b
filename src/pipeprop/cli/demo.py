"""``pipeprop demo``: PB vs SGD at batch size one on the embedded digits data, with a table and a plot."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import click
import torch
from torch import nn
import torch.nn.functional as F

from ..api import build_simulator
from ..methods import get_method
from ..data import ImageDataset, MicroBatchStream, load_digits
from ..simulator import DivergenceError

DEFAULT_METHODS = ("sgd", "pb", "pb+sc", "pb+lwp", "pb+sc+lwp")


@dataclass
class DemoResult:
    method: str
    test_accuracy: float
    train_loss: float
    seconds: float
    status: str = "ok"
    curve: list[tuple[int, float]] = field(default_factory=list)  # (samples seen, test accuracy)


def deep_mlp(depth: int, width: int, in_features: int = 64, num_classes: int = 10, seed: int = 0) -> nn.Sequential:
    """Flatten > [Linear > ReLU] x (depth-1) > Linear, He-initialised: ``depth`` PB stages."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten()]
    fan_in = in_features
    for _ in range(depth - 1):
        layers += [nn.Linear(fan_in, width), nn.ReLU()]
        fan_in = width
    layers.append(nn.Linear(fan_in, num_classes))
    for m in layers:
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return nn.Sequential(*layers)


@torch.no_grad()
def test_accuracy(model: nn.Module, data: ImageDataset) -> float:
    logits = model(data.normalize(data.test.images))
    return (logits.argmax(1) == data.test.labels).float().mean().item()


def run_method(
    method: str, data: ImageDataset, *, depth: int, width: int, lr: float, momentum: float,
    epochs: float, seed: int, eval_every: int, progress: bool = True,
) -> DemoResult:
    """Train one fresh model with ``method``; evaluate every ``eval_every`` samples."""
    from tqdm.auto import tqdm

    model = deep_mlp(depth, width, seed=seed)
    sim = build_simulator(model, F.cross_entropy, method=method, lr=lr, momentum=momentum)
    stream = MicroBatchStream(data, batch_size=1, epochs=epochs, seed=seed)
    curve = [(0, test_accuracy(model, data))]
    losses: list[float] = []
    status = "ok"
    start = time.perf_counter()
    bar = tqdm(total=len(stream), desc=f"{method:>10}", unit="sample", disable=not progress, leave=True)
    try:
        for i, (x, y) in enumerate(stream, start=1):
            losses.append(sim.step(x, y))
            if i % eval_every == 0 or i == stream.total_steps:
                curve.append((i, test_accuracy(model, data)))
                bar.set_postfix(loss=f"{sum(losses[-eval_every:]) / len(losses[-eval_every:]):.3f}", acc=f"{curve[-1][1]:.3f}")
            bar.update(1)
    except DivergenceError:
        status = f"diverged at sample {len(losses)}"
        curve.append((len(losses), float("nan")))
    finally:
        bar.close()
    tail = losses[-200:] or [float("nan")]
    return DemoResult(method, curve[-1][1], sum(tail) / len(tail), time.perf_counter() - start, status, curve)


def format_table(results: Sequence[DemoResult]) -> str:
    header = f"{'method':<11} {'test acc':>8} {'train loss':>10} {'time [s]':>8}  status"
    rows = [
        f"{r.method:<11} {100 * r.test_accuracy:>7.1f}% {r.train_loss:>10.3f} {r.seconds:>8.1f}  {r.status}"
        for r in results
    ]
    return "\n".join([header, "-" * len(header)] + rows)


def plot_curves(results: Sequence[DemoResult], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in results:
        xs, ys = zip(*r.curve)
        ax.plot(xs, [100 * y for y in ys], label=f"{r.method} ({100 * r.test_accuracy:.1f}%)", lw=1.8)
    ax.set_xlabel("training samples seen (batch size 1)")
    ax.set_ylabel("test accuracy [%]")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@click.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("results/demo"), show_default=True,
              help="Folder for the table, the JSON results and the plot.")
@click.option("--methods", default=",".join(DEFAULT_METHODS), show_default=True, help="Comma-separated method names.")
@click.option("--depth", type=click.IntRange(2, 64), default=8, show_default=True, help="Layers = pipeline stages.")
@click.option("--width", type=click.IntRange(1), default=64, show_default=True)
@click.option("--lr", type=float, default=1e-4, show_default=True, help="Learning rate (batch size 1).")
@click.option("--momentum", type=float, default=0.99, show_default=True)
@click.option("--epochs", type=float, default=2.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--eval-every", type=click.IntRange(1), default=100, show_default=True, help="Samples between evaluations.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def demo(out: Path, methods: str, depth: int, width: int, lr: float, momentum: float, epochs: float, seed: int,
         eval_every: int, no_progress: bool) -> None:
    """Train a deep MLP on the embedded 8x8 digits at batch size 1 with SGD and PB variants; compare."""
    torch.set_num_threads(1)
    names = [m.strip() for m in methods.split(",") if m.strip()]
    try:
        names = [get_method(m).name for m in names]
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--methods") from None
    data = load_digits()
    click.echo(
        f"digits: {len(data.train)} train / {len(data.test)} test images; MLP with {depth} stages "
        f"(delays {2 * (depth - 1)}..0), lr={lr}, momentum={momentum}, {epochs} epochs at batch size 1"
    )
    results = [
        run_method(m, data, depth=depth, width=width, lr=lr, momentum=momentum, epochs=epochs, seed=seed,
                   eval_every=eval_every, progress=not no_progress)
        for m in names
    ]
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(results)
    click.echo("\n" + table)
    (out / "table.txt").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
    plot_curves(results, out / "accuracy.png", f"digits, {depth}-stage MLP, batch size 1")
    click.echo(f"\nwrote {out / 'table.txt'}, {out / 'results.json'} and {out / 'accuracy.png'}")
