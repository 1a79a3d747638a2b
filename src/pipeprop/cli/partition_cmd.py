"""``pipeprop partition MODEL``: show a zoo model's pipeline stages, delays and weight-version memory."""

from __future__ import annotations

import click


def _parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _parse_granularity(text: str):
    return int(text) if text.isdigit() else text


@click.command()
@click.argument("model", required=False)
@click.option("--norm", default=None, help="gn, online, ws+gn, bn or none (default: the model's own).")
@click.option("--granularity", "-g", default="layer", show_default=True, help="layer, block or a number of stages.")
@click.option("--num-classes", default=10, show_default=True, type=int)
@click.option("--delay-offset", default=0, show_default=True, type=int, help="Extra delay added to every stage.")
@click.option("--option", "-o", "options", multiple=True, metavar="KEY=VALUE",
              help="Builder option, e.g. -o width=8 -o shortcut=projection (repeatable).")
@click.option("--list", "list_only", is_flag=True, help="List the zoo's models and exit.")
def partition_cmd(model, norm, granularity, num_classes, delay_offset, options, list_only) -> None:
    """Print MODEL's stages: delay D_s, parameters |W_s|, weight versions D_s*|W_s| and the modules."""
    from .. import models
    from ..partition import flatten_sequential, partition

    if list_only or model is None:
        for name in models.list_models():
            click.echo(f"{name:<10} {models._ZOO[name].summary}")
        return
    kw = {}
    for item in options:
        if "=" not in item:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--option")
        key, value = item.split("=", 1)
        kw[key.strip()] = _parse_value(value.strip())
    try:
        net = models.get(model, norm=norm, num_classes=num_classes, **kw)
        part = partition(net, _parse_granularity(granularity), delay_offset=delay_offset)
    except (ValueError, TypeError) as err:
        raise click.UsageError(str(err)) from err
    rows = [("stage", "delay", "params", "D*|W|", "modules")]
    for st in part:
        n = st.num_parameters()
        rows.append((str(st.index), str(st.delay), f"{n:,}", f"{st.delay * n:,}",
                     " > ".join(models.describe(m) for m in flatten_sequential(st))))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        click.echo("  ".join(f"{r[i]:>{widths[i]}}" for i in range(4)) + "  " + r[4])
    total = sum(st.num_parameters() for st in part)
    mib = part.weight_version_bytes() / 2**20
    click.echo(
        f"{model}: {len(part)} stages ({part.granularity}), {total:,} parameters; PB holds "
        f"sum D_s*|W_s| = {part.weight_version_elements():,} weight-version elements ({mib:.2f} MiB), "
        f"{part.weight_version_elements() / max(total, 1):.1f}x the model"
    )
