"""``pipeprop analyze``: the quadratic-model analysis of delayed SGD and its mitigations (figures + CSVs)."""

from __future__ import annotations

import time

import click


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of integers, e.g. 0,1,4,16,64") from None
    if not values or min(values) < 0:
        raise click.BadParameter("give at least one delay, all >= 0, e.g. 0,1,4,16,64")
    return values


@click.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="analysis_out", show_default=True,
              help="Folder for the PNGs and CSVs.")
@click.option("--momentum", type=float, default=0.9, show_default=True, help="Momentum m.")
@click.option("--methods", default="pb,pb+sc,pb+lwp,pb+sc+lwp,pb+nesterov,pb+shrink,pipemare", show_default=True,
              help="Comma-separated methods for the rate curves, boundaries and the quadratic.")
@click.option("--heatmap-methods", default="pb,pb+sc,pb+lwp,pb+sc+lwp", show_default=True,
              help="Comma-separated methods for the heatmaps.")
@click.option("--delays", default="0,1,4,16,64", show_default=True, help="Delays of the rate-vs-ηλ curves.")
@click.option("--max-delay", type=int, default=32, show_default=True, help="Largest delay of the (ηλ, D) heatmap.")
@click.option("--heatmap-delay", type=int, default=8, show_default=True, help="Delay of the (ηλ, m) heatmap.")
@click.option("--grid", type=int, default=200, show_default=True, help="Grid points along ηλ (and m) in the heatmaps.")
@click.option("--quadratic-delay", type=int, default=8, show_default=True, help="Delay of the multi-eigenvalue quadratic.")
@click.option("--bridge-stages", type=int, default=4, show_default=True,
              help="Stages of the linear pipeline run through the real simulator (delay 2(S-1)).")
@click.option("--lr-range", default="1e-4,4", show_default=True,
              help="ηλ axis of the curves and heatmaps: MIN,MAX (log-spaced; lower it for momentum near 1).")
@click.option("--lwp-mode", type=click.Choice(["linear", "momentum-decay"]), default="linear", show_default=True,
              help="LWP extrapolation: T·η·v or the momentum-decayed sum.")
@click.option("--parts", default="rates,heatmaps,boundary,quadratic,bridge", show_default=True,
              help="Which parts to write (comma-separated).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def analyze(out_dir, momentum, methods, heatmap_methods, delays, max_delay, heatmap_delay, grid, quadratic_delay,
            bridge_stages, lr_range, lwp_mode, parts, seed, no_progress) -> None:
    """Convergence rate and stability of delayed SGD with momentum on a quadratic, per mitigation.

    Writes rate_vs_lr, heatmap_lr_delay, heatmap_lr_momentum, max_stable_lr, quadratic_loss and bridge
    (.png + .csv) into --out. Rates are spectral radii of the delayed heavy-ball recurrence (ηλ = learning
    rate × curvature); see docs/analysis.md.
    """
    import torch

    from ..analysis.report import AnalysisConfig, write_analysis

    torch.set_num_threads(1)  # the bridge's model is tiny; extra threads only spin on a shared machine

    split = lambda s: tuple(v.strip() for v in s.split(",") if v.strip())  # noqa: E731
    try:
        lr_lo, lr_hi = (float(v) for v in lr_range.split(","))
    except ValueError:
        raise click.BadParameter(f"{lr_range!r} is not MIN,MAX, e.g. 1e-4,4", param_hint="--lr-range") from None
    if bridge_stages < 1:
        raise click.BadParameter("--bridge-stages must be >= 1")
    try:
        cfg = AnalysisConfig(
            momentum=momentum, methods=split(methods), heatmap_methods=split(heatmap_methods),
            curve_delays=_int_list(delays), heatmap_max_delay=max_delay, heatmap_delay=heatmap_delay, grid=grid,
            quadratic_delay=quadratic_delay, bridge_stages=bridge_stages, seed=seed, lr_lambda_range=(lr_lo, lr_hi),
            options={"lwp_mode": lwp_mode},
        )
        start = time.perf_counter()
        files = write_analysis(out_dir, cfg, tasks=split(parts), progress=not no_progress)
    except ValueError as err:
        raise click.UsageError(str(err)) from err
    for f in files:
        click.echo(str(f))
    click.echo(f"wrote {len(files)} files in {time.perf_counter() - start:.1f} s")
