"""The detectors over a stored run: the same frames, in the same order, as the collector saw.

    events = detect_offline(store, "run42")

A step's frame is built from `store.at_step(run, step)` (reduced values) with the metric
dictionary from `store.metrics(run)`; per-rank values are read only when a detector asks, for
the ranks that made the step's reduction (store.steps: world minus missing_ranks), which is
exactly what the collector's online frame holds. Steps are replayed in ascending order.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import polars as pl

from analytics.catalog import MetricIndex
from analytics.detectors import DetectorSet
from analytics.events import Event, sort_events
from analytics.frame import StepFrame


def iter_frames(
    store, run: str, index: MetricIndex | None = None, start: int = 0, stop: int | None = None
) -> Iterator[StepFrame]:
    """The stored steps start <= step < stop (all by default) as frames, in step order."""
    index = index or MetricIndex.from_frame(store.metrics(run))
    runs = store.runs().filter(run=run)
    world = int(runs["world_size"][0]) if runs.height else 1
    steps = store.steps(run).filter(pl.col("step") >= start)
    if stop is not None:
        steps = steps.filter(pl.col("step") < stop)
    for row in steps.iter_rows(named=True):
        step = int(row["step"])
        missing = set(row["missing_ranks"] or ())
        ranks = tuple(r for r in range(world) if r not in missing)
        df = store.at_step(run, step)

        def load(step=step, ranks=ranks) -> dict[int, np.ndarray]:
            out = {}
            for r in ranks:
                raw = store.at_step(run, step, rank=r)
                vec = np.full(index.size, np.nan)
                ids = raw["metric_id"].to_numpy().astype(np.int64)
                ok = ids < index.size
                vec[ids[ok]] = raw["value"].to_numpy().astype(np.float32)[ok]
                out[r] = vec
            return out

        yield StepFrame.from_rows(
            run, step, df["metric_id"].to_numpy(), df["value"].to_numpy(), index.size, ranks, load
        )


def detect_offline(store, run: str, detectors: DetectorSet | None = None) -> list[Event]:
    """Every event the detectors raise over the stored run, in the store's order."""
    detectors = detectors or DetectorSet()
    index = MetricIndex.from_frame(store.metrics(run))
    events: list[Event] = []
    for frame in iter_frames(store, run, index):
        events += detectors.observe(frame, index)
    return sort_events(events)
