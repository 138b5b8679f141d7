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
    "batches",  # FrameBatch messages of plain streams (their frames counted one by one above)
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
    "steps_detected_again",  # a step already fed to the detectors, skipped (detect.py)
    "detector_states_saved",  # saves of a run's detector and clip-policy state
    "detector_states_restored",  # ... restored by this process
    "detector_state_refused",  # saved state that could not be used: a fresh start
    "detector_state_errors",  # a save, a load or a catch-up that failed (logged)
    "steps_replayed",  # stored steps replayed into restored detectors (catch-up)
    "observer_errors",  # detection/control failures (logged)
    "operator_commands",  # operator clip commands applied
    "store_outages",  # times the writer found the store away and started spooling
    "spool_records",  # store writes appended to the spool
    "spool_drained",  # spool records replayed into the store
    "spool_rejected",  # spool records the store refused for good (kept aside)
    "spool_full",  # appends the spool refused (bound or disk full): frames refused
    "frames_unavailable",  # data frames refused UNAVAILABLE (nothing could be made durable)
    "frames_skipped",  # seqs a resuming stream skipped (dropped by the client; holes)
    "runs_abandoned",  # runs whose ranks all vanished, marked abandoned
    "runs_evicted",  # runs dropped from memory (abandoned, finished and idle, or empty)
    "streams_superseded",  # streams ended because the same client opened a newer one
    "hellos_refused",  # Hellos refused (identity already streaming, too many runs, ...)
    # node agents' multiplexed streams (mux.py)
    "mux_streams_opened",
    "mux_streams_closed",
    "mux_frames",  # frames received on them (each also counted in frames once applied)
    "mux_batches",  # FrameBatch messages among them (frames counted one by one above)
    "mux_frames_late",  # frames of a rank whose part had ended: dropped (the rank resends)
    "mux_clips_coalesced",  # clip frames not sent because one went to the whole host
)


class Counters:
    def __init__(self, names: tuple[str, ...] = COUNTERS) -> None:
        self._lock = threading.Lock()
        self._values = dict.fromkeys(names, 0)

    def add(self, name: str, n: int = 1) -> None:
        if name not in self._values:
            raise KeyError(f"unknown counter {name!r}")
        with self._lock:
            self._values[name] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)


class RateLimitedLog:
    """At most one log line per `interval_s`; the next line says how many were not logged.
    For messages whose number a client controls (one per rejected frame)."""

    def __init__(self, logger, interval_s: float, clock=None) -> None:
        import time

        self._log = logger
        self.interval_s = interval_s
        self._clock = clock or time.monotonic
        self._next = float("-inf")
        self._suppressed = 0

    def __call__(self, level: int, msg: str, *args) -> None:
        now = self._clock()
        if now < self._next:
            self._suppressed += 1
            return
        if self._suppressed:
            msg += f" (and {self._suppressed} more like it in the last %.0f s, not logged)"
            args = (*args, self.interval_s)
            self._suppressed = 0
        self._log.log(level, msg, *args)
        self._next = now + self.interval_s
