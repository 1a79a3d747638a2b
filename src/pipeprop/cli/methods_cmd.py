"""``pipeprop methods``: list the training methods."""

from __future__ import annotations

import click

from ..methods import available_methods, available_optimizers, get_method


@click.command()
def methods() -> None:
    """List the training methods accepted by --method and the optimizers each works with (--optimizer)."""
    click.echo(f"optimizers (--optimizer, independent of the method): {', '.join(available_optimizers())}")
    click.echo("")
    for name in available_methods():
        m = get_method(name)
        aliases = f"  (aliases: {', '.join(m.aliases)})" if m.aliases else ""
        opts = "all optimizers" if set(m.optimizers) == set(available_optimizers()) else f"{', '.join(m.optimizers)} only"
        click.echo(f"{name:<14} {m.summary} [{opts}]{aliases}")
