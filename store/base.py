"""The columnar store contract: one read/write API, several backends that pass one test suite.

Writers (the collector) hand over numpy columns; readers (CLI, dashboard, reports) get polars
frames. Every write is idempotent on its natural key, so a resent frame never double-counts:

| table      | natural key                    | columns                                                  |
|------------|--------------------------------|----------------------------------------------------------|
| runs       | run                            | run, world_size, config_json, started_at, updated_at,    |
|            |                                | last_step, status ("live" / "finished" / "abandoned")    |
| metrics    | (run, metric_id)               | run, metric_id, name, layer, expert, head, stat, unit,   |
|            |                                | reduce ("sum" / "mean" / "max" / "min" / "mean_nonzero") |
| raw        | (run, rank, step, metric_id)   | run, rank, step, metric_id, value (float32)              |
|            |                                | (written as ValueBatch rows or as RawBlocks: per-rank    |
|            |                                | vectors, the way the collector receives them)            |
| reduced    | (run, step, metric_id)         | run, step, metric_id, value (float32), n_ranks           |
|            |                                | (stored as vectors per (step, layout), store/reduced.py; |
|            |                                | a world-1 run's as references to its raw vectors)        |
| steps      | (run, step)                    | run, step, n_ranks, missing_ranks (list[int]), complete, |
|            |                                | wall_time                                                |
| events     | (run, step, kind, site)        | run, step, kind, site, value, threshold, severity,       |
|            |                                | onset_step, detail (JSON text)                           |
| clips      | (run, version, layer, site)    | run, version, step, layer, site, limit (float32, inf =   |
|            |                                | off), reason, acked_step (-1 until acknowledged)         |
| detector_  | (run, kind)                    | run, kind ("detect": the online detectors and clip       |
| state      |                                | policy), step (the last step they saw), state (an opaque |
|            |                                | blob; ClickHouse holds it as base64 text)                |

A later write of the same key replaces the earlier one (last write wins); reads never show two
rows for one key. This module imports nothing of ours (DESIGN.md).
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass, field

import numpy as np
import polars as pl

RUN_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
REDUCE_OPS = ("sum", "mean", "max", "min", "mean_nonzero")
END_STATUSES = ("finished", "abandoned")  # finished: every rank said goodbye; abandoned:
# every rank vanished without one (the collector's idle rule, collector/ingest.py)


class StoreError(Exception):
    """Base class of store errors; the message says what was wrong."""


class InvalidInput(StoreError, ValueError):
    """A write or read was given something malformed (bad run name, ragged columns...)."""


class NotFound(StoreError, KeyError):
    """The run or metric asked for does not exist."""


def check_run_name(run: str) -> str:
    if not isinstance(run, str) or not RUN_NAME_RE.match(run):
        raise InvalidInput(f"run name {run!r} must match {RUN_NAME_RE.pattern}")
    return run


@dataclass(frozen=True)
class RunInfo:
    run: str
    world_size: int
    config_json: str = "{}"
    started_at: float = 0.0  # unix seconds


StrColumn = list[str] | pl.Series


@dataclass
class MetricDict:
    """Columns of metric-dictionary rows for one run (equal lengths)."""

    metric_id: np.ndarray  # int32, dense per run
    name: StrColumn  # a list, or a polars Utf8 Series (no Python object per row)
    layer: np.ndarray  # int32, -1 = none
    expert: np.ndarray  # int32, -1 = none
    head: np.ndarray  # int32, -1 = none
    stat: StrColumn
    unit: StrColumn
    reduce: StrColumn  # each in REDUCE_OPS


@dataclass
class ValueBatch:
    """Columns of value rows (equal lengths). rank is None for reduced values."""

    step: np.ndarray  # int64
    metric_id: np.ndarray  # int32
    value: np.ndarray  # float32
    rank: np.ndarray | None = None  # int32 (raw values only)
    n_ranks: np.ndarray | None = None  # int32 (reduced values only)


@dataclass
class RawBlock:
    """Per-rank values of one step as a dense matrix: row i is rank[i]'s value of every metric
    in `metric_id` (the same columns for every row: ranks that registered the same schema).
    The logical rows are the R x M (rank, step, metric_id, value) of the raw table; a backend
    may keep them as one stored row per rank (a vector), which is what makes six million
    values per step affordable. Natural key and last-write-wins rule as for ValueBatch rows."""

    step: int  # >= 0
    rank: np.ndarray  # int32 [R], distinct
    metric_id: np.ndarray  # int32 [M], distinct
    value: np.ndarray  # float32 [R, M], C-contiguous

    def cells(self) -> ValueBatch:
        """The block's R x M logical raw rows, rank-major (rank[0]'s metrics first)."""
        r, m, v = np.asarray(self.rank), np.asarray(self.metric_id), np.asarray(self.value)
        if r.ndim != 1 or m.ndim != 1 or v.shape != (r.size, m.size):
            raise InvalidInput(
                f"RawBlock value must have shape (len(rank), len(metric_id)) = "
                f"({r.size}, {m.size}), got {v.shape}"
            )
        return ValueBatch(
            step=np.full(v.size, self.step, dtype=np.int64),
            metric_id=np.tile(m, r.size),
            value=v.reshape(-1),
            rank=np.repeat(r, m.size),
        )


@dataclass(frozen=True)
class EventRecord:
    """One detector event as stored (analytics/ owns the detectors; the store only keeps rows)."""

    step: int  # the step whose values raised it (>= 0)
    kind: str  # e.g. "expert_death", "blowup", "nonfinite"
    site: str  # where: a metric-name prefix, e.g. "moe/layer04/expert003"
    value: float  # the statistic that crossed the threshold
    threshold: float
    severity: str  # one of SEVERITIES
    onset_step: int  # first step of the anomaly (<= step)
    detail: str = "{}"  # JSON object text: evidence, labels


@dataclass(frozen=True)
class ClipRecord:
    """One (layer, site) setting of a versioned clip update, and when it took effect.
    Writing the same (version, layer, site) again replaces the row: that is how an
    acknowledgement fills in acked_step."""

    version: int  # ClipUpdate.version (>= 1)
    step: int  # the run's step when it was decided (the event's step)
    layer: int
    site: str  # "routed" | "shared"
    limit: float  # SwiGLU clamp L; inf = off
    reason: str  # the event that caused it, or "operator ..."
    acked_step: int = -1  # first step trained with it on every acking rank; -1 = not yet


SEVERITIES = ("info", "warning", "critical")
HOLE_EVENT_KIND = "steps_dropped"  # an event marking steps [onset_step, step] a rank never sent


@dataclass(frozen=True)
class StepStatus:
    step: int
    n_ranks: int  # ranks whose values went into the reduction
    missing_ranks: tuple[int, ...] = field(default_factory=tuple)  # stragglers
    complete: bool = True  # False when reduced without every rank
    wall_time: float = 0.0


class Store(abc.ABC):
    """Backends implement these; `open_store(url)` (store/__init__.py) picks one."""

    # ---- writes (the collector) -------------------------------------------------------
    @abc.abstractmethod
    def open_run(self, info: RunInfo) -> None:
        """Create or update the run row (status becomes "live")."""

    @abc.abstractmethod
    def finish_run(self, run: str, status: str = "finished") -> None:
        """Mark the run ended: status "finished" or "abandoned" (END_STATUSES)."""

    def lock_writer(self, timeout_s: float = 0.0) -> None:
        """Become the one process writing this store, waiting up to timeout_s for another
        one to let go; StoreError naming the holder after that. No-op for backends where
        several writers are safe (ClickHouse, memory)."""
        return None  # the Parquet store overrides this

    @abc.abstractmethod
    def write_metrics(self, run: str, metrics: MetricDict, *, fresh: bool = False) -> None:
        """Upsert metric-dictionary rows. `fresh`: the caller vouches that every id is above
        the run's dictionary and every name new to it (the collector's registry holds the
        whole dictionary and has checked both), so a backend may skip its own name check."""

    @abc.abstractmethod
    def write_raw(self, run: str, batch: ValueBatch) -> None:
        """Per-rank values (batch.rank set)."""

    def write_raw_block(self, run: str, block: RawBlock) -> None:
        """Per-rank values as a dense block; same rows as write_raw of its R x M cells.
        Backends override this to store the vectors as they are (this default expands them)."""
        self.write_raw(run, block.cells())

    @abc.abstractmethod
    def write_reduced(self, run: str, batch: ValueBatch) -> None:
        """Values reduced across ranks (batch.n_ranks set)."""

    @abc.abstractmethod
    def write_steps(self, run: str, steps: list[StepStatus]) -> None:
        """Per-step barrier outcome (which ranks made it, stragglers)."""

    @abc.abstractmethod
    def write_events(self, run: str, events: list[EventRecord]) -> None:
        """Detector events; one row per (step, kind, site), a rewrite replaces it."""

    @abc.abstractmethod
    def write_clips(self, run: str, clips: list[ClipRecord]) -> None:
        """Clip-update settings; one row per (version, layer, site), a rewrite replaces it
        (an acknowledgement rewrites the row with acked_step set)."""

    def write_detector_state(self, run: str, step: int, state: bytes, kind: str = "detect") -> None:
        """Save an opaque blob of detector state as of `step`; one per (run, kind), the last
        write wins (so a run keeps one, however often it is saved). Durable with flush()."""
        raise StoreError(f"{type(self).__name__} keeps no detector state")

    def detector_state(self, run: str, kind: str = "detect") -> tuple[int, bytes] | None:
        """The last saved (step, blob) of the run, or None when none was saved (NotFound for
        an unknown run)."""
        return None

    @abc.abstractmethod
    def flush(self) -> None:
        """Make everything written so far durable; acks are sent only after this returns."""

    @abc.abstractmethod
    def close(self) -> None:
        """Flush and release resources; further calls raise StoreError."""

    # ---- reads (CLI, dashboard, reports) -> polars -----------------------------------
    @abc.abstractmethod
    def runs(self) -> pl.DataFrame:
        """One row per run: run, world_size, config_json, started_at, updated_at, last_step,
        status. Sorted by started_at."""

    @abc.abstractmethod
    def metrics(self, run: str) -> pl.DataFrame:
        """The run's metric dictionary, sorted by metric_id."""

    @abc.abstractmethod
    def series(
        self,
        run: str,
        metric: str,
        *,
        start: int | None = None,
        stop: int | None = None,
        rank: int | None = None,
    ) -> pl.DataFrame:
        """One metric by name over steps [start, stop): columns step (i64), value (f32), sorted
        by step. Reduced values when rank is None, else that rank's raw values.
        Raises NotFound for an unknown run or metric name."""

    @abc.abstractmethod
    def at_step(
        self, run: str, step: int, pattern: str = "*", *, rank: int | None = None
    ) -> pl.DataFrame:
        """All metrics whose name matches the glob `pattern` at one step: columns metric_id,
        name, layer, expert, head, stat, value; sorted by metric_id."""

    @abc.abstractmethod
    def steps(self, run: str) -> pl.DataFrame:
        """Barrier outcomes: step, n_ranks, missing_ranks, complete, wall_time; sorted."""

    @abc.abstractmethod
    def events(self, run: str) -> pl.DataFrame:
        """Detector events: step, kind, site, value, threshold, severity, onset_step, detail;
        sorted by (step, kind, site)."""

    @abc.abstractmethod
    def clips(self, run: str) -> pl.DataFrame:
        """Clip updates: version, step, layer, site, limit, reason, acked_step; sorted by
        (version, layer, site)."""

    # context manager sugar
    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
