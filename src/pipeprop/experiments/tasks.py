"""What a run's task decides: how its data are cut and streamed, which loss trains the model, how it is evaluated.

The data set fixes the task (:attr:`~pipeprop.experiments.config.ExperimentConfig.task`):

* :class:`Classification` (the image data sets): samples are images, the loss is cross-entropy, an
  evaluation gives ``test_loss`` and ``test_acc`` on the test split; headline metric: accuracy.
* :class:`LanguageModelling` (``tinyshakespeare``): a sample is one sequence of ``context`` characters
  (:class:`~pipeprop.data.text.SequenceStream`), the loss is the mean next-character cross-entropy
  (:func:`~pipeprop.models.gpt.lm_loss`), an evaluation gives ``test_loss`` in nats per character on
  ``test_subset`` fixed, non-overlapping windows of the validation text (all of them by default), with
  ``test_bpc`` (bits per character) and ``test_ppl`` (perplexity); headline metric: the loss (lower is better).

The builders (:mod:`.builders`), the runner and the batched runs use these objects.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import ImageDataset, MicroBatchStream, SequenceStream, TextDataset

__all__ = ["Task", "Classification", "LanguageModelling", "task_of", "evaluate", "evaluate_lm", "unigram_loss",
           "TrackedCrossEntropy", "StackedTrackedCrossEntropy", "TrackedLMLoss", "StackedLMLoss"]


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageDataset, *, batch: int = 500, dtype: torch.dtype = torch.float32,
             device: torch.device | str = "cpu") -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` (live weights, eval mode) on the test split."""
    was_training = model.training
    model.eval()
    split = data.test
    loss_sum, correct = 0.0, 0
    try:
        for start in range(0, len(split), batch):
            x = data.normalize(split.images[start : start + batch], dtype).to(device)
            y = split.labels[start : start + batch].to(device)
            out = model(x)
            loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(dim=1) == y).sum())
    finally:
        model.train(was_training)
    n = max(1, len(split))
    return loss_sum / n, correct / n


@torch.no_grad()
def evaluate_lm(model: nn.Module, windows: tuple[Tensor, Tensor], *, batch: int = 64,
                device: torch.device | str = "cpu") -> float:
    """Mean next-character cross-entropy (nats per character) of ``model`` (live weights, eval mode) on
    ``windows = (x, y)`` of shape ``(n, context)`` each, ``batch`` windows per forward pass."""
    from ..models.gpt import lm_loss

    was_training = model.training
    model.eval()
    x_all, y_all = windows
    total = 0.0
    try:
        for start in range(0, len(x_all), batch):
            x, y = x_all[start : start + batch].to(device), y_all[start : start + batch].to(device)
            total += float(lm_loss(model(x), y)) * x.numel()
    finally:
        model.train(was_training)
    return total / x_all.numel()


def unigram_loss(data: TextDataset, targets: Tensor) -> float:
    """Cross-entropy (nats per character) of ``targets`` under the training split's character frequencies: the
    loss of a model that predicts every character from its frequency alone (the baseline to beat)."""
    counts = torch.bincount(data.train, minlength=data.vocab_size).double()
    log_p = (counts / counts.sum()).log()
    return float(-log_p[targets.reshape(-1)].mean())


class TrackedCrossEntropy:
    """Cross-entropy that also counts the correct predictions of the last call (engines return only the loss);
    ``correct`` is a tensor, not read here (the caller reads it, in blocks)."""

    def __init__(self) -> None:
        self.correct: Any = 0

    def __call__(self, output: Tensor, target: Tensor) -> Tensor:
        self.correct = (output.detach().argmax(dim=1) == target).sum()
        return F.cross_entropy(output, target)


class StackedTrackedCrossEntropy:
    """:class:`TrackedCrossEntropy` of K stacked runs: outputs ``[K, b, C]``, targets ``[K, b]`` -> K losses;
    ``correct`` holds each run's correct predictions of the last call (a tensor, read by the caller)."""

    def __init__(self) -> None:
        self.correct: Optional[Tensor] = None

    def __call__(self, output: Tensor, target: Tensor) -> Tensor:
        from torch.func import vmap

        self.correct = (output.detach().argmax(dim=-1) == target).sum(dim=-1)
        return vmap(F.cross_entropy)(output, target)


