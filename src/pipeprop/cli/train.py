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
    return Path("runs") / f"{cfg.name}-{cfg.method.replace('+', '-')}-b{cfg.micro_batch}-s{cfg.seed}"


@click.command()
@config_options
@click.option("--seed", type=int, default=None, help="random seed (model init, data order, augmentation)")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="run directory (default: runs/<name>-<method>-b<b>-s<seed>)")
@click.option("--resume", is_flag=True, help="continue the run in --out from its checkpoint, bit-exactly")
@click.option("--overwrite", is_flag=True, help="replace a run already in --out")
@click.option("--no-progress", is_flag=True, help="no progress bar")
@click.option("--engine", type=click.Choice(["simulator", "distributed"]), default="simulator", show_default=True,
              help="exact sequential simulator, or the real asynchronous pipeline on torch.distributed")
@click.option("--nproc", type=int, default=2, show_default=True, help="processes for --engine distributed")
@friendly_errors
def train(config_name: Optional[str], sets: tuple[str, ...], seed: Optional[int], out: Optional[str], resume: bool,
          overwrite: bool, no_progress: bool, engine: str, nproc: int, **options: Any) -> None:
    """Train one model with Pipelined Backpropagation (or reference SGD) and store metrics, plots, checkpoints.

    \b
    pipeprop train --dataset digits --model mlp --method pb+sc+lwp --batch-size 32 --lr 0.1 --epochs 5
    pipeprop train --config cifar10-resnet20-budget --data-dir DIR --method pb --seed 1
    pipeprop train --config cifar10-resnet20-budget --method sgd --micro-batch 128   # reference SGD at B
    pipeprop train --out runs/x --resume                                             # continue after Ctrl-C
    """
    if resume and out is not None and config_name is None and (Path(out) / "config.json").is_file():
        config_name = str(Path(out) / "config.json")
    cfg = resolve_config(config_name, sets, **options)
    if seed is not None:
        cfg = cfg.replace(seed=seed)
    if no_progress:
        cfg = cfg.replace(progress=False)
    run_dir = Path(out) if out else default_run_dir(cfg)
    if engine == "distributed":
        _launch_distributed(cfg, nproc, run_dir)
        return
    from ..experiments.runner import run_experiment

    summary = run_experiment(cfg, run_dir, resume=resume, overwrite=overwrite)
    click.echo(json.dumps(summary, indent=2))
    status = summary["status"]
    acc = summary.get("final_test_acc")
    click.echo(f"{status}: {run_dir} (final test acc {'–' if acc is None else f'{100 * acc:.2f}%'})", err=True)
    if status == "diverged":
        click.echo("training diverged (NaN/inf or loss above divergence_loss); see summary.json", err=True)
        sys.exit(EXIT_DIVERGED)
    if status == "interrupted":
        click.echo(f"checkpoint saved; continue with: pipeprop train --out {run_dir} --resume", err=True)
        sys.exit(EXIT_INTERRUPTED)


def _launch_distributed(cfg: Any, nproc: int, run_dir: Path) -> None:
    try:
        from ..distributed import launch  # type: ignore[attr-defined]
    except ImportError as err:
        raise click.ClickException(
            "the distributed engine (pipeprop.distributed.launch) is not available in this install; "
            "use --engine simulator"
        ) from err
    result = launch(nproc, cfg, out=str(run_dir))
    brief = {k: v for k, v in result.items() if k not in ("losses", "config", "experiment")}
    click.echo(json.dumps(brief, indent=2, default=str))
    click.echo(f"distributed run finished: {run_dir}", err=True)
