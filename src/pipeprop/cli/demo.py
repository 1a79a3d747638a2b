"""``pipeprop demo``: PB vs SGD at batch size one on the embedded digits data, with a table and a plot.

A thin preset over :func:`pipeprop.experiments.run_sweep`: every method trains the same He-initialised
deep MLP (``pipeprop.models.get("mlp", init="he")``, one pipeline stage per linear layer) with the same learning rate and momentum, one sample per
step; each run keeps its own folder (metrics, summary, checkpoint) under ``--out``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import click
import torch

from ..methods import get_method

DEFAULT_METHODS = ("sgd", "pb", "pb+sc", "pb+lwp", "pb+sc+lwp")


def format_table(summaries: Sequence[dict[str, Any]]) -> str:
    """Method, final test accuracy, final train loss, wall time and status, one row per run."""
    header = f"{'method':<11} {'test acc':>8} {'train loss':>10} {'time [s]':>8}  status"
    rows = []
    for s in summaries:
        acc, loss = s.get("final_test_acc"), s.get("final_train_loss")
        acc_text = f"{100 * acc:>7.1f}%" if acc is not None else f"{'–':>8}"
        loss_text = f"{loss:>10.3f}" if loss is not None else f"{'–':>10}"
        rows.append(f"{s['method']:<11} {acc_text} {loss_text} {s['wall_seconds']:>8.1f}  {s['status']}")
    return "\n".join([header, "-" * len(header)] + rows)


@click.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("results/demo"), show_default=True,
              help="Folder for the runs, the table and the plot.")
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
    from ..experiments import ExperimentConfig
    from ..experiments.compare import run_sweep

    try:
        names = [get_method(m.strip()).name for m in methods.split(",") if m.strip()]
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--methods") from None
    torch.set_num_threads(1)
    config = ExperimentConfig(
        name="demo", description="PB vs SGD at batch size 1 on the embedded digits",
        model="mlp", model_options={"depth": depth, "hidden": width, "init": "he"},
        dataset="digits", batch_size=1, micro_batch=1, sgd_batch=1, lr=lr, momentum=momentum,
        schedule="constant", epochs=epochs, seed=seed, seeds=[seed], methods=names, eval_every=eval_every,
        progress=not no_progress, num_threads=1,
    )
    click.echo(
        f"digits (embedded): 8x8 images, MLP with {depth} stages (delays {2 * (depth - 1)}..0), lr={lr}, "
        f"momentum={momentum}, {epochs} epochs at batch size 1"
    )
    summaries, paths = run_sweep(config, out, overwrite=True, echo=click.echo)
    table = format_table(summaries)
    click.echo("\n" + table)
    (out / "table.txt").write_text(table + "\n")
    click.echo(f"\nwrote {out / 'table.txt'}, {paths['table']} and the plot {paths['plot']}")
