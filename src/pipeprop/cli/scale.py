"""``pipeprop scale``: convert a batch-B recipe to micro-batch b (SGD: the paper's or the linear rule; Adam: square-root rule)."""

from __future__ import annotations

import json
from typing import Optional

import click

from ..scaling import Recipe, normalize_rule, scale_recipe


def _floats(text: Optional[str]) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()] if text else []


@click.command()
@click.option("--from-batch", type=int, required=True, help="batch size B of the reference recipe")
@click.option("--to-batch", type=int, default=1, show_default=True, help="target micro-batch size b")
@click.option("--lr", type=float, required=True, help="reference learning rate")
@click.option("--momentum", type=float, default=0.9, show_default=True, help="reference momentum")
@click.option("--weight-decay", type=float, default=0.0, show_default=True, help="L2 weight decay (kept)")
@click.option("--rule", type=click.Choice(["momentum", "linear", "effective_lr", "linear_lr"]), default="momentum",
              show_default=True, help="momentum: m_b = m_B^(b/B), lr/(1-m) linear in b; linear: lr linear in b, m kept")
@click.option("--optimizer", type=click.Choice(["sgd", "adam", "adamw", "nadam"]), default="sgd", show_default=True,
              help="sgd: --rule; adam/adamw/nadam: square-root rule lr*sqrt(b/B), 1-beta*(b/B), eps/sqrt(b/B)")
@click.option("--betas", default="0.9,0.999", show_default=True, help="reference Adam betas 'beta1,beta2'")
@click.option("--eps", type=float, default=1e-8, show_default=True, help="reference Adam eps")
@click.option("--scale-eps/--no-scale-eps", default=True, show_default=True, help="scale eps by sqrt(B/b) (Adam)")
@click.option("--epochs", type=float, default=None, help="training length in epochs (needs --dataset-size)")
@click.option("--warmup-epochs", type=float, default=0.0, show_default=True)
@click.option("--milestones", default=None, help="step-schedule milestones in epochs, comma separated")
@click.option("--steps", type=int, default=None, help="training length in steps at B (instead of --epochs)")
@click.option("--dataset-size", type=int, default=None, help="training examples per epoch, to express epochs in samples")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def scale(from_batch: int, to_batch: int, lr: float, momentum: float, weight_decay: float, rule: str,
          optimizer: str, betas: str, eps: float, scale_eps: bool, epochs: Optional[float], warmup_epochs: float, milestones: Optional[str], steps: Optional[int],
          dataset_size: Optional[int], as_json: bool) -> None:
    """Scale a reference recipe to another batch size.

    \b
    pipeprop scale --from-batch 128 --lr 0.1 --momentum 0.9 --to-batch 1
    pipeprop scale --from-batch 128 --lr 0.1 --to-batch 1 --epochs 164 --milestones 82,123 --dataset-size 50000
    pipeprop scale --optimizer adamw --from-batch 64 --lr 1e-3 --betas 0.9,0.99 --to-batch 1
    """
    try:
        beta_pair = _floats(betas)
        if len(beta_pair) != 2:
            raise ValueError(f"--betas takes two numbers 'beta1,beta2', got {betas!r}")
        out = scale_recipe(
            Recipe(batch_size=from_batch, lr=lr, momentum=momentum, weight_decay=weight_decay, epochs=epochs,
                   warmup_epochs=warmup_epochs, milestones=_floats(milestones), dataset_size=dataset_size, steps=steps,
                   optimizer=optimizer, betas=(beta_pair[0], beta_pair[1]), eps=eps),
            to_batch,
            normalize_rule(rule),
            scale_eps=scale_eps,
        )
    except ValueError as err:
        raise click.ClickException(str(err)) from err
    if as_json:
        extra = {} if out.betas is not None else {"effective_lr": out.effective_lr}
        click.echo(json.dumps({**out.to_dict(), **extra, "steps": out.steps}, indent=2))
        return
    click.echo(f"rule:          {out.rule}" + (f" ({optimizer})" if out.betas is not None else ""))
    click.echo(f"batch size:    {from_batch} -> {to_batch}")
    click.echo(f"learning rate: {lr:.6g} -> {out.lr:.6g}")
    if out.betas is not None:
        click.echo(f"betas:         ({beta_pair[0]:.6g}, {beta_pair[1]:.6g}) -> ({out.betas[0]:.8g}, {out.betas[1]:.8g})")
        click.echo(f"eps:           {eps:.6g} -> {out.eps:.6g}")
    else:
        click.echo(f"momentum:      {momentum:.6g} -> {out.momentum:.6g}")
    click.echo(f"weight decay:  {weight_decay:.6g} -> {out.weight_decay:.6g}")
    if out.betas is None:
        click.echo(f"lr/(1-m):      {lr / (1 - momentum):.6g} -> {out.effective_lr:.6g}")
    if out.total_samples is not None:
        click.echo(f"length:        {out.total_samples:,} samples = {out.steps:,} steps of {to_batch}")
    if out.warmup_samples:
        click.echo(f"warm-up:       {out.warmup_samples:,} samples")
    if out.milestone_samples:
        click.echo(f"milestones:    {', '.join(f'{m:,}' for m in out.milestone_samples)} samples")