class TrackedLMLoss:
    """:func:`~pipeprop.models.gpt.lm_loss` with the interface of :class:`TrackedCrossEntropy` (``correct`` stays 0:
    language-modelling runs report no accuracy)."""

    correct = 0

    def __call__(self, logits: Tensor, targets: Tensor) -> Tensor:
        from ..models.gpt import lm_loss

        return lm_loss(logits, targets)


class StackedLMLoss:
    """:class:`TrackedLMLoss` of K stacked runs: logits ``[K, b, T, V]``, targets ``[K, b, T]`` -> K losses
    (``correct``: K zeros)."""

    def __init__(self) -> None:
        self.correct: Optional[Tensor] = None

    def __call__(self, logits: Tensor, targets: Tensor) -> Tensor:
        from torch.func import vmap

        from ..models.gpt import lm_loss

        self.correct = torch.zeros(logits.shape[0], dtype=torch.long)
        return vmap(lm_loss)(logits, targets)


class Task:
    """The task-dependent parts of a run (see the module docstring); one instance per run."""

    name: str = ""
    #: metric keys of one evaluation record besides ``test_loss``
    eval_keys: tuple[str, ...] = ()

    def cut(self, config: Any, data: Any) -> Any:
        """``data`` cut to ``config.train_subset``/``test_subset`` (``data`` is a private shallow copy)."""
        raise NotImplementedError

    def train_size(self, data: Any) -> int:
        """Training samples in one epoch."""
        raise NotImplementedError

    def test_size(self, data: Any) -> int:
        raise NotImplementedError

    def model_candidates(self, config: Any, data: Any) -> dict[str, Any]:
        """Keywords a model builder receives when it accepts them."""
        raise NotImplementedError

    def stream(self, config: Any, data: Any, total_steps: int, device: torch.device | str) -> Any:
        """The seeded, resumable stream of ``total_steps`` micro-batches (``state_dict``/``load_state_dict``)."""
        raise NotImplementedError

    def example_input(self, config: Any, data: Any, dtype: torch.dtype, device: torch.device | str) -> Tensor:
        """One micro-batch of inputs (graph capture of models that are not an ``nn.Sequential``)."""
        raise NotImplementedError

    def loss_fn(self) -> Callable[[Tensor, Tensor], Tensor]:
        raise NotImplementedError

    def stacked_loss_fn(self) -> Callable[[Tensor, Tensor], Tensor]:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, data: Any, config: Any, dtype: torch.dtype,
                 device: torch.device | str) -> dict[str, Optional[float]]:
        """``{"test_loss": ..., **eval_keys}`` of the live weights (non-finite values as ``None``)."""
        raise NotImplementedError

    def info(self, data: Any) -> dict[str, Any]:
        """Facts about the evaluation written to ``config.json`` and ``summary.json`` (e.g. a baseline)."""
        return {}


def _finite(value: float) -> Optional[float]:
    return value if math.isfinite(value) else None


