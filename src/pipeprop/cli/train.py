"""``pipeprop train``: one run (model, data, method, micro-batch, scaled reference recipe) into a run directory."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import click

from ..experiments.cli_options import config_options, friendly_errors, resolve_config

EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130


def default_run_dir(cfg: Any) -> Path:
    engine = "" if cfg.engine == "simulator" else f"-{cfg.engine}"
    return Path("runs") / f"{cfg.name}-{cfg.method.replace('+', '-')}-b{cfg.micro_batch}-s{cfg.seed}{engine}"


@click.command()
@config_options
@click.option("--seed", type=int, default=None, help="random seed (model init, data order, augmentation)")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="run directory (default: runs/<name>-<method>-b<b>-s<seed>)")
@click.option("--resume", is_flag=True, help="continue the run in --out from its checkpoint, bit-exactly")
@click.option("--overwrite", is_flag=True, help="replace a run already in --out")
@click.option("--no-progress", is_flag=True, help="no progress bar")
@friendly_errors
def train(config_name: Optional[str], sets: tuple[str, ...], seed: Optional[int], out: Optional[str], resume: bool,
          overwrite: bool, no_progress: bool, **options: Any) -> None:
    """Train one model with Pipelined Backpropagation (or reference SGD) and store metrics, plots, checkpoints.

    \b
    pipeprop train --dataset digits --model mlp --method pb+sc+lwp --batch-size 32 --lr 0.1 --epochs 5
    pipeprop train --config cifar10-resnet20-budget --data-dir DIR --method pb --seed 1
    pipeprop train --config cifar10-resnet20-budget --method sgd --micro-batch 128   # reference SGD at B
    pipeprop train --out runs/x --resume                                             # continue after Ctrl-C
    pipeprop train --engine distributed --nproc 2 --model mlp --method pb+sc+lwp     # real pipeline, same run folder
    """
    if resume and out is not None and config_name is None and (Path(out) / "config.json").is_file():
        config_name = str(Path(out) / "config.json")
    cfg = resolve_config(config_name, sets, **options)
    if seed is not None:
        cfg = cfg.replace(seed=seed)
    if no_progress:
        cfg = cfg.replace(progress=False)
    run_dir = Path(out) if out else default_run_dir(cfg)
    from ..experiments.runner import run_experiment

    summary = run_experiment(cfg, run_dir, resume=resume, overwrite=overwrite)
    click.echo(json.dumps(summary, indent=2))
    from ..experiments.compare import headline

    status = summary["status"]
    click.echo(f"{status}: {run_dir} ({headline(summary)})", err=True)
    if status == "diverged":
        click.echo("training diverged (NaN/inf or loss above divergence_loss); see summary.json", err=True)
        sys.exit(EXIT_DIVERGED)
    if status == "interrupted":
        click.echo(f"checkpoint saved; continue with: pipeprop train --out {run_dir} --resume", err=True)
        sys.exit(EXIT_INTERRUPTED)

