"""Character-level language modelling under PB: Tiny Shakespeare, a small GPT, optimizer × method sweeps.

One run trains :func:`pipeprop.models.char_gpt` in the simulator with one sequence of ``context``
characters per micro-batch and reports the validation loss in nats per character. A sweep runs every
``(optimizer, method, seed)`` of a TOML config one after the other (finished runs are skipped, so an
interrupted sweep continues where it stopped), then writes a table (mean ± std over seeds) and a plot::

    python -m pipeprop.experiments.lm sweep --config configs/lm/shakespeare-gpt-budget.toml --out runs/lm
    python -m pipeprop.experiments.lm report --out runs/lm          # table + plot from finished runs

Config keys (TOML, all optional): ``context``, ``d_model``, ``n_layers``, ``n_heads``, ``steps``,
``warmup_steps``, ``min_lr_ratio`` (cosine decay to this fraction), ``eval_every``, ``eval_windows``,
``micro_batch``, ``data_dir``, ``dtype``, ``device``, ``num_threads``, ``methods``, ``seeds``, and one
table per optimizer with its hyperparameters, e.g. ``[optimizers.adamw] lr = 1e-3, betas = [0.9, 0.99],
weight_decay = 0.1`` and ``[optimizers.sgd] lr = 0.1, momentum = 0.9``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ..api import build_simulator
from ..data.text import SequenceStream, TextDataset, load_tiny_shakespeare
from ..methods import get_method, normalize_optimizer
from ..models.gpt import char_gpt, lm_loss
from ..simulator import DivergenceError

__all__ = ["LMConfig", "load_lm_config", "run_lm", "sweep", "summarize", "plot_sweep"]


@dataclass
class LMConfig:
    """A language-model experiment (see the module docstring)."""

    name: str = "shakespeare-gpt"
    description: str = ""
    data_dir: Optional[str] = None
    context: int = 128
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    micro_batch: int = 1
    steps: int = 2000
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    eval_every: int = 250
    eval_windows: int = 64
    dtype: str = "float32"
    device: str = "cpu"
    num_threads: Optional[int] = 1
    methods: list[str] = field(default_factory=lambda: ["sgd", "pb", "pb+stash", "pb+sc", "pb+lwp", "pb+sc+lwp"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    optimizers: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {"adamw": {"lr": 1e-3, "betas": [0.9, 0.99], "weight_decay": 0.1}}
    )

    def __post_init__(self) -> None:
        if self.steps < 1 or self.context < 1 or self.micro_batch < 1:
            raise ValueError("steps, context and micro_batch must be >= 1")
        if self.warmup_steps < 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError("warmup_steps must be >= 0 and min_lr_ratio in [0, 1]")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype!r}")
        for m in self.methods:
            get_method(m)
        self.optimizers = {normalize_optimizer(k): dict(v) for k, v in self.optimizers.items()}
        for name, hp in self.optimizers.items():
            if "lr" not in hp:
                raise ValueError(f"[optimizers.{name}] needs an lr")

    def lr_factor(self, step: int) -> float:
        """Linear warm-up over ``warmup_steps``, then cosine decay to ``min_lr_ratio``."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def load_lm_config(path: str | Path, **overrides: Any) -> LMConfig:
    import tomllib

    data = tomllib.loads(Path(path).read_text())
    data.setdefault("name", Path(path).stem)
    data.update({k: v for k, v in overrides.items() if v is not None})
    unknown = set(data) - set(LMConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; valid keys: {sorted(LMConfig.__dataclass_fields__)}")
    return LMConfig(**data)


@torch.no_grad()
def evaluate_lm(model: torch.nn.Module, windows: tuple[torch.Tensor, torch.Tensor], batch: int = 64) -> float:
    """Mean validation cross-entropy in nats per character (live weights)."""
    x_all, y_all = windows
    total = 0.0
    for i in range(0, len(x_all), batch):
        x, y = x_all[i : i + batch], y_all[i : i + batch]
        total += float(lm_loss(model(x), y)) * x.numel()
    return total / x_all.numel()


def run_lm(cfg: LMConfig, optimizer: str, method: str, seed: int, *, data: Optional[TextDataset] = None,
           progress: bool = True) -> dict[str, Any]:
    """Train one model; returns the record ``{optimizer, method, seed, status, curve, final_val_loss, ...}``."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    data = data if data is not None else load_tiny_shakespeare(cfg.data_dir)
    hp = dict(cfg.optimizers[normalize_optimizer(optimizer)])
    torch.manual_seed(seed)
    dtype = getattr(torch, cfg.dtype)
    model = char_gpt(data.vocab_size, cfg.context, cfg.d_model, cfg.n_layers, cfg.n_heads).to(cfg.device, dtype)
    sim = build_simulator(model, lm_loss, method=method, optimizer=optimizer, **hp)
    base_lrs = [g["lr"] for g in sim.optimizer.param_groups]
    windows = tuple(t.to(cfg.device) for t in data.validation_windows(cfg.context, cfg.eval_windows))
    stream = SequenceStream(data, context=cfg.context, batch_size=cfg.micro_batch, steps=cfg.steps, seed=seed,
                            device=cfg.device)
    curve: list[dict[str, float]] = [{"step": 0, "chars": 0, "val_loss": evaluate_lm(model, windows)}]
    status, train_sum, train_n, t0 = "completed", 0.0, 0, time.perf_counter()
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, desc=f"{optimizer} {method} s{seed}", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    try:
        for step, (x, y) in enumerate(stream):
            factor = cfg.lr_factor(step)
            for g, lr in zip(sim.optimizer.param_groups, base_lrs):
                g["lr"] = lr * factor
            train_sum += sim.step(x, y)
            train_n += 1
            bar.update(1)
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                val = evaluate_lm(model, windows)
                curve.append({"step": step + 1, "chars": (step + 1) * cfg.micro_batch * cfg.context,
                              "train_loss": train_sum / train_n, "val_loss": val})
                train_sum, train_n = 0.0, 0
                bar.set_postfix(val=f"{val:.3f}", refresh=False)
                if not math.isfinite(val):
                    raise DivergenceError(step, val)
    except DivergenceError as err:
        status = "diverged"
        print(f"{optimizer} {method} seed {seed}: {err}", file=sys.stderr)
    finally:
        bar.close()
    final = curve[-1]["val_loss"] if status == "completed" else float("nan")
    return {
        "optimizer": normalize_optimizer(optimizer), "method": get_method(method).name, "seed": seed, "status": status,
        "hparams": hp, "final_val_loss": final, "best_val_loss": min(c["val_loss"] for c in curve),
        "seconds": round(time.perf_counter() - t0, 2), "num_stages": len(sim.stages),
        "max_delay": max(g["delay"] for g in sim.optimizer.param_groups), "curve": curve,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def _run_file(out: Path, optimizer: str, method: str, seed: int) -> Path:
    return out / "runs" / f"{optimizer}_{method.replace('+', '-')}_s{seed}.json"


def sweep(cfg: LMConfig, out: str | Path, *, progress: bool = True) -> list[dict[str, Any]]:
    """Every (optimizer, method, seed) of ``cfg``, one after the other; finished runs are reused.

    Pairs whose method does not support the optimizer (e.g. ``asyncpp`` with ``adamw``) are skipped, with a note.
    """
    out = Path(out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    data = load_tiny_shakespeare(cfg.data_dir)
    records = []
    for optimizer in cfg.optimizers:
        for method in cfg.methods:
            if optimizer not in get_method(method).optimizers:
                print(f"skipping {method} with {optimizer}: the method is defined for "
                      f"{', '.join(get_method(method).optimizers)} only", file=sys.stderr)
                continue
            for seed in cfg.seeds:
                path = _run_file(out, optimizer, get_method(method).name, seed)
                if path.is_file():
                    records.append(json.loads(path.read_text()))
                    continue
                rec = run_lm(cfg, optimizer, method, seed, data=data, progress=progress)
                path.write_text(json.dumps(rec, indent=1) + "\n")
                records.append(rec)
    return records


def _load_runs(out: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]


_METHOD_ORDER = ("sgd", "pb", "pb+stash", "pb+sc", "pb+lwp", "pb+sc+lwp", "asyncpp")
_OPTIMIZER_ORDER = ("adamw", "adam", "nadam", "sgd")


def _order(optimizer: str, method: str) -> tuple[int, int, str]:
    o = _OPTIMIZER_ORDER.index(optimizer) if optimizer in _OPTIMIZER_ORDER else len(_OPTIMIZER_ORDER)
    m = _METHOD_ORDER.index(method) if method in _METHOD_ORDER else len(_METHOD_ORDER)
    return o, m, method


def summarize(out: str | Path) -> str:
    """Markdown table: final and best validation loss (nats/char), mean ± std over seeds, per optimizer × method."""
    runs = _load_runs(Path(out))
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["optimizer"], r["method"]), []).append(r)
    lines = ["| optimizer | method | seeds | final val loss (nats/char) | best val loss | diverged | s/run |",
             "|---|---|---|---|---|---|---|"]

    def ms(values: list[float]) -> str:
        finite = [v for v in values if math.isfinite(v)]
        if not finite:
            return "—"
        sd = statistics.stdev(finite) if len(finite) > 1 else 0.0
        note = f" ({len(finite)} of {len(values)} seeds)" if len(finite) < len(values) else ""
        return f"{statistics.mean(finite):.3f} ± {sd:.3f}{note}"

    for (opt, method), rs in sorted(groups.items(), key=lambda kv: _order(*kv[0])):
        lines.append(
            f"| {opt} | {method} | {len(rs)} | {ms([r['final_val_loss'] for r in rs])} | "
            f"{ms([r['best_val_loss'] for r in rs])} | {sum(r['status'] == 'diverged' for r in rs)} | "
            f"{statistics.mean(r['seconds'] for r in rs):.0f} |"
        )
    return "\n".join(lines)


def plot_sweep(out: str | Path, path: str | Path) -> Path:
    """Validation loss against characters seen, mean over seeds, one panel per optimizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = _load_runs(Path(out))
    optimizers = sorted({r["optimizer"] for r in runs}, key=lambda o: (o != "adamw", o))
    fig, axes = plt.subplots(1, len(optimizers), figsize=(5.5 * len(optimizers), 4), sharey=True, squeeze=False)
    for ax, opt in zip(axes[0], optimizers):
        methods: dict[str, list[dict[str, Any]]] = {}
        for r in runs:
            if r["optimizer"] == opt and r["status"] == "completed":
                methods.setdefault(r["method"], []).append(r)
        for method, rs in sorted(methods.items(), key=lambda kv: _order(opt, kv[0])):
            n = min(len(r["curve"]) for r in rs)
            xs = [rs[0]["curve"][i]["chars"] for i in range(n)]
            ys = [statistics.mean(r["curve"][i]["val_loss"] for r in rs) for i in range(n)]
            ax.plot(xs, ys, label=f"{method} ({len(rs)} seeds)", ls="--" if method == "sgd" else "-")
        ax.set_title(f"{opt}")
        ax.set_xlabel("training characters")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("validation loss (nats/char)")
    lo = min((c["val_loss"] for r in runs if r["status"] == "completed" for c in r["curve"]), default=1.0)
    axes[0][0].set_ylim(lo - 0.05, min(4.3, lo + 1.5))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeprop.experiments.lm", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("sweep", help="run every (optimizer, method, seed) of a config")
    run.add_argument("--config", required=True, help="a TOML file, e.g. configs/lm/shakespeare-gpt-budget.toml")
    run.add_argument("--out", required=True, help="output folder (finished runs in it are reused)")
    run.add_argument("--data-dir", default=None, help="folder holding Tiny Shakespeare's input.txt")
    run.add_argument("--no-progress", action="store_true")
    rep = sub.add_parser("report", help="table and plot of the finished runs in --out")
    rep.add_argument("--out", required=True)
    rep.add_argument("--plot", default=None, help="where to write the plot (default OUT/val_loss.png)")
    args = parser.parse_args(argv)
    if args.command == "sweep":
        cfg = load_lm_config(args.config, data_dir=args.data_dir)
        sweep(cfg, args.out, progress=not args.no_progress)
    print(summarize(args.out))
    print(f"plot: {plot_sweep(args.out, getattr(args, 'plot', None) or Path(args.out) / 'val_loss.png')}")


if __name__ == "__main__":
    main()
