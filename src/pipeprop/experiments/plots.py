"""PNG plots of runs: loss and accuracy (language models: loss only) against samples (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

__all__ = ["plot_run", "plot_comparison"]

Record = Mapping[str, float]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(metrics: Sequence[Record], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(m["samples"], m[key]) for m in metrics if m.get(key) is not None]
    if not pts:
        return np.zeros(0), np.zeros(0)
    x, y = zip(*pts)
    return np.asarray(x, dtype=float), np.asarray(y, dtype=float)


def _has(metrics: Sequence[Record], key: str) -> bool:
    return any(m.get(key) is not None for m in metrics)


def plot_run(metrics: Sequence[Record], path: Path, title: str = "") -> Path:
    """Train/test loss and train/test accuracy against samples seen (one loss panel when there is no accuracy,
    as for language models, whose loss is in nats per character)."""
    plt = _pyplot()
    if not (_has(metrics, "test_acc") or _has(metrics, "train_acc")):
        fig, ax_loss = plt.subplots(1, 1, figsize=(5.5, 3.8))
        for key, style in (("train_loss", "-"), ("test_loss", "--")):
            x, y = _series(metrics, key)
            if len(x):
                ax_loss.plot(x, y, style, marker=".", label=key.replace("test", "validation").replace("_", " "))
        ax_loss.set_ylabel("loss (nats/char)")
        return _save(plt, fig, (ax_loss,), path, title)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, ax, style in (
        ("train_loss", ax_loss, "-"), ("test_loss", ax_loss, "--"), ("train_acc", ax_acc, "-"), ("test_acc", ax_acc, "--")
    ):
        x, y = _series(metrics, key)
        if len(x):
            ax.plot(x, y, style, marker=".", label=key.replace("_", " "))
    ax_loss.set_ylabel("loss")
    ax_acc.set_ylabel("accuracy")
    return _save(plt, fig, (ax_loss, ax_acc), path, title)


def plot_comparison(runs: Mapping[str, Sequence[Sequence[Record]]], path: Path, title: str = "") -> Path:
    """Test accuracy (language models: validation loss) and train loss against samples, mean over seeds
    (shaded: min..max) per label."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    accuracy = any(_has(m, "test_acc") for seeds in runs.values() for m in seeds)
    headline = "test_acc" if accuracy else "test_loss"
    for label, seeds in runs.items():
        for ax, key in zip(axes, (headline, "train_loss")):
            curves = [_series(m, key) for m in seeds]
            curves = [c for c in curves if len(c[0])]
            if not curves:
                continue
            n = min(len(c[0]) for c in curves)
            x = curves[0][0][:n]
            ys = np.stack([c[1][:n] for c in curves])
            (line,) = ax.plot(x, ys.mean(0), label=f"{label} (n={len(curves)})")
            if len(curves) > 1:
                ax.fill_between(x, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.2)
    axes[0].set_ylabel("test accuracy" if accuracy else "validation loss (nats/char)")
    axes[1].set_ylabel("train loss (running mean)")
    axes[1].set_yscale("log")
    return _save(plt, fig, axes, path, title, legend_size=8)


def _save(plt, fig, axes, path: Path, title: str, legend_size: float | None = None) -> Path:
    """Label the shared x axis, add grids, legends and the title, write the PNG and close the figure."""
    for ax in axes:
        ax.set_xlabel("samples")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=legend_size)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
