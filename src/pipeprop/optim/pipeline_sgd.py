"""SGD with momentum plus the paper's two mitigations, Spike Compensation and Linear Weight Prediction.

Per parameter group (= pipeline stage) with delay ``D = group["delay"]``, gradient ``g`` (coupled L2:
``g = grad + λ w``), momentum ``m`` and learning rate ``η``:

* heavy-ball SGDM:   ``v ← m v + g``,  ``w ← w − η v``   (equals ``torch.optim.SGD`` with dampening 0)
* Nesterov:          ``v ← m v + g``,  ``w ← w − η (g + m v)``
* Spike Compensation (SC, ``spike_compensation=True``):
  ``w ← w − η (a v + b g)`` with ``a = m^D'``, ``b = (1 − m^D')/(1 − m)``, ``D' = sc_delay or D``;
  ``sc_coefficients`` replaces ``(a, b)`` by a fixed pair or by ``f(m, D') -> (a, b)``.
* Linear Weight Prediction (LWP, ``weight_prediction=True``): the forward pass uses
  ``ŵ = w − η T u`` with horizon ``T = lwp_horizon or D`` (mode ``"linear"``), or the momentum-decayed
  extrapolation ``ŵ = w − η m(1−m^T)/(1−m) u`` (mode ``"momentum-decay"``). The direction ``u`` is the
  velocity ``v`` (``lwp_source="velocity"``, default) or the last applied update direction
  (``lwp_source="update"``: ``a v + b g`` under SC, ``g + m v`` under Nesterov, ``v`` otherwise). The
  prediction uses the state at the time of the forward; the backward runs through the live weights.

Subclasses (the baseline mitigations in :mod:`pipeprop.optim.baselines`) hook in through
:meth:`PipelineSGD._group_lr` (the stage's effective learning rate) and :meth:`PipelineSGD._process_grads`
(a transform of ``g`` before it enters the momentum buffer).

With ``D = 0`` SC and LWP reduce to plain SGD with momentum (``a = 1, b = 0``; ``ŵ = w``).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor

from .base import PipelineOptimizer, add_scaled, group_params, mul_scaled

__all__ = ["PipelineSGD", "spike_coefficients", "lwp_coefficient"]

LWP_MODES = ("linear", "momentum-decay")
LWP_SOURCES = ("velocity", "update")


def spike_coefficients(momentum: float, delay: int) -> tuple[float, float]:
    """Spike Compensation coefficients ``(a, b) = (m^D, (1 − m^D)/(1 − m))`` (``b = D`` when ``m = 1``)."""
    if delay < 0:
        raise ValueError(f"delay must be >= 0, got {delay}")
    a = momentum**delay
    b = float(delay) if momentum == 1.0 else (1.0 - a) / (1.0 - momentum)
    return a, b


def lwp_coefficient(momentum: float, horizon: int, mode: str = "linear") -> float:
    """Multiplier ``c`` of ``η v`` in the prediction ``ŵ = w − c η v``."""
    if mode == "linear":
        return float(horizon)
    if mode == "momentum-decay":
        if momentum == 1.0:
            return float(horizon)
        return momentum * (1.0 - momentum**horizon) / (1.0 - momentum)
    raise ValueError(f"unknown LWP mode {mode!r}; choose one of {LWP_MODES}")


class PipelineSGD(PipelineOptimizer):
    """SGD(M) for pipeline stages, with optional Spike Compensation and Linear Weight Prediction.

    Args:
        params: parameters or parameter groups; give each stage its own group with a ``"delay"`` key.
        lr: learning rate ``η``.
        momentum: heavy-ball momentum ``m``.
        weight_decay: L2 coefficient ``λ``; added to the gradient (coupled, as ``torch.optim.SGD``) unless
            ``decoupled_weight_decay`` (then ``w ← w (1 − η λ)`` before the step).
        nesterov: Nesterov momentum (not combinable with SC).
        delay: default stage delay ``D`` for groups without one.
        spike_compensation: apply SC in the update.
        sc_delay: delay used for the SC coefficients (default: the group's delay).
        weight_prediction: predict forward weights with LWP.
        lwp_horizon: prediction horizon ``T`` (default: the group's delay).
        lwp_mode: ``"linear"`` (``T η v``, default) or ``"momentum-decay"``.
        sc_coefficients: override SC's ``(a, b)``: a pair of floats, or a picklable callable
            ``f(momentum, delay) -> (a, b)`` (default: :func:`spike_coefficients`).
        lwp_source: direction LWP extrapolates along: ``"velocity"`` (default) or ``"update"`` (the last
            applied update direction, e.g. the SC-modified step ``a v + b g``; costs one buffer per weight).
        foreach_stages: update all stages with one multi-tensor call per operation (default) where the options
            allow it; ``False`` runs the per-stage reference loop. Both give the same numbers bit for bit.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        *,
        nesterov: bool = False,
        decoupled_weight_decay: bool = False,
        delay: int = 0,
        spike_compensation: bool = False,
        sc_delay: Optional[int] = None,
        weight_prediction: bool = False,
        lwp_horizon: Optional[int] = None,
        lwp_mode: str = "linear",
        sc_coefficients: Any = None,
        lwp_source: str = "velocity",
        foreach_stages: bool = True,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"invalid learning rate {lr}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"invalid weight_decay {weight_decay}")
        if nesterov and spike_compensation:
            raise ValueError("Spike Compensation is defined for heavy-ball momentum; use nesterov=False with SC")
        if lwp_mode not in LWP_MODES:
            raise ValueError(f"unknown lwp_mode {lwp_mode!r}; choose one of {LWP_MODES}")
        if lwp_source not in LWP_SOURCES:
            raise ValueError(f"unknown lwp_source {lwp_source!r}; choose one of {LWP_SOURCES}")
        _check_sc_coefficients(sc_coefficients)
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            nesterov=nesterov,
            decoupled_weight_decay=decoupled_weight_decay,
            delay=delay,
            spike_compensation=spike_compensation,
            sc_delay=sc_delay,
            weight_prediction=weight_prediction,
            lwp_horizon=lwp_horizon,
            lwp_mode=lwp_mode,
            sc_coefficients=sc_coefficients,
            lwp_source=lwp_source,
        )
        super().__init__(params, defaults)
        self.foreach_stages = bool(foreach_stages)

    supports_keeping_previous_weights = True

    #: the update is elementwise, so K runs whose parameters are stacked along dimension 0
    #: (:func:`pipeprop.train_many`) stay independent
    supports_stacked_runs = True

    #: ``group["lr"]`` may be a vector with one learning rate per stacked run
    supports_per_run_lr = True

    @property
    def predicts_forward_weights(self) -> bool:  # type: ignore[override]
        return any(g["weight_prediction"] for g in self.param_groups)

    def forward_uses_live_weights(self, group: dict[str, Any]) -> bool:
        return not group["weight_prediction"] or self._lwp_horizon(group) == 0

    def _lwp_horizon(self, group: dict[str, Any]) -> int:
        h = group["lwp_horizon"]
        return self.stage_delay(group) if h is None else int(h)

    def _keeps_velocity(self, group: dict[str, Any]) -> bool:
        return group["momentum"] != 0.0 or group["weight_prediction"]

    def _process_grads(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        """Transform ``g`` (loss gradient plus coupled L2) before the momentum update (hook; must not modify
        ``grads`` in place, they may be the parameters' ``.grad``)."""
        return grads

    def _sc_coefficients(self, group: dict[str, Any]) -> tuple[float, float]:
        d_sc = group["sc_delay"]
        delay = self.stage_delay(group) if d_sc is None else int(d_sc)
        rule = group.get("sc_coefficients")
        if rule is None:
            return spike_coefficients(group["momentum"], delay)
        a, b = rule(group["momentum"], delay) if callable(rule) else rule
        return float(a), float(b)

    def _lwp_direction(self, group: dict[str, Any], p: Tensor) -> Optional[Tensor]:
        st = self.state[p]
        if group.get("lwp_source", "velocity") == "update":
            return st.get("last_direction", st.get("momentum_buffer"))
        return st.get("momentum_buffer")

    @torch.no_grad()
    def forward_weights(self, group: dict[str, Any], out: Optional[list[Tensor]] = None) -> list[Tensor]:
        params = group_params(group)
        if self.forward_uses_live_weights(group):
            return super().forward_weights(group, out)
        coef = lwp_coefficient(group["momentum"], self._lwp_horizon(group), group["lwp_mode"])
        velocities = [self._lwp_direction(group, p) for p in params]
        if all(v is not None for v in velocities):  # one pass: w - c η u
            return add_scaled(params, velocities, -self._group_lr(group) * coef, out=out)
        if out is None:
            out = [torch.empty_like(p) for p in params]
        torch._foreach_copy_(out, params)
        moving = [(o, v) for o, v in zip(out, velocities) if v is not None]
        if moving:
            alpha = -self._group_lr(group) * coef
            add_scaled([o for o, _ in moving], [v for _, v in moving], alpha, inplace=True)
        return out

    @torch.no_grad()
    def forward_weights_into(self, stages: list[tuple[dict[str, Any], list[Tensor]]]) -> None:
        """LWP predictions of all stages in one pass (the same operations as :meth:`forward_weights`)."""
        if not self.foreach_stages or type(self).forward_weights is not PipelineSGD.forward_weights:
            return super().forward_weights_into(stages)
        for group, out in stages:
            params = group["params"]
            lr = self._group_lr(group)
            velocities = [self._lwp_direction(group, p) for p in params] if group["weight_prediction"] else []
            if self.forward_uses_live_weights(group) or isinstance(lr, Tensor) or any(v is None for v in velocities):
                self.forward_weights(group, out=out)
                continue
            alpha = -lr * lwp_coefficient(group["momentum"], self._lwp_horizon(group), group["lwp_mode"])
            for p, v, o in zip(params, velocities, out):
                torch.add(p, v, alpha=alpha, out=o)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """One update of every stage; a multi-tensor pass over all stages at once (:attr:`foreach_stages`)
        where the options allow it, else the per-stage reference loop (:meth:`_step_stage`); both give the
        same numbers bit for bit."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._update()
        return loss

    def _update(self) -> None:
        """The update of :meth:`step`, without the closure and the step hooks: what a subclass extends
        (overriding ``step`` and calling ``super().step()`` would run the hooks twice once torch has wrapped
        this class's ``step``, e.g. count every update twice for the learning-rate schedule)."""
        stages = []
        for group in self.param_groups:
            params = [p for p in group_params(group) if p.grad is not None]
            if params:
                stages.append((group, params, self._group_lr(group)))
        if self.foreach_stages and self._can_step_stages_together(stages):
            self._step_stages_together(stages, self._plan)
        else:
            for group, params, lr in stages:
                self._step_stage(group, params, lr)

    # ------------------------------------------------------------------ the reference path: one stage at a time
    def _step_stage(self, group: dict[str, Any], params: list[Tensor], lr: Any) -> None:
        grads = [p.grad for p in params]
        m, wd = group["momentum"], group["weight_decay"]
        if wd != 0.0 and not group["decoupled_weight_decay"]:
            grads = torch._foreach_add(grads, params, alpha=wd)
        grads = self._process_grads(group, params, grads)
        bufs = None
        if self._keeps_velocity(group):
            bufs = [self.state[p].get("momentum_buffer") for p in params]
            if any(b is None for b in bufs):
                for i, (p, g) in enumerate(zip(params, grads)):
                    if bufs[i] is None:
                        bufs[i] = self.state[p]["momentum_buffer"] = g.detach().clone()
                    else:
                        bufs[i].mul_(m).add_(g)
            else:
                torch._foreach_mul_(bufs, m)
                torch._foreach_add_(bufs, grads)
        terms = self._update_terms(group, grads, bufs)
        if group.get("weight_prediction") and group.get("lwp_source", "velocity") == "update":
            (first, c0), *rest = terms
            direction = torch._foreach_mul(first, c0)
            for t, c in rest:
                torch._foreach_add_(direction, t, alpha=c)
            for p, d in zip(params, direction):
                st = self.state[p]
                if "last_direction" in st:
                    st["last_direction"].copy_(d)
                else:
                    st["last_direction"] = d.detach().clone()
        self._apply_update(params, terms, lr, wd if group["decoupled_weight_decay"] else 0.0)

    def _update_terms(
        self, group: dict[str, Any], grads: list[Tensor], bufs: Optional[list[Tensor]]
    ) -> list[tuple[list[Tensor], float]]:
        """The update direction ``d = Σ c_j t_j`` as its terms ``[(t_j, c_j)]`` (``w ← w − η d``):
        ``v`` (heavy ball), ``g + m v`` (Nesterov), ``a v + b g`` (SC) or ``g`` (no momentum)."""
        by_name = {"g": grads, "v": bufs}
        return [(by_name[name], c) for name, c in self._term_coefficients(group, bufs is not None)]

    def _term_coefficients(self, group: dict[str, Any], has_velocity: bool) -> list[tuple[str, float]]:
        """:meth:`_update_terms` by name: ``("g", c)`` for the gradient, ``("v", c)`` for the velocity."""
        m = group["momentum"]
        if not has_velocity or m == 0.0:
            return [("g", 1.0)]
        if group["nesterov"]:
            return [("g", 1.0), ("v", m)]
        if group["spike_compensation"]:
            a, b = self._sc_coefficients(group)
            return [("v", a), ("g", b)] if b != 0.0 else [("v", a)]
        return [("v", 1.0)]

    # ------------------------------------------------------------------ the fast path: all stages at once
    _plan: Optional["_StagesPlan"] = None

    def __setstate__(self, state: dict[str, Any]) -> None:  # (load_state_dict: new state, so a new plan)
        super().__setstate__(state)
        self._plan = None

    def _can_step_stages_together(self, stages: list[tuple[dict[str, Any], list[Tensor], Any]]) -> bool:
        """Whether :meth:`_step_stages_together` can run ``stages``; makes :attr:`_plan` current when it can.
        The checks run only when the plan has to be made anew (see :meth:`_plan_key`)."""
        if len(stages) < 2 or type(self)._process_grads is not PipelineSGD._process_grads:
            return False
        for group, _, lr in stages:  # (before the key: a learning rate per run is a tensor)
            if isinstance(lr, Tensor) or (group["weight_prediction"] and group["lwp_source"] == "update"):
                return False
        key = self._plan_key(stages)
        if self._plan is not None and self._plan.key == key:
            return True
        for group, params, _ in stages:
            if self._keeps_velocity(group) and any("momentum_buffer" not in self.state[p] for p in params):
                return False  # the first step creates the buffers: reference path
        self._plan = _StagesPlan(key, stages, self._term_coefficients, self._keeps_velocity, fuse=key[0])
        return True

    def _plan_key(self, stages: list[tuple[dict[str, Any], list[Tensor], Any]]) -> tuple:
        """What the plan of :meth:`_step_stages_together` depends on: the stages, their learning rates now, their
        other options (momentum, SC, weight decay, ...), the parameters with gradients, whether the update may be
        in place, and the state (a new one after ``load_state_dict`` may lack the buffers)."""
        return (not self.keep_previous_weights, id(self.state),
                [(id(g), lr, [v for k, v in g.items() if k != "params" and k != "updates"], list(map(id, ps)))
                 for g, ps, lr in stages])

    def _step_stages_together(self, stages: list[tuple[dict[str, Any], list[Tensor], Any]],
                              plan: "_StagesPlan") -> None:
        """The same operations as :meth:`_step_stage` for every stage, as one multi-tensor call per operation
        and distinct coefficient (per-stage coefficients as scalar lists where torch has such an overload).
        The bookkeeping (which tensor takes which coefficient) is cached in a :class:`_StagesPlan`; ``plan`` is
        the current one, made by :meth:`_can_step_stages_together`."""
        params = plan.params
        grads: list[Tensor] = [p.grad for p in params]  # type: ignore[misc]
        state = self.state
        for (momentum, lr), idx in plan.fused:  # v ← m v + g, w ← w − η c v in one pass (see _StagesPlan)
            torch._fused_sgd_(
                [params[j] for j in idx], [grads[j].contiguous() for j in idx],
                [state[params[j]]["momentum_buffer"] for j in idx],
                weight_decay=0.0, momentum=momentum, lr=lr, dampening=0.0, nesterov=False, maximize=False,
                is_first_step=False,
            )
        for wd, idx in plan.coupled_wd:
            for j, t in zip(idx, torch._foreach_add([grads[j] for j in idx], [params[j] for j in idx], alpha=wd)):
                grads[j] = t
        bufs: list[Optional[Tensor]] = [None] * len(params)
        if plan.vidx:
            vbufs = [state[params[j]]["momentum_buffer"] for j in plan.vidx]
            torch._foreach_mul_(vbufs, plan.momentum)
            torch._foreach_add_(vbufs, [grads[j] for j in plan.vidx])
            for j, b in zip(plan.vidx, vbufs):
                bufs[j] = b
        for j in plan.fused_vidx:  # fused tensors with a further term that reads the velocity
            bufs[j] = state[params[j]]["momentum_buffer"]
        source = {"g": grads, "v": bufs}
        keep_previous = self.keep_previous_weights
        base = list(params)
        if plan.decay_idx:
            sub = [params[j] for j in plan.decay_idx]
            if keep_previous:
                scaled = torch._foreach_mul(sub, plan.decay)
            else:
                torch._foreach_mul_(sub, plan.decay)
                scaled = sub
            for j, t in zip(plan.decay_idx, scaled):
                base[j] = t
        new: list[Tensor] = list(base)
        spare = self.spare_weights if keep_previous else None
        for name, alpha, idx in plan.first:
            ts = source[name]
            if not keep_previous:
                torch._foreach_add_([base[j] for j in idx], [ts[j] for j in idx], alpha=alpha)
                continue
            fresh = []
            for j in idx:
                o = spare.pop(params[j], None) if spare else None
                if o is not None:
                    new[j] = torch.add(base[j], ts[j], alpha=alpha, out=o)  # type: ignore[arg-type]
                else:
                    fresh.append(j)
            if fresh:
                for j, w in zip(fresh, torch._foreach_add([base[j] for j in fresh], [ts[j] for j in fresh], alpha=alpha)):
                    new[j] = w
        for name, alpha, idx in plan.rest:  # further terms, in the reference's order per tensor
            ts = source[name]
            torch._foreach_add_([new[j] for j in idx], [ts[j] for j in idx], alpha=alpha)
        if keep_previous:
            for p, w in zip(params, new):
                p.data = w


#: dtypes whose fused SGD kernel on the CPU rounds as the separate operations (``tests/test_fast_paths.py``)
_FUSED_DTYPES = (torch.float32, torch.float64)

#: the fused kernel splits a tensor into 64-byte units and handles a tail shorter than its vector width with
#: scalar code that the compiler may contract into fused multiply-adds; tensors whose size is a multiple of 64
#: elements have no such tail on any vector width up to 64 elements
_FUSED_MULTIPLE = 64


def _fusable(p: Tensor) -> bool:
    return (p.device.type == "cpu" and p.dtype in _FUSED_DTYPES and p.layout == torch.strided
            and p.is_contiguous() and p.numel() % _FUSED_MULTIPLE == 0 and _fused_rounds_as_separate_ops(p.dtype))


@functools.lru_cache(maxsize=None)
def _fused_rounds_as_separate_ops(dtype: torch.dtype) -> bool:
    """Whether this machine's fused SGD kernel gives the separate operations' numbers bit for bit (checked once
    per dtype and process on random data; where it does not, e.g. a build whose vector loop contracts into fused
    multiply-adds, every tensor keeps the separate operations)."""
    gen = torch.Generator().manual_seed(0)
    w, g, v = (torch.randn(4 * _FUSED_MULTIPLE, generator=gen, dtype=dtype) for _ in range(3))
    for momentum, lr in ((0.9, 0.0371), (0.99918, 3.3e-5), (0.5, 1.7)):
        w1, v1, w2, v2 = w.clone(), v.clone(), w.clone(), v.clone()
        v1.mul_(momentum).add_(g)
        w1.add_(v1, alpha=-lr)
        torch._fused_sgd_([w2], [g], [v2], weight_decay=0.0, momentum=momentum, lr=lr, dampening=0.0, nesterov=False,
                          maximize=False, is_first_step=False)
        if not (torch.equal(w1, w2) and torch.equal(v1, v2)):
            return False
    return True


class _StagesPlan:
    """Which multi-tensor call each tensor of :meth:`PipelineSGD._step_stages_together` takes part in.

    With ``fuse`` (an in-place update) a tensor whose update starts with the heavy-ball step ``v ← m v + g``,
    ``w ← w − η c v`` (``m ≠ 0``, no weight decay) and that :func:`_fusable` admits takes that step as torch's
    fused SGD kernel (one pass over ``w``, ``v`` and ``g`` instead of three, the same numbers bit for bit);
    its further terms (SC's ``− η b g``) follow as for the other tensors.
    """

    def __init__(self, key: tuple, stages: list[tuple[dict[str, Any], list[Tensor], Any]],
                 term_coefficients: Callable[[dict[str, Any], bool], list[tuple[str, float]]],
                 keeps_velocity: Callable[[dict[str, Any]], bool], *, fuse: bool) -> None:
        self.key = key
        self.params: list[Tensor] = [p for _, ps, _ in stages for p in ps]
        coupled: list[float] = []
        moms: list[Optional[float]] = []
        self.decay_idx: list[int] = []
        self.decay: list[float] = []
        terms: list[tuple[tuple[str, float], ...]] = []  # per tensor: (source, alpha = -η c) per term
        j = 0
        for group, ps, lr in stages:
            keep = keeps_velocity(group)
            mom = group["momentum"] if keep else None
            dwd = group["weight_decay"] if group["decoupled_weight_decay"] else 0.0
            cwd = 0.0 if group["decoupled_weight_decay"] else group["weight_decay"]
            coefs = term_coefficients(group, keep)
            for _ in ps:
                coupled.append(cwd)
                moms.append(mom)
                if dwd != 0.0:
                    self.decay_idx.append(j)
                    self.decay.append(1.0 - lr * dwd)
                terms.append(tuple((name, -lr * c) for name, c in coefs))
                j += 1
        decayed = set(self.decay_idx)
        fused = [fuse and moms[j] not in (None, 0.0) and coupled[j] == 0.0 and j not in decayed
                 and terms[j][0][0] == "v" and _fusable(p) for j, p in enumerate(self.params)]
        self.fused = list(_buckets({j: (moms[j], -terms[j][0][1]) for j in range(len(fused)) if fused[j]}).items())
        self.fused_vidx = [j for j, f in enumerate(fused) if f and any(name == "v" for name, _ in terms[j][1:])]
        rows = [j for j, f in enumerate(fused) if not f]  # the tensors of the separate operations
        self.coupled_wd = [(wd, [rows[k] for k in idx])
                           for wd, idx in _buckets([coupled[j] for j in rows]).items() if wd != 0.0]
        self.vidx = [j for j in rows if moms[j] is not None]
        vm = [moms[j] for j in self.vidx]
        self.momentum: Any = vm[0] if vm and all(m == vm[0] for m in vm) else vm
        self.first = [(name, alpha, [rows[k] for k in idx])
                      for (name, alpha), idx in _buckets([terms[j][0] for j in rows]).items()]
        self.rest = []
        for pos in range(1, max((len(t) for t in terms), default=0)):
            rows = [j for j, t in enumerate(terms) if len(t) > pos]
            for (name, alpha), idx in _buckets([terms[j][pos] for j in rows]).items():
                self.rest.append((name, alpha, [rows[k] for k in idx]))


def _buckets(keys: Any) -> dict[Any, list[int]]:
    """Indices of ``keys`` (a list, or a dict index -> key) grouped by value (one multi-tensor call per distinct
    coefficient)."""
    out: dict[Any, list[int]] = {}
    for j, k in (keys.items() if isinstance(keys, dict) else enumerate(keys)):
        out.setdefault(k, []).append(j)
    return out


def _check_sc_coefficients(rule: Any) -> None:
    if rule is None or callable(rule):
        return
    try:
        a, b = rule
        float(a), float(b)
    except (TypeError, ValueError):
        raise ValueError(
            f"sc_coefficients must be None, a pair (a, b) of numbers or a callable f(momentum, delay) -> (a, b); got {rule!r}"
        ) from None
