"""Counters the collector exposes through `Collector.stats()` and logs periodically.

Several threads bump them (the event loop ingests, the writer thread writes); one lock keeps
the increments exact. A counter is a name in COUNTERS so a typo fails loudly in tests.
"""

from __future__ import annotations

import threading

COUNTERS = (
    "streams_opened",
    "streams_closed",
    "frames",
    "bytes",  # every frame received, and its value bytes
    "frames_duplicate",  # seq <= acked: ignored and acked again
    "frames_rejected",  # refused with a gRPC status
    "auth_failures",  # RPCs refused UNAUTHENTICATED
    "holes_reported",  # steps clients reported dropped (StepsDropped), stored as events
    "schemas_registered",
    "metrics_registered",
    "steps_reduced",
    "steps_incomplete",  # incomplete = reduced without every rank
    "stragglers",  # (step, rank) pairs left out of a reduction
    "late_values",  # values of already reduced steps, raw only
    "values_written",
    "flushes",
    "acks_sent",
    "store_errors",  # store writes or flushes that raised
    "clip_updates",
    "clip_acks",
    "events",  # detector events raised online
    "clip_decisions_observed",  # clip decisions not sent (observe-only)
    "clip_push_errors",
    "observer_errors",  # detection/control failures (logged)
    "operator_commands",  # operator clip commands applied
)


class Counters:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values = dict.fromkeys(COUNTERS, 0)

    def add(self, name: str, n: int = 1) -> None:
        if name not in self._values:
            raise KeyError(f"unknown counter {name!r}")
        with self._lock:
            self._values[name] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)
