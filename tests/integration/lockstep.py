"""`Lockstep`: a Monitor whose step_begin first waits until the collector acknowledged every
earlier step (bounded), so a clip decided on step s is staged before step s + 1 begins.

The Monitor streams asynchronously, so which step first trains with a new clip otherwise
depends on the step time versus the loop latency (measured in ms and logged by the
collector). Real steps last far longer than the loop; lockstep reproduces that regime on a
model whose steps take milliseconds, which makes "in effect from the step after the event" a
deterministic check instead of a race.
"""

from __future__ import annotations

import time

WAIT_S = 30.0  # fail-safe bound on one wait; normally about one flush interval


class Lockstep:
    def __init__(self, monitor) -> None:
        self.monitor = monitor

    def attach(self, model, optimizer) -> None:
        self.monitor.attach(model, optimizer)

    def step_begin(self, step: int) -> None:
        deadline = time.monotonic() + WAIT_S
        while self.monitor.stats().get("buffered_steps", 0) and time.monotonic() < deadline:
            time.sleep(0.002)
        self.monitor.step_begin(step)

    def before_optimizer(self, step, grad_norm) -> None:
        self.monitor.before_optimizer(step, grad_norm)

    def step_end(self, step, **kw) -> None:
        self.monitor.step_end(step, **kw)

    def close(self) -> None:
        self.monitor.close()