class Classification(Task):
    name = "classification"
    eval_keys = ("test_acc",)

    def cut(self, config: Any, data: ImageDataset) -> ImageDataset:
        if config.train_subset is not None:
            data.train = data.train.subset(config.train_subset)
        if config.test_subset is not None:
            data.test = data.test.subset(config.test_subset)
        return data

    def train_size(self, data: ImageDataset) -> int:
        return len(data.train)

    def test_size(self, data: ImageDataset) -> int:
        return len(data.test)

    def model_candidates(self, config: Any, data: ImageDataset) -> dict[str, Any]:
        channels, height, width = data.image_shape
        return {"norm": config.norm, "num_classes": data.num_classes, "in_channels": channels, "image_size": height,
                "image_shape": (channels, height, width)}

    def stream(self, config: Any, data: ImageDataset, total_steps: int, device: torch.device | str) -> MicroBatchStream:
        from .builders import build_augment

        b = config.micro_batch
        steps_per_epoch = len(data.train) // b
        if steps_per_epoch == 0:
            raise ValueError(f"micro_batch {b} is larger than the training set ({len(data.train)} examples)")
        stream = MicroBatchStream(data, batch_size=b, epochs=total_steps / steps_per_epoch, seed=config.seed,
                                  augment=build_augment(config, data), dtype=getattr(torch, config.dtype), device=device)
        stream.total_steps = total_steps  # exact, independent of float rounding
        return stream

    def example_input(self, config: Any, data: ImageDataset, dtype: torch.dtype, device: torch.device | str) -> Tensor:
        return data.normalize(data.train.images[: config.micro_batch], dtype).to(device)

    def loss_fn(self) -> TrackedCrossEntropy:
        return TrackedCrossEntropy()

    def stacked_loss_fn(self) -> StackedTrackedCrossEntropy:
        return StackedTrackedCrossEntropy()

    def evaluate(self, model: nn.Module, data: ImageDataset, config: Any, dtype: torch.dtype,
                 device: torch.device | str) -> dict[str, Optional[float]]:
        loss, acc = evaluate(model, data, batch=config.eval_batch, dtype=dtype, device=device)
        return {"test_loss": _finite(loss), "test_acc": acc}


class LanguageModelling(Task):
    name = "language-modelling"
    eval_keys = ("test_bpc", "test_ppl")

    def __init__(self, context: int, test_subset: Optional[int] = None) -> None:
        self.context = int(context)
        self.test_subset = test_subset

    def cut(self, config: Any, data: TextDataset) -> TextDataset:
        if config.train_subset is not None:  # the text of train_subset non-overlapping sequences
            data.train = data.train[: config.train_subset * self.context + 1]
        return data

    def windows(self, data: TextDataset) -> tuple[Tensor, Tensor]:
        """The validation windows ``(x, y)`` of every evaluation: the first ``test_subset`` (default: all)."""
        return data.validation_windows(self.context, self.test_subset)

    def train_size(self, data: TextDataset) -> int:
        n = (len(data.train) - 1) // self.context
        if n < 1:
            raise ValueError(f"the training text ({len(data.train)} characters) is shorter than one sequence of "
                             f"context {self.context} + 1: lower context or raise train_subset")
        return n

    def test_size(self, data: TextDataset) -> int:
        return len(self.windows(data)[0])

    def model_candidates(self, config: Any, data: TextDataset) -> dict[str, Any]:
        return {"norm": config.norm, "vocab_size": data.vocab_size, "context": self.context}

    def stream(self, config: Any, data: TextDataset, total_steps: int, device: torch.device | str) -> SequenceStream:
        return SequenceStream(data, context=self.context, batch_size=config.micro_batch, steps=total_steps,
                              seed=config.seed, device=device)

    def example_input(self, config: Any, data: TextDataset, dtype: torch.dtype, device: torch.device | str) -> Tensor:
        b = config.micro_batch
        return data.train[: b * self.context].view(b, self.context).to(device)

    def loss_fn(self) -> TrackedLMLoss:
        return TrackedLMLoss()

    def stacked_loss_fn(self) -> StackedLMLoss:
        return StackedLMLoss()

    def evaluate(self, model: nn.Module, data: TextDataset, config: Any, dtype: torch.dtype,
                 device: torch.device | str) -> dict[str, Optional[float]]:
        loss = evaluate_lm(model, self.windows(data), batch=config.eval_batch, device=device)
        if not math.isfinite(loss):
            return {"test_loss": None, "test_bpc": None, "test_ppl": None}
        return {"test_loss": loss, "test_bpc": loss / math.log(2), "test_ppl": math.exp(min(loss, 700.0))}

    def info(self, data: TextDataset) -> dict[str, Any]:
        x, y = self.windows(data)
        return {"context": self.context, "test_characters": int(y.numel()),
                "baseline_test_loss": unigram_loss(data, y)}


def task_of(config: Any) -> Task:
    """The task object of ``config`` (from its data set)."""
    if config.task == LanguageModelling.name:
        return LanguageModelling(config.sequence_length, config.test_subset)
    return Classification()
