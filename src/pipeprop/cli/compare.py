"""``pipeprop compare``: one set-up under several methods (and seeds), ending in a table and plots."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import click

from ..experiments.cli_options import config_options, friendly_errors, resolve_config


BATCH_RUNS_HELP = ("train up to K runs that differ only in seed as one batched simulation, each in its own run "
                   "folder (default: up to 8, where batching is faster than one by one; an explicit K always "
                   "batches; 1 = one by one; see docs/experiments.md)")


def parse_list(text: Optional[str]) -> Optional[list[str]]:
    return [v.strip() for v in text.split(",") if v.strip()] if text else None


def parse_seeds(text: Optional[str]) -> Optional[list[int]]:
    """``"0,1,2"`` -> [0, 1, 2]; ``"3x"`` -> [0, 1, 2]."""
    if not text:
        return None
    text = text.strip()
    try:
        if text.endswith("x"):
            return list(range(int(text[:-1])))
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise click.BadParameter(f"{text!r}: give seeds as 0,1,2 or a count like 3x") from err


def run_and_print(cfg: Any, out: Path, methods: Optional[list[str]], seeds: Optional[list[int]], overwrite: bool,
                  batch_runs: Optional[int] = None) -> None:
    run_and_print_many([(cfg, out)], methods, seeds, overwrite, batch_runs)


def run_and_print_many(sweeps: list[tuple[Any, Path]], methods: Optional[list[str]], seeds: Optional[list[int]],
                       overwrite: bool, batch_runs: Optional[int] = None) -> None:
    """Run the sweeps as one plan (:func:`~pipeprop.experiments.compare.run_sweeps`); print each one's table."""
    from ..experiments.compare import run_sweeps

    results = run_sweeps(sweeps, methods=methods, seeds=seeds, overwrite=overwrite, batch_runs=batch_runs,
                         echo=lambda s: click.echo(s, err=True))
    for summaries, paths in results:
        click.echo(paths["table"].read_text())
        click.echo(f"table: {paths['table']}\nplot:  {paths['plot']}\ncsv:   {paths['csv']}", err=True)
    if any(s.get("status") == "interrupted" for summaries, _ in results for s in summaries):
        click.echo("interrupted; rerun the same command to resume", err=True)
        sys.exit(130)


@click.command()
@config_options
@click.option("--methods", default=None, help="comma-separated methods (any of `pipeprop methods`); 'name@B' sets "
              "the micro-batch, e.g. sgd@128. Default: sgd (at the reference batch), pb, pb+sc, pb+lwp, pb+sc+lwp")
@click.option("--seeds", default=None, help="comma-separated seeds, or a count like 3x (default: the config's)")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="output folder (default: runs/compare-<name>)")
@click.option("--overwrite", is_flag=True, help="rerun runs that already finished")
@click.option("--no-progress", is_flag=True, help="no progress bars")
@click.option("--batch-runs", type=click.IntRange(min=1), default=None, help=BATCH_RUNS_HELP)
@friendly_errors
def compare(config_name: Optional[str], sets: tuple[str, ...], methods: Optional[str], seeds: Optional[str],
            out: Optional[str], overwrite: bool, no_progress: bool, batch_runs: Optional[int], **options: Any) -> None:
    """Train the same set-up with several methods and seeds; print a mean ± std table, write plots.

    Finished runs are reused and interrupted ones resumed, so rerunning the command continues a sweep.

    \b
    pipeprop compare --dataset digits --model mlp --batch-size 32 --lr 0.1 --epochs 3 --seeds 2x
    pipeprop compare --config cifar10-cnn-budget --methods sgd,pb,pb+sc+lwp,pipemare
    """
    cfg = resolve_config(config_name, sets, **options)
    if no_progress:
        cfg = cfg.replace(progress=False)
    run_and_print(cfg, Path(out) if out else Path("runs") / f"compare-{cfg.name}", parse_list(methods), parse_seeds(seeds), overwrite,
                  batch_runs)
