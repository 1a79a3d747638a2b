"""``pipeprop stability CONFIG``: the largest reference learning rate at which each method trains without diverging."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from ..experiments.cli_options import friendly_errors
from .compare import parse_list, parse_seeds


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers, e.g. 0.1,0.2,0.4") from None
    return values


@click.command()
@click.argument("config_name", metavar="CONFIG")
@click.option("--lrs", default="0.025,0.05,0.1,0.2,0.4,0.8,1.6,3.2", show_default=True,
              help="ascending grid of reference learning rates (at the config's batch_size), bisected per method")
@click.option("--methods", default=None, help="comma-separated methods (default: the config's); sgd@1 = SGD at b=1")
@click.option("--seeds", default=None, help="seeds (0,1 or 2x; default: the config's); an lr is stable if every seed is")
@click.option("--samples", type=int, default=None, help="training samples per run (default: the config's samples)")
@click.option("--threshold", type=float, default=None,
              help="running train loss that counts as divergence (default: the config's divergence_loss, else 10)")
@click.option("--lwp-mode", type=click.Choice(["linear", "momentum-decay"]), default=None,
              help="LWP mode of the quadratic prediction (default: the config's method_options, else linear)")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="override any config key")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="output folder (default: runs/stability/CONFIG)")
@click.option("--no-progress", is_flag=True, help="no progress bars")
@friendly_errors
def stability(config_name: str, lrs: str, methods: Optional[str], seeds: Optional[str], samples: Optional[int],
              threshold: Optional[float], lwp_mode: Optional[str], sets: tuple[str, ...], out: Optional[str],
              no_progress: bool) -> None:
    """Stability map: per method, the largest stable reference lr over a fixed sample budget.

    Each run uses a constant learning rate (the reference recipe scaled to the config's micro-batch by its
    rule) and counts as diverged on a NaN/inf loss or a running training loss above --threshold. The
    grid is bisected per method (divergence assumed monotone in lr). Finished runs are reused, so rerunning
    continues the map. Writes stability.{md,csv,json,png} with the quadratic analysis' prediction.

    \b
    pipeprop stability cifar10-resnet20-stability --set data_dir=/path/to/data
    pipeprop stability digits-mlp --methods sgd@1,pb,pb+sc+lwp --samples 2000 --lrs 0.1,0.2,0.4,0.8
    """
    from ..experiments.cli_options import resolve_config
    from ..experiments.stability import DEFAULT_THRESHOLD, stability_search, write_stability_report

    cfg = resolve_config(config_name, sets)
    if no_progress:
        cfg = cfg.replace(progress=False)
    method_list = parse_list(methods) or list(cfg.methods)
    seed_list = parse_seeds(seeds) or list(cfg.seeds)
    n = samples or cfg.samples
    if not n:
        raise click.UsageError("give --samples (the config sets no samples)")
    limit = threshold or cfg.divergence_loss or DEFAULT_THRESHOLD
    out_dir = Path(out) if out else Path("runs") / "stability" / cfg.name
    results = stability_search(cfg, out_dir, methods=method_list, lrs=_floats(lrs), seeds=seed_list, samples=n,
                               threshold=limit, echo=lambda s: click.echo(s, err=True))
    mode = lwp_mode or cfg.method_options.get("lwp_mode", "linear")
    paths = write_stability_report(results, out_dir, title=cfg.name, samples=n, threshold=limit, lwp_mode=mode)
    click.echo(paths["table"].read_text())
    click.echo(f"table: {paths['table']}\nplot:  {paths['plot']}\njson:  {paths['json']}", err=True)
