"""``pipeprop report DIR``: tables (mean ± std over seeds) and plots from stored run directories."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from ..experiments.cli_options import friendly_errors


@click.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), default=None, help="where to write the report (default: DIRECTORY)")
@click.option("--title", default="", help="plot/table title")
@friendly_errors
def report(directory: str, out: Optional[str], title: str) -> None:
    """Summarise every run under DIRECTORY: results.md/.csv/.json and comparison.png.

    \b
    pipeprop report runs/compare-digits
    """
    from ..experiments.report import write_report

    paths = write_report(Path(directory), out=out, title=title)
    click.echo(paths["table"].read_text())
    click.echo(f"table: {paths['table']}\nplot:  {paths['plot']}", err=True)
