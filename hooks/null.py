"""`NullMonitor`, the monitor when telemetry is off, and `create_monitor`, the one factory.

    mon = create_monitor(model, optimizer, target=target, run="exp42")  # None/"off": a NullMonitor

A NullMonitor has every public call of `Monitor` with the same signature and does nothing: no
hooks, no threads, no network.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from hooks.monitor import Monitor

OFF_TARGETS = (None, "", "off", "none")


class NullMonitor:
    """The monitor when telemetry is off: the same calls, no work, no threads."""

    def attach(self, model: nn.Module, optimizer: Any = None) -> None:
        pass

    def step_begin(self, step: int) -> None:
        pass

    def before_optimizer(self, step: int, grad_norm: torch.Tensor | float | None = None) -> None:
        pass

    def step_end(
        self,
        step: int,
        loss: torch.Tensor | float | None = None,
        mtp_losses: Iterable[torch.Tensor | float] | None = None,
        lr: float | None = None,
        tokens: int | None = None,
    ) -> None:
        pass

    def log(
        self,
        metrics: Mapping[str, Any],
        step: int | None = None,
        reduce: str | Mapping[str, str] = "mean",
    ) -> None:
        pass

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        yield

    def close(self, timeout: float | None = None) -> None:
        pass

    def stats(self) -> dict:
        return {}

    def __enter__(self) -> NullMonitor:
        return self

    def __exit__(self, *exc) -> None:
        pass


def create_monitor(
    model: nn.Module | None = None,
    optimizer: Any = None,
    *,
    target: str | None = None,
    run: str = "run",
    **kwargs,
) -> Monitor | NullMonitor:
    """The factory: a Monitor, or a NullMonitor when target is None/""/"off"/"none"."""
    if target is None or str(target).lower() in OFF_TARGETS:
        return NullMonitor()
    return Monitor(model, optimizer, target=target, run=run, **kwargs)
