"""``pipeprop regime CONFIG``: where SC and LWP help or hurt, over pipeline depth × momentum regime × lr."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from ..experiments.cli_options import friendly_errors
from .compare import parse_list, parse_seeds
from .stability import _floats


@click.command()
@click.argument("config_name", metavar="CONFIG")
@click.option("--offsets", default="0,50", show_default=True,
              help="extra delay added to every stage (delay_offset), one map row each")
@click.option("--rules", default="linear,momentum", show_default=True,
              help="scaling rules from the reference batch to b=1 (linear keeps the momentum)")
@click.option("--lrs", default="0.2,0.6", show_default=True, help="reference learning rates")
@click.option("--methods", default="pb,pb+sc,pb+lwp,pb+sc+lwp", show_default=True,
              help="PB methods to compare with sgd at b=1 (always run as the control)")
@click.option("--seeds", default="3x", show_default=True, help="seeds (0,1,2 or 3x)")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="override any config key")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="output folder (default: runs/regime/CONFIG)")
@click.option("--no-progress", is_flag=True, help="no progress bars")
@click.option("--batch-runs", type=click.IntRange(min=1), default=None,
              help="train up to K runs of one method, rule and delay (seeds x lrs) as one batched simulation "
                   "[default: lrs x seeds, at least 8]; 1 trains them one by one")
@friendly_errors
def regime(config_name: str, offsets: str, rules: str, lrs: str, methods: str, seeds: str, sets: tuple[str, ...],
           out: Optional[str], no_progress: bool, batch_runs: Optional[int]) -> None:
    """Regime map: final accuracy of PB variants minus SGD at b=1 over delay × momentum rule × lr.

    Writes regime.{md,csv,json,png} (a heat map per rule and method) with D·(1−m) and the quadratic
    analysis' stability gain over plain PB per cell. Finished runs are reused, so rerunning continues.

    \b
    pipeprop regime digits-regime --set num_threads=1
    pipeprop regime digits-regime --offsets 0,50 --lrs 0.2 --seeds 2x
    """
    from ..experiments.cli_options import resolve_config
    from ..experiments.regime import regime_map, write_regime_report

    cfg = resolve_config(config_name, sets)
    if no_progress:
        cfg = cfg.replace(progress=False)
    try:
        offset_list = [int(v) for v in offsets.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{offsets!r}: give integers, e.g. 0,6,22,50", param_hint="--offsets") from None
    out_dir = Path(out) if out else Path("runs") / "regime" / cfg.name
    cells = regime_map(cfg, out_dir, offsets=offset_list, rules=parse_list(rules) or [], lrs=_floats(lrs),
                       methods=parse_list(methods) or [], seeds=parse_seeds(seeds) or [0],
                       batch_runs=batch_runs, echo=lambda s: click.echo(s, err=True))
    paths = write_regime_report(cells, out_dir, title=cfg.name)
    click.echo(paths["table"].read_text())
    click.echo(f"table: {paths['table']}\nplot:  {paths['plot']}\njson:  {paths['json']}", err=True)
