"""How the training loop talks to an optional monitor without ever depending on it.

`SafeMonitor` is the loop's only view of a monitor: a null object when there is none, and an
error fence when there is one — an exception from a per-step call point (or close) is logged and
counted, never raised into training. `attach` is the exception: it runs before step 0, and a
monitor that cannot attach is a configuration error the user should see at once. `DeferredMonitor` builds the real monitor at `attach` time, when the model and the
optimizer exist (the CLI's `--monitor` uses it; the loop itself never imports hooks).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("model.monitor")

CALL_POINTS = ("attach", "step_begin", "before_optimizer", "step_end", "close")


class SafeMonitor:
    """Wraps a monitor (or None). `call(name, ...)` forwards one call point, swallowing errors."""

    def __init__(self, monitor: Any | None) -> None:
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


class DeferredMonitor:
    """Creates the monitor with `factory(model, optimizer)` on attach, then delegates."""

    def __init__(self, factory: Callable[[Any, Any], Any]) -> None:
        self.factory = factory
        self.inner: Any | None = None

    def attach(self, model: Any, optimizer: Any) -> None:
        if self.inner is None:
            self.inner = self.factory(model, optimizer)
        self.inner.attach(model, optimizer)

    def _forward(self, name: str, *args: Any, **kwargs: Any) -> None:
        if self.inner is not None:
            getattr(self.inner, name)(*args, **kwargs)

    def step_begin(self, step: int) -> None:
        self._forward("step_begin", step)

    def before_optimizer(self, step: int, grad_norm: Any) -> None:
        self._forward("before_optimizer", step, grad_norm)

    def step_end(self, step: int, **kwargs: Any) -> None:
        self._forward("step_end", step, **kwargs)

    def close(self) -> None:
        self._forward("close")
