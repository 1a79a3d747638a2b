"""The ``pipeprop`` command line: ``pipeprop <command> --option ...``.

Subcommands live in their own modules and are imported only when used (so ``pipeprop --help`` is fast
and a command's heavy dependencies load only for that command). To add one, add an entry to
``COMMANDS``: ``name -> "module:attribute"`` where the attribute is a ``click.Command``.
"""

from __future__ import annotations

import importlib

import click

COMMANDS: dict[str, str] = {
    "analyze": "pipeprop.cli.analyze:analyze",
    "demo": "pipeprop.cli.demo:demo",
    "methods": "pipeprop.cli.methods_cmd:methods",
    "compare": "pipeprop.cli.compare:compare",
    "report": "pipeprop.cli.report:report",
    "regime": "pipeprop.cli.regime:regime",
    "reproduce": "pipeprop.cli.reproduce:reproduce",
    "scale": "pipeprop.cli.scale:scale",
    "stability": "pipeprop.cli.stability:stability",
    "train": "pipeprop.cli.train:train",
    "partition": "pipeprop.cli.partition_cmd:partition_cmd",
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pipeprop")
def main() -> None:
    """pipeprop: fine-grained asynchronous Pipelined Backpropagation at batch size one."""


__all__ = ["main", "COMMANDS"]
