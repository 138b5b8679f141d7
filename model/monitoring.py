"""How the training loop talks to an optional monitor without ever depending on it.

`TrainingMonitor` is the interface the loop consumes: its five call points, with the signatures
model/train.py calls them with (its module docstring says when each runs). The consumer owns it:
hooks.Monitor and hooks.NullMonitor satisfy it structurally (hooks/ never imports model/, and
model/ imports nothing of ours; tests check the signatures match).

`SafeMonitor` is the loop's only view of a monitor: a null object when there is none, and an
error fence when there is one — an exception from a per-step call point (or close) is logged and
counted, never raised into training. `attach` is the exception: it runs before step 0, and a
monitor that cannot attach is a configuration error the user should see at once.
`DeferredMonitor` builds the real monitor at `attach` time, when the model and the optimizer
exist (the CLI's `--monitor` uses it; the loop itself never imports hooks): whatever the factory
raises there reaches the user.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

log = logging.getLogger("model.monitor")


@runtime_checkable
class TrainingMonitor(Protocol):
    """The call points of model/train.py's loop, in the order it calls them."""

    def attach(self, model: nn.Module, optimizer: Any = None) -> None:
        """Once, before the first step: the unwrapped model and its optimizer."""

    def step_begin(self, step: int) -> None:
        """Before anything of `step` runs."""

    def before_optimizer(self, step: int, grad_norm: torch.Tensor | float | None = None) -> None:
        """Gradients final (after any all-reduce), before clipping and optimizer.step()."""

    def step_end(
        self,
        step: int,
        loss: torch.Tensor | float | None = None,
        mtp_losses: Iterable[torch.Tensor | float] | None = None,
        lr: float | None = None,
        tokens: int | None = None,
    ) -> None:
        """After the optimizer: the step's loss, MTP losses, learning rate and tokens."""

    def close(self) -> None:
        """At the end, also when training raises."""


CALL_POINTS = tuple(name for name in vars(TrainingMonitor) if not name.startswith("_"))


class SafeMonitor:
    """Wraps a monitor (or None). `call(name, ...)` forwards one call point, swallowing errors."""

    def __init__(self, monitor: TrainingMonitor | None) -> None:
        if monitor is not None:
            missing = [name for name in CALL_POINTS if not callable(getattr(monitor, name, None))]
            if missing:  # the caller's bug: say so before training starts
                raise TypeError(f"monitor {type(monitor).__name__} lacks call points {missing}")
        self.monitor = monitor
        self.errors = 0

    def call(self, name: str, *args: Any, **kwargs: Any) -> None:
        if self.monitor is None:
            return
        if name == "attach":
            self.monitor.attach(*args, **kwargs)
            return
        try:
            getattr(self.monitor, name)(*args, **kwargs)
        except Exception:  # telemetry must never stop training
            self.errors += 1
            if self.errors <= 10:
                log.exception("monitor.%s failed (error %d; training continues)", name, self.errors)


class DeferredMonitor(TrainingMonitor):
    """Creates the monitor with `factory(model, optimizer)` on attach, then delegates."""

    def __init__(self, factory: Callable[[nn.Module, Any], TrainingMonitor]) -> None:
        self.factory = factory
        self.inner: TrainingMonitor | None = None

    def attach(self, model: nn.Module, optimizer: Any = None) -> None:
        if self.inner is None:
            self.inner = self.factory(model, optimizer)
        self.inner.attach(model, optimizer)

    def step_begin(self, step: int) -> None:
        if self.inner is not None:
            self.inner.step_begin(step)

    def before_optimizer(self, step: int, grad_norm: torch.Tensor | float | None = None) -> None:
        if self.inner is not None:
            self.inner.before_optimizer(step, grad_norm)

    def step_end(
        self,
        step: int,
        loss: torch.Tensor | float | None = None,
        mtp_losses: Iterable[torch.Tensor | float] | None = None,
        lr: float | None = None,
        tokens: int | None = None,
    ) -> None:
        if self.inner is not None:
            self.inner.step_end(step, loss=loss, mtp_losses=mtp_losses, lr=lr, tokens=tokens)

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()
