"""Online detection: analytics' detectors on every reduced step, and the clip control loop.

    writer thread:  WriteMetrics -> on_metrics   (the run's MetricIndex grows)
                    WriteStep    -> on_step      (frame -> DetectorSet -> events, each with
                                                  its decision and incident (decision layer)
                                                  -> store.write_events
                                                  -> ClipPolicy (acts on `clamp` decisions)
                                                  -> push(...) unless observe-only)

The frame is built from the step's reduced rows exactly as analytics/offline.py builds it from
the store, so online and offline events are the same. Events go to the store on the writer
thread (the only thread that touches the store) and are flushed with the step's values.
The policy hears, for each clamped site, the max|h| and parameter norm of the experts that
triggered it (analytics.clip_policy.site_readings), so it relaxes a clamp that no longer binds
and keeps one over a still-growing expert. Clip decisions go to `push`
(control.ClipControl.push: versioned, every rank's stream,
stored with their reason), stamped with the monotonic time the step left the barrier so the
collector can measure frame-arrival -> update-on-the-wire latency.

Operators act on the same per-run ClipPolicy (freeze, set, clear) from the event loop; one
lock orders them with the writer thread. Nothing here raises into the writer: the writer
logs an observer error and goes on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np

from analytics.catalog import MetricIndex
from analytics.clip_policy import ClipPolicy, site_readings
from analytics.detectors import DetectorSet
from analytics.events import Event, to_records
from analytics.frame import StepFrame
from collector.reduction import StepRows
from collector.stats import Counters
from store.base import MetricDict, Store

log = logging.getLogger("collector.detect")
KEEP_EVENTS = 10_000  # online events remembered per run (for tests and introspection)

# push(run, settings, reason, step, origin_monotonic) -> version
PushFn = Callable[[str, list, str, int, float | None], int]


@dataclass
class RunDetect:
    index: MetricIndex = field(default_factory=MetricIndex)
    detectors: DetectorSet = field(default_factory=DetectorSet)
    policy: ClipPolicy = field(default_factory=ClipPolicy)
    events: list[Event] = field(default_factory=list)


class Detect:
    def __init__(
        self,
        store: Store,
        push: PushFn,
        counters: Counters,
        *,
        observe_only: bool = False,
        make_detectors: Callable[[], DetectorSet] = DetectorSet,
        make_policy: Callable[[], ClipPolicy] = ClipPolicy,
    ) -> None:
        self.store = store
        self.push = push
        self.counters = counters
        self.observe_only = observe_only
        self._make_detectors, self._make_policy = make_detectors, make_policy
        self._runs: dict[str, RunDetect] = {}
        self._lock = threading.Lock()

    def _run(self, run: str) -> RunDetect:
        rd = self._runs.get(run)
        if rd is None:
            rd = self._runs[run] = RunDetect(
                detectors=self._make_detectors(), policy=self._make_policy()
            )
        return rd

    # ---- writer thread ------------------------------------------------------------------
    def on_metrics(self, run: str, md: MetricDict) -> None:
        with self._lock:
            self._run(run).index.extend(
                md.metric_id, md.name, md.layer, md.expert, md.head, md.stat
            )

    def on_step(self, run: str, rows: StepRows, included: set[int], ready_at: float) -> None:
        with self._lock:
            rd = self._run(run)
        step = rows.status.step
        ranks = tuple(sorted(included))
        size = rd.index.size

        def rank_vectors() -> RankVectors:
            raw = rows.raw  # flat rows (~140 ms at 6M values): built only when asked for
            assert raw.rank is not None  # raw rows always name their rank
            return RankVectors(raw.metric_id, raw.rank, raw.value, size, ranks)

        frame = StepFrame.from_rows(
            run, step, rows.reduced.metric_id, rows.reduced.value, size, ranks, rank_vectors
        )
        events = rd.detectors.observe(frame, rd.index)
        with self._lock:
            watched = rd.policy.watched()
        held, norms = site_readings(frame, rd.index, watched)
        if not events:
            with self._lock:
                decisions = rd.policy.step(step, [], held, norms)
        else:
            self.counters.add("events", len(events))
            for ev in events:
                log.log(
                    logging.ERROR
                    if ev.severity == "critical"
                    else logging.WARNING
                    if ev.severity == "warning"
                    else logging.INFO,
                    "run %s: %s",
                    run,
                    ev.brief(),
                )
            self.store.write_events(run, to_records(events))
            with self._lock:
                rd.events += events
                del rd.events[:-KEEP_EVENTS]
                decisions = rd.policy.step(step, events, held, norms)
        for d in decisions:
            setting = [(d.layer, d.site, d.limit)]
            if self.observe_only:
                self.counters.add("clip_decisions_observed")
                log.warning(
                    "run %s (observe-only): would set %s clamp of layer %d to %s (%s)",
                    run,
                    d.site,
                    d.layer,
                    d.limit,
                    d.reason,
                )
                continue
            try:
                self.push(run, setting, d.reason, d.step, ready_at)
            except Exception:
                self.counters.add("clip_push_errors")
                log.exception("run %s: clip update %s failed", run, setting)

    # ---- operators (event loop) ----------------------------------------------------------
    def operator(self, run: str, op: str, items: list) -> list[tuple[int, str]]:
        """Apply an operator command to the run's policy; returns the frozen sites."""
        with self._lock:
            policy = self._run(run).policy
            for item in items:
                layer, site = item[0], item[1]
                if op == "set":
                    policy.operator_set(layer, site, item[2])
                elif op == "clear":
                    policy.operator_clear(layer, site)
                elif op == "freeze":
                    policy.freeze(layer, site)
                elif op == "unfreeze":
                    policy.unfreeze(layer, site)
            return policy.frozen

    def forget(self, run: str) -> None:
        """The collector evicted the run (writer thread, after the run's last step)."""
        with self._lock:
            self._runs.pop(run, None)

    def events(self, run: str) -> list[Event]:
        with self._lock:
            rd = self._runs.get(run)
            return list(rd.events) if rd else []


