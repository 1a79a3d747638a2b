"""Hyperparameter scaling rules: turn a batch-``B`` training recipe into one for micro-batch size ``b``.

Two rules (PAPER.md §2.2):

* ``"momentum"`` (the paper's rule, alias ``"effective_lr"``): keep the momentum horizon measured in
  samples and scale the *effective* learning rate ``η/(1−m)`` linearly with the batch size::

      m_b = m_B^(b/B),      η_b/(1−m_b) = (b/B) · η_B/(1−m_B)

* ``"linear"`` (alias ``"linear_lr"``): the linear scaling rule, ``η_b = (b/B) η_B`` with ``m`` unchanged.

Both keep each sample's total contribution to the weights (``η/(1−m)`` per sample, summed over the
``B/b`` steps that make up one reference batch) equal to the reference, so coupled L2 weight decay
``λ`` is kept unchanged.

For adaptive optimizers (``optimizer="adam"``, ``"adamw"``, ``"nadam"``) the **square-root rule** of
Malladi et al., "On the SDEs and Scaling Rules for Adaptive Gradient Algorithms", NeurIPS 2022, with
``κ = b/B``::

      η_b = η_B · √κ,      1 − β_b = κ (1 − β_B)   (both betas),      ε_b = ε_B / √κ

(the ε rule is an option, ``scale_eps``, on by default; the weight decay ``λ`` is kept). Schedules (epochs, warm-up, milestones) are converted to **samples**, the unit
that does not depend on the batch size; a reference given in optimizer steps is converted with ``B``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

__all__ = ["RULES", "Recipe", "ScaledRecipe", "scale_hparams", "scale_adam_hparams", "scale_recipe", "normalize_rule"]

ADAPTIVE_OPTIMIZERS = ("adam", "adamw", "nadam")

RULES = ("momentum", "linear")
_ALIASES = {
    "momentum": "momentum",
    "effective_lr": "momentum",
    "effective-lr": "momentum",
    "paper": "momentum",
    "linear": "linear",
    "linear_lr": "linear",
    "linear-lr": "linear",
}


def normalize_rule(rule: str) -> str:
    """Canonical rule name (``"momentum"`` or ``"linear"``); unknown names raise a ``ValueError``."""
    key = str(rule).strip().lower()
    if key not in _ALIASES:
        raise ValueError(f"unknown scaling rule {rule!r}; choose 'momentum' (the paper's rule) or 'linear'")
    return _ALIASES[key]


def scale_hparams(lr: float, momentum: float, from_batch: int, to_batch: int, rule: str = "momentum") -> tuple[float, float]:
    """Learning rate and momentum for batch ``to_batch`` from a recipe at ``from_batch``.

    >>> lr, m = scale_hparams(0.1, 0.9, 128, 1)
    >>> round(m, 6), f"{lr:.3e}"
    (0.999177, '6.428e-06')
    """
    if from_batch < 1 or to_batch < 1:
        raise ValueError(f"batch sizes must be >= 1, got from_batch={from_batch}, to_batch={to_batch}")
    if lr < 0:
        raise ValueError(f"learning rate must be >= 0, got {lr}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must lie in [0, 1) to be scaled, got {momentum}")
    ratio = to_batch / from_batch
    rule = normalize_rule(rule)
    if rule == "linear" or momentum == 0.0:
        return lr * ratio, momentum
    m_b = momentum**ratio
    # η_b = η_B · (b/B) · (1 − m_b)/(1 − m_B); -expm1(log(m)·r) is 1 − m^r without cancellation
    one_minus_mb = -math.expm1(math.log(momentum) * ratio)
    return lr * ratio * one_minus_mb / (1.0 - momentum), m_b


def scale_adam_hparams(
    lr: float, betas: Sequence[float], eps: float, from_batch: int, to_batch: int, *, scale_eps: bool = True
) -> tuple[float, tuple[float, float], float]:
    """Square-root rule for Adam-type optimizers: ``(η_b, (β1_b, β2_b), ε_b)`` from a recipe at ``from_batch``.

    >>> lr, (b1, b2), eps = scale_adam_hparams(1e-3, (0.9, 0.999), 1e-8, 64, 1)
    >>> f"{lr:.4e}", f"{b1:.7f}", f"{b2:.8f}", f"{eps:.1e}"
    ('1.2500e-04', '0.9984375', '0.99998438', '8.0e-08')
    """
    if from_batch < 1 or to_batch < 1:
        raise ValueError(f"batch sizes must be >= 1, got from_batch={from_batch}, to_batch={to_batch}")
    if lr < 0 or eps < 0:
        raise ValueError(f"learning rate and eps must be >= 0, got lr={lr}, eps={eps}")
    kappa = to_batch / from_batch
    scaled = []
    for beta in betas:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"betas must lie in [0, 1), got {tuple(betas)}")
        one_minus = kappa * (1.0 - beta)
        if one_minus > 1.0:
            raise ValueError(
                f"the square-root rule gives 1 - beta = {one_minus:.3g} > 1 for beta={beta} at b/B={kappa:.3g}; "
                "scale to a smaller batch or start from a larger beta"
            )
        scaled.append(1.0 - one_minus)
    b1, b2 = scaled
    return lr * math.sqrt(kappa), (b1, b2), eps / math.sqrt(kappa) if scale_eps else eps


@dataclass
class Recipe:
    """A reference training recipe at batch size ``batch_size``.

    Durations are in epochs (``epochs``, ``warmup_epochs``, ``milestones``) when ``dataset_size`` is
    known; alternatively give ``steps``/``warmup_steps``/``milestone_steps`` in optimizer steps at
    ``batch_size``. ``gamma`` is the step-schedule decay factor; ``schedule`` is ``"step"``,
    ``"cosine"`` or ``"constant"``. ``optimizer`` ``"adam"``/``"adamw"``/``"nadam"`` scales ``betas`` and
    ``eps`` with the square-root rule instead (``momentum`` is then unused).
    """

    batch_size: int
    lr: float
    momentum: float = 0.0
    optimizer: str = "sgd"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    epochs: Optional[float] = None
    warmup_epochs: float = 0.0
    milestones: Sequence[float] = ()
    gamma: float = 0.1
    schedule: str = "step"
    dataset_size: Optional[int] = None
    steps: Optional[int] = None
    warmup_steps: Optional[int] = None
    milestone_steps: Optional[Sequence[int]] = None


@dataclass
class ScaledRecipe:
    """A recipe for micro-batch size ``batch_size``; all durations in samples."""

    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    rule: str
    from_batch: int
    total_samples: Optional[int]
    warmup_samples: int
    milestone_samples: list[int] = field(default_factory=list)
    gamma: float = 0.1
    schedule: str = "step"
    optimizer: str = "sgd"
    betas: Optional[tuple[float, float]] = None
    eps: Optional[float] = None
    min_lr_factor: float = 0.0  # the cosine schedule decays to this fraction of ``lr``

    @property
    def steps(self) -> Optional[int]:
        """Optimizer steps at this batch size (``None`` if the length is unknown)."""
        return None if self.total_samples is None else self.total_samples // self.batch_size

    @property
    def effective_lr(self) -> float:
        """``η/(1−m)``, the learning rate a gradient receives in total through momentum."""
        return self.lr / (1.0 - self.momentum) if self.momentum < 1.0 else math.inf

    def optimizer_kwargs(self) -> dict:
        """``optimizer`` plus ``momentum`` (SGD) or ``betas``/``eps`` (Adam family), for ``build_simulator``."""
        if self.betas is None:
            return {"optimizer": self.optimizer, "momentum": self.momentum}
        return {"optimizer": self.optimizer, "betas": self.betas, "eps": self.eps}

    def to_dict(self) -> dict:
        return asdict(self)


def _samples(epochs: Optional[float], steps: Optional[float], recipe: Recipe, what: str) -> Optional[int]:
    if steps is not None:
        return int(round(steps * recipe.batch_size))
    if epochs is None:
        return None
    if recipe.dataset_size is None:
        if epochs == 0:
            return 0
        raise ValueError(f"{what} is given in epochs: set dataset_size to convert it to samples")
    return int(round(epochs * recipe.dataset_size))


def scale_recipe(recipe: Recipe, to_batch: int, rule: str = "momentum", *, scale_eps: bool = True) -> ScaledRecipe:
    """Scale ``recipe`` to micro-batch size ``to_batch``; schedules become sample counts.

    SGD recipes use ``rule``; Adam-type recipes (``recipe.optimizer``) the square-root rule.
    """
    optimizer = str(recipe.optimizer).strip().lower()
    betas: Optional[tuple[float, float]] = None
    eps: Optional[float] = None
    if optimizer in ADAPTIVE_OPTIMIZERS:
        lr, betas, eps = scale_adam_hparams(recipe.lr, recipe.betas, recipe.eps, recipe.batch_size, to_batch,
                                            scale_eps=scale_eps)
        momentum, rule = 0.0, "sqrt"
    elif optimizer == "sgd":
        lr, momentum = scale_hparams(recipe.lr, recipe.momentum, recipe.batch_size, to_batch, rule)
        rule = normalize_rule(rule)
    else:
        raise ValueError(f"unknown optimizer {recipe.optimizer!r}; choose sgd, {', '.join(ADAPTIVE_OPTIMIZERS)}")
    total = _samples(recipe.epochs, recipe.steps, recipe, "epochs")
    warmup = _samples(recipe.warmup_epochs, recipe.warmup_steps, recipe, "warmup_epochs") or 0
    if recipe.milestone_steps is not None:
        milestones = [int(round(s * recipe.batch_size)) for s in recipe.milestone_steps]
    else:
        milestones = [_samples(e, None, recipe, "milestones") or 0 for e in recipe.milestones]
    if sorted(milestones) != milestones:
        raise ValueError(f"milestones must increase, got {list(recipe.milestones or recipe.milestone_steps or [])}")
    return ScaledRecipe(
        batch_size=to_batch,
        lr=lr,
        momentum=momentum,
        weight_decay=recipe.weight_decay,
        rule=rule,
        from_batch=recipe.batch_size,
        total_samples=total,
        warmup_samples=warmup,
        milestone_samples=milestones,
        gamma=recipe.gamma,
        schedule=recipe.schedule,
        optimizer=optimizer,
        betas=betas,
        eps=eps,
    )
