"""Clip updates from the collector: staged when they arrive, applied at the next step boundary.

The stream reader thread calls `stage()` at any moment, possibly mid-step; changing a clamp
limit then would make one step use two limits. So updates wait here until the training thread
calls `apply(step)` from step_begin, which sets every limit through the adapter and asks for a
ClipAck(version, step): the step the new limits first trained. Versions are monotonic: an
older version is ignored, the version in force received again (after a reconnect the collector
may repeat it) is acknowledged again with its original step.

Limit semantics follow the wire contract: limit <= 0, inf or NaN switches the clamp off.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
from collections.abc import Callable

from hooks.adapter import MoEAdapter

log = logging.getLogger("stepwatch.hooks")


class ClipStager:
    def __init__(
        self,
        adapter: MoEAdapter,
        send_ack: Callable[[int, int], None],
        on_error: Callable[[str, BaseException], None],
    ) -> None:
        self.adapter, self.send_ack, self.on_error = adapter, send_ack, on_error
        self._lock = threading.Lock()
        self._staged: list[tuple[int, list[tuple[int, str, float]], str]] = []
        self.version, self.step = 0, -1  # in force, and the step it took effect
        self.counters: collections.Counter = collections.Counter()

    def stage(self, update) -> None:
        """Reader thread: keep a ClipUpdate until the next step boundary."""
        settings = [(int(s.layer), str(s.site), float(s.limit)) for s in update.settings]
        with self._lock:
            self._staged.append((int(update.version), settings, update.reason))
            self.counters["clip_updates_staged"] += 1

    def apply(self, step: int) -> None:
        """Training thread, at step_begin(step): apply everything staged, in version order."""
        with self._lock:
            staged, self._staged = sorted(self._staged, key=lambda u: u[0]), []
        for version, settings, reason in staged:
            if version == self.version:
                self.send_ack(self.step, version)
                continue
            if version < self.version:
                self._bump("clip_updates_stale")
                continue
            for layer, site, limit in settings:
                off = not limit > 0 or math.isinf(limit)  # NaN compares False: off
                try:
                    self.adapter.set_clamp(layer, site, None if off else limit)
                except Exception as exc:  # noqa: BLE001 - one bad setting spoils no other
                    self.on_error("clip_setting", exc)
            self.version, self.step = version, step
            self._bump("clip_updates_applied")
            log.info("stepwatch: clip update v%d (%s) applied at step %d", version, reason, step)
            self.send_ack(step, version)

    def stats(self) -> dict:
        with self._lock:
            return {**self.counters, "clip_version": self.version}

    def _bump(self, key: str) -> None:
        with self._lock:
            self.counters[key] += 1
