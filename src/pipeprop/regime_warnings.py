"""Warnings about method settings that the evidence says are harmful (one small check per setting).

:func:`warn_if_lwp_overshoots` warns when Linear Weight Prediction in ``lwp_mode="linear"`` predicts over a
horizon ``T`` (default: the stage delay ``D``) much longer than the momentum horizon ``1/(1 − m)``. With no
new gradients, momentum moves the weights by at most ``η m/(1 − m) v`` however long one waits, but linear
LWP extrapolates ``η T v``, so for ``T·(1 − m) ≫ 1`` it over-predicts. In the quadratic analysis
(docs/analysis.md) linear LWP alone becomes *less* stable than plain PB from ``T·(1 − m) ≈ 1.8`` and
SC + linear LWP from ``T·(1 − m) ≈ 1.0`` (crossovers at m = 0.5…0.95 all lie there). The regime map of
docs/results.md §2 (digits MLP, m = 0.9) agrees for SC + linear LWP: the best PB variant at D·(1 − m) = 0.4,
the worst at 1.0; for linear LWP alone it shows no harm at 2.2 (not resolvable there), so both limits stay.
Better options: ``lwp_mode="momentum-decay"`` (never over-predicts), or the momentum-preserving scaling rule
(``pipeprop scale``), which at batch size one gives m ≈ 0.997–0.999 and thus ``T·(1 − m) ≪ 1``.

Silence with ``warnings.simplefilter("ignore", pipeprop.LWPRegimeWarning)``.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable, Mapping, Optional

__all__ = ["LWPRegimeWarning", "lwp_overshoot", "warn_if_lwp_overshoots", "LWP_LIMIT", "SC_LWP_LIMIT"]

#: T·(1−m) above which linear LWP alone is less stable than plain PB (quadratic analysis, m = 0.5…0.95)
LWP_LIMIT = 1.8
#: T·(1−m) above which SC + linear LWP is less stable than plain PB (quadratic analysis, m = 0.5…0.95)
SC_LWP_LIMIT = 1.0


class LWPRegimeWarning(UserWarning):
    """Linear Weight Prediction is used in a regime (delay ≫ momentum horizon) where it does harm."""


def lwp_overshoot(group: Mapping[str, Any]) -> Optional[tuple[int, float, float]]:
    """``(T, m, T·(1−m))`` of a parameter group that uses linear LWP beyond its limit, else ``None``."""
    if not group.get("weight_prediction") or group.get("lwp_mode", "linear") != "linear":
        return None
    horizon = group.get("lwp_horizon")
    horizon = int(group.get("delay", 0) if horizon is None else horizon)
    # Adam-type groups: beta1 is the momentum of the equivalent SGD recurrence (docs/analysis.md §5)
    momentum = float(group["momentum"] if "momentum" in group else group.get("betas", (0.0,))[0])
    product = horizon * (1.0 - momentum)
    limit = SC_LWP_LIMIT if group.get("spike_compensation") else LWP_LIMIT
    return (horizon, momentum, product) if horizon > 0 and product >= limit * (1 - 1e-9) else None


def warn_if_lwp_overshoots(param_groups: Iterable[Mapping[str, Any]], *, stacklevel: int = 3) -> bool:
    """Warn (:class:`LWPRegimeWarning`) once if any group uses linear LWP with ``T·(1−m)`` at or over its limit.

    Returns whether it warned. ``param_groups`` are an optimizer's groups (``delay``, ``momentum``,
    ``weight_prediction``, ``lwp_mode``, ``lwp_horizon``, ``spike_compensation`` keys; missing = off).
    """
    worst = None
    for group in param_groups:
        hit = lwp_overshoot(group)
        if hit is not None and (worst is None or hit[2] > worst[2]):
            worst = (*hit, bool(group.get("spike_compensation")))
    if worst is None:
        return False
    horizon, momentum, product, sc = worst
    limit = SC_LWP_LIMIT if sc else LWP_LIMIT
    warnings.warn(
        f"Linear Weight Prediction over {horizon} steps with momentum {momentum:g}: horizon x (1 - momentum) = "
        f"{product:.2f} >= {limit:g}, so the prediction over-shoots and {'SC + linear LWP' if sc else 'linear LWP'} is expected "
        "to be less stable than plain pb (docs/analysis.md, docs/results.md). Use lwp_mode='momentum-decay', or "
        "scale the recipe to this batch size with the momentum-preserving rule (`pipeprop scale`), which keeps "
        "1/(1 - momentum) above the delay. Silence: warnings.simplefilter('ignore', pipeprop.LWPRegimeWarning).",
        LWPRegimeWarning,
        stacklevel=stacklevel,
    )
    return True
