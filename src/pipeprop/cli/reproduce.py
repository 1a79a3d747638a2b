"""``pipeprop reproduce NAME``: run a named experiment of the paper (configs/NAME.toml); ``--list`` shows them."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from ..experiments.cli_options import friendly_errors
from .compare import BATCH_RUNS_HELP, parse_list, parse_seeds, run_and_print_many


def _listing(scale: Optional[str], estimate: bool) -> None:
    from ..experiments.config import configs_dir, list_configs, load_config
    from ..experiments.cost import estimate_cost, format_seconds

    names = list_configs()
    if not names:
        raise click.ClickException(f"no named configs in {configs_dir()} (set PIPEPROP_CONFIGS)")
    rows = [("name", "scale", "model", "data", "device", "methods x seeds", "samples", "est. time", "longest run", "description")]
    for name in names:
        cfg = load_config(name)
        if scale and cfg.scale != scale:
            continue
        cost = estimate_cost(cfg, with_model=estimate)
        rows.append((name, cfg.scale, f"{cfg.model}/{cfg.norm or 'default'}", cfg.dataset + (f"[:{cfg.train_subset}]" if cfg.train_subset else ""),
                     cfg.device, f"{len(cfg.methods)} x {len(cfg.seeds)}", f"{cost.samples:.2e}" if cost.samples else "?",
                     format_seconds(cost.seconds), format_seconds(cost.longest_run_seconds), cfg.description))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        click.echo("  ".join(f"{c:<{w}}" for c, w in zip(r, widths)) + "  " + r[-1])
    click.echo(f"\n{len(rows) - 1} configs in {configs_dir()}. Estimated times are rough (see docs/experiments.md); "
               "budget configs were measured on 2 CPU cores.")


@click.command()
@click.argument("names", nargs=-1)
@click.option("--list", "show_list", is_flag=True, help="list the named experiments with their estimated cost")
@click.option("--scale", type=click.Choice(["paper", "budget"]), default=None, help="with --list: only this scale")
@click.option("--no-estimate", is_flag=True, help="with --list: skip building models for the cost estimate")
@click.option("--methods", default=None, help="override the config's methods (comma separated)")
@click.option("--seeds", default=None, help="override the config's seeds (0,1,2 or 3x)")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="override any config key")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="output folder (default: runs/reproduce/NAME; with several names: OUT/NAME for each)")
@click.option("--overwrite", is_flag=True, help="rerun runs that already finished")
@click.option("--no-progress", is_flag=True, help="no progress bars")
@click.option("--batch-runs", type=click.IntRange(min=1), default=None, help=BATCH_RUNS_HELP)
@friendly_errors
def reproduce(names: tuple[str, ...], show_list: bool, scale: Optional[str], no_estimate: bool, methods: Optional[str],
              seeds: Optional[str], sets: tuple[str, ...], out: Optional[str], overwrite: bool, no_progress: bool,
              batch_runs: Optional[int]) -> None:
    """Reproduce one of the paper's experiments at paper scale (GPU) or budget scale (CPU).

    Several NAMEs run as one plan: runs of different experiments that differ only in seed and learning
    rate (e.g. a config and its larger-lr variant) are batched together; each experiment keeps its folder.

    \b
    pipeprop reproduce --list
    pipeprop reproduce cifar10-budget
    pipeprop reproduce cifar10-resnet20 --set device=cuda
    pipeprop reproduce cifar10-resnet20-b1 cifar10-resnet20-b1-lr0.4 --methods pb --out runs/reproduce
    """
    if show_list or not names:
        if not show_list:
            click.echo("give an experiment NAME; the named experiments are:\n", err=True)
        _listing(scale, not no_estimate)
        return
    from ..experiments.cli_options import resolve_config

    if len(set(names)) != len(names):
        raise click.UsageError(f"an experiment is named twice in {' '.join(names)}")
    configs = [resolve_config(name, sets) for name in names]
    if no_progress:
        configs = [cfg.replace(progress=False) for cfg in configs]
    root = Path(out) if out else Path("runs") / "reproduce"
    dirs = [Path(out)] if out and len(configs) == 1 else [root / cfg.name for cfg in configs]
    run_and_print_many(list(zip(configs, dirs)), parse_list(methods), parse_seeds(seeds), overwrite, batch_runs)