class RankVectors(Mapping):
    """rank -> that rank's raw values of the step as a dense float64 vector (NaN: not sent),
    as analytics.frame.rank_vectors gives them, but built one rank at a time on access.

    A detector asks for per-rank values only once it has found something (NonFinite names the
    ranks a NaN came from). At 4,096 ranks the eager dict would be 4,096 dense vectors at
    once (~2 GB at 65,000 metrics) and 4,096 passes over the step's millions of raw rows; here
    the rows are grouped by rank with one sort, and each vector is one slice and scatter."""

    def __init__(
        self,
        metric_id: np.ndarray,
        rank: np.ndarray,
        value: np.ndarray,
        size: int,
        ranks: tuple[int, ...],
    ) -> None:
        ids = np.asarray(metric_id)
        keep = (ids >= 0) & (ids < size)
        rk = np.asarray(rank, dtype=np.int32)[keep]
        order = np.argsort(rk, kind="stable")  # stable: a repeated row's last write wins
        self._rank, self._ids = rk[order], ids[keep].astype(np.int32)[order]
        self._value = np.asarray(value, dtype=np.float32)[keep][order]
        self._ranks = tuple(int(r) for r in ranks)
        self._known = set(self._ranks)
        self._size = size

    def __getitem__(self, rank: int) -> np.ndarray:
        if rank not in self._known:
            raise KeyError(rank)
        lo, hi = np.searchsorted(self._rank, [rank, rank + 1])
        vec = np.full(self._size, np.nan)
        vec[self._ids[lo:hi]] = self._value[lo:hi]
        return vec

    def __iter__(self) -> Iterator[int]:
        return iter(self._ranks)

    def __len__(self) -> int:
        return len(self._ranks)
