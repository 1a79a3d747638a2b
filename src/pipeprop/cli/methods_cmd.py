"""``pipeprop methods``: list the training methods."""

from __future__ import annotations

import click

from ..methods import available_methods, get_method


@click.command()
def methods() -> None:
    """List the training methods accepted by --method."""
    for name in available_methods():
        m = get_method(name)
        aliases = f"  (aliases: {', '.join(m.aliases)})" if m.aliases else ""
        click.echo(f"{name:<14} {m.summary}{aliases}")
