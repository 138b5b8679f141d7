"""The half of every backend that does not depend on where rows live.

Writes are validated into polars frames (validate.py) and buffered until `flush()`, which hands
everything to the backend's `_commit` at once; nothing written is visible to reads before that,
in every backend, so a collector test on the memory store catches a missing flush. Reads are
implemented once on top of a few small hooks, so name lookup, NotFound, glob matching, sorting
and output schemas cannot drift between backends.

Raw per-rank values, whether written as RawBlocks or as flat ValueBatch rows, are buffered as
vectors (vectors.py: one row per (rank, step, layout)) plus the layouts they use, and reads of
them decode vectors back into cells (`_read_raw`). Reduced values likewise (reduced.py: one row
per (step, layout), "reduced_vectors"); a world-1 run's reduced rows that equal its raw values
are stored as references to them at flush (`share_with_raw`), and reads resolve those
(`_read_reduced`). Rows of the one-row-per-value "reduced" table of older stores are still read,
below any vector written since.
"""

from __future__ import annotations

import abc
import math
import threading
import time
from typing import Any

import numpy as np
import polars as pl

from store.base import (
    END_STATUSES,
    ClipRecord,
    EventRecord,
    InvalidInput,
    MetricDict,
    NotFound,
    RawBlock,
    RunInfo,
    StepStatus,
    Store,
    StoreError,
    ValueBatch,
    check_run_name,
)
from store.frames import (
    AT_STEP_SCHEMA,
    METRICS_SCHEMA,
    RUNS_SCHEMA,
    SERIES_SCHEMA,
    TABLES,
    last_wins,
)
from store.globs import glob_to_regex
from store.names import NameIndex, name_hashes
from store.reduced import OWN, reduced_vectors, resolve, share_with_raw
from store.validate import (
    clips_frame,
    detector_state_frame,
    events_frame,
    merge_metrics,
    metrics_frame,
    steps_frame,
    values_arrays,
)
from store.vectors import batch_vectors, block_vectors, explode, vector_cells


def _check_step(name: str, v: int | None) -> int | None:
    if v is not None and (not isinstance(v, (int, np.integer)) or isinstance(v, bool)):
        raise InvalidInput(f"{name} must be an integer or None, got {v!r}")
    return None if v is None else int(v)


class _DictNames:
    """The names and highest id of one run's dictionary as this writer has it (committed +
    pending): 12 bytes a name (store/names.py), so the usual write is checked without
    reading the dictionary back."""

    def __init__(self, df: pl.DataFrame) -> None:
        self.rebuild(df)

    def rebuild(self, df: pl.DataFrame) -> None:
        self.index = NameIndex()
        self.max_id = -1
        self.indexed = True  # False: names were taken in unindexed (appends' vouched)
        self._add(df)

    def _add(self, df: pl.DataFrame) -> None:
        if df.height:
            ids = df["metric_id"].to_numpy()
            self.index.add(name_hashes(df["name"]), ids)
            self.max_id = max(self.max_id, int(ids.max()))

    def appends(self, new: pl.DataFrame, *, vouched: bool = False) -> bool:
        """True (and `new` taken in) when `new` holds only ids above every known one and
        names that are certainly new; False: the caller must check it the exact way.
        `vouched` (write_metrics' fresh): the names are taken on their writer's word, not
        hashed or indexed - the collector's registry already holds every name in its own
        index, and a second one cost as much again (0.8 s and 24 bytes a name at 1 M names);
        a later unvouched write then takes the exact path, which rebuilds the index."""
        if new.height == 0:
            return True
        ids = new["metric_id"].to_numpy()
        if int(ids.min()) <= self.max_id or not (vouched or self.indexed):
            return False
        if vouched:
            self.indexed = False
        else:
            if new["name"].is_duplicated().any():
                return False
            hashes = name_hashes(new["name"])
            if (self.index.first(hashes) >= 0).any():  # taken, or a hash collision: exact path
                return False
            self.index.add(hashes, ids)
        self.max_id = int(ids.max())
        return True


class BufferedStore(Store):
    """Validation, write buffering, the closed state and every read; subclasses store rows."""

    def __init__(self) -> None:
        self._lock = threading.RLock()  # the collector may flush from a thread
        self._closed = False
        self._run_rows: dict[str, dict[str, Any]] = {}  # runs this writer has touched
        self._dirty_runs: set[str] = set()
        self._foreign_runs: set[str] = set()  # runs whose row another writer owns
        # dictionary rows written since the last commit, per run (the backend appends them)
        self._pending_metrics: dict[str, list[pl.DataFrame]] = {}
        self._names: dict[str, _DictNames] = {}  # run -> its committed + pending names
        self._pending: dict[tuple[str, str], list[pl.DataFrame]] = {}  # (run, table) chunks
        self._pending_layouts: dict[str, dict[int, np.ndarray]] = {}  # run -> {hash: ids}

    # ---- backend hooks -------------------------------------------------------------------
    @abc.abstractmethod
    def _committed_run(self, run: str) -> dict[str, Any] | None:
        """The committed run row (RUNS_SCHEMA keys), or None if the run does not exist."""

    @abc.abstractmethod
    def _committed_metrics(self, run: str) -> pl.DataFrame:
        """The committed dictionary (METRICS_SCHEMA), empty when none; run known to exist."""

    @abc.abstractmethod
    def _commit(
        self,
        runs: dict[str, dict[str, Any]],
        metrics: dict[str, pl.DataFrame],
        values: dict[tuple[str, str], pl.DataFrame],
        layouts: dict[str, dict[int, np.ndarray]],
    ) -> None:
        """Make these durable and visible. `metrics`: per run the dictionary rows written since
        the last commit (new ids, or upserts of old ones: last write wins on read), one per
        metric_id: a backend appends them, never rewrites the dictionary. Values come from
        `_combine` with TABLES schemas
        ("raw_vectors" without `ver`: the backend numbers its rows, increasing in frame order,
        above every earlier commit's), layouts are the ids of every layout those vectors use.
        May raise: everything stays pending and the next flush commits it again (idempotent)."""

    @abc.abstractmethod
    def _read_runs(self) -> pl.DataFrame:
        """Every committed run row (RUNS_SCHEMA), any order."""

    @abc.abstractmethod
    def _read_values(
        self,
        run: str,
        table: str,
        *,
        metric_id: int | None = None,
        start: int | None = None,
        stop: int | None = None,
    ) -> pl.DataFrame:
        """Committed rows of one value table (TABLES schema), one per natural key (last write
        wins), filtered by metric_id (when given) and start <= step < stop; any order."""

    @abc.abstractmethod
    def _read_vectors(
        self,
        run: str,
        *,
        rank: int | None,
        start: int | None,
        stop: int | None,
        metric_id: int | None = None,
    ) -> tuple[pl.DataFrame, dict[int, np.ndarray]]:
        """Committed raw vectors (RAW_VECTORS_SCHEMA) of `rank` with start <= step < stop and,
        given metric_id, at least those whose layout holds it; with the ids of their layouts.
        Repeated keys may be left in: `vectors.vector_cells` resolves them by ver."""

    @abc.abstractmethod
    def _read_reduced_vectors(
        self,
        run: str,
        *,
        start: int | None,
        stop: int | None,
        metric_id: int | None = None,
    ) -> tuple[pl.DataFrame, dict[int, np.ndarray]]:
        """Committed reduced vectors (REDUCED_VECTORS_SCHEMA) with start <= step < stop and,
        given metric_id, at least those whose layout holds it; with the ids of their layouts.
        Repeated keys may be left in: `_read_reduced` resolves them by ver."""

    shares_raw = True
    """Whether world-1 reduced rows may be stored as references to the raw vectors (False
    where raw values can expire while reduced ones stay)."""

    def _reduced_cells(
        self, run: str, *, start: int | None, stop: int | None, metric_id: int | None = None
    ) -> pl.DataFrame:
        """Reduced cells as stored: step, n_ranks, source, ver, metric_id, value, repeated
        keys left in; referencing rows' cells without their values (reduced.resolve)."""
        vec, layouts = self._read_reduced_vectors(run, start=start, stop=stop, metric_id=metric_id)
        own = pl.col("source") == OWN
        carry = ("n_ranks", "source")
        return pl.concat(
            [
                explode(vec.filter(own), layouts, metric_id, carry),
                explode(vec.filter(~own), layouts, metric_id, carry, values=False),
            ]
        )

    def _read_reduced(
        self, run: str, *, start: int | None, stop: int | None, metric_id: int | None = None
    ) -> pl.DataFrame:
        """Logical reduced rows (REDUCED_SCHEMA), one per (step, metric_id), last write wins:
        vector cells over the legacy row table's (written before schema v3, ver 0)."""
        cells = self._reduced_cells(run, start=start, stop=stop, metric_id=metric_id)
        legacy = self._read_values(run, "reduced", metric_id=metric_id, start=start, stop=stop)
        if legacy.height:
            legacy = legacy.with_columns(
                source=pl.lit(OWN, pl.Int32), ver=pl.lit(0, pl.UInt64)
            ).select(cells.columns)
            cells = pl.concat([legacy, cells.cast(legacy.schema)])

        def raw_cells(rank: int, mid: int | None, lo: int | None, hi: int | None):
            return self._read_raw(run, rank=rank, metric_id=mid, start=lo, stop=hi)

        return resolve(cells, raw_cells)

    def _read_raw(
        self,
        run: str,
        *,
        rank: int | None,
        start: int | None,
        stop: int | None,
        metric_id: int | None = None,
    ) -> pl.DataFrame:
        """Logical raw rows (RAW_SCHEMA), one per (rank, step, metric_id), last write wins."""
        vec, layouts = self._read_vectors(
            run, rank=rank, start=start, stop=stop, metric_id=metric_id
        )
        return vector_cells(vec, layouts, metric_id)

    def _claim(self, run: str) -> None:
        """Called once per run before this store first writes to it (e.g. take a lock)."""

    # ---- writes ----------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"{type(self).__name__} is closed")

    def _row(self, run: str) -> dict[str, Any]:
        """The run's row as this writer will commit it; NotFound for a run never opened."""
        check_run_name(run)
        row = self._run_rows.get(run)
        if row is None:
            row = self._committed_run(run)
            if row is None:
                raise NotFound(f"run {run!r} was never opened (call open_run first)")
            self._claim(run)
            self._run_rows[run] = row = dict(row)
        return row

    def leave_run_row(self, run: str) -> None:
        """This writer adds rows to an existing run but never writes the run's own row
        (status, last_step): another process owns it (a collector tier's coordinator, with
        the tier's collectors writing raw vectors to the same ClickHouse). NotFound if the
        run was never opened."""
        with self._lock:
            self._check_open()
            self._row(run)
            self._foreign_runs.add(run)
            self._dirty_runs.discard(run)

    def _touch(self, run: str, row: dict[str, Any], last_step: int | None = None) -> None:
        if run in self._foreign_runs:
            return
        row["updated_at"] = time.time()
        if last_step is not None and (row["last_step"] is None or last_step > row["last_step"]):
            row["last_step"] = last_step
        self._dirty_runs.add(run)

    def open_run(self, info: RunInfo) -> None:
        if not isinstance(info, RunInfo):
            raise InvalidInput(f"expected RunInfo, got {type(info).__name__}")
        check_run_name(info.run)
        ws = info.world_size
        if not isinstance(ws, (int, np.integer)) or isinstance(ws, bool) or not 1 <= ws < 2**31:
            raise InvalidInput(f"world_size must be a positive integer, got {ws!r}")
        if not isinstance(info.config_json, str):
            raise InvalidInput("config_json must be a string")
        if not isinstance(info.started_at, (int, float)) or not math.isfinite(info.started_at):
            raise InvalidInput(f"started_at must be unix seconds, got {info.started_at!r}")
        with self._lock:
            self._check_open()
            try:
                row = self._row(info.run)
            except NotFound:
                self._claim(info.run)
                row = self._run_rows[info.run] = {"started_at": 0.0, "last_step": None}
            row.update(
                run=info.run, world_size=int(ws), config_json=info.config_json, status="live"
            )
            now = time.time()
            if info.started_at:
                row["started_at"] = float(info.started_at)
            elif not row["started_at"]:  # reopening keeps the first start
                row["started_at"] = now
            self._touch(info.run, row)

    def finish_run(self, run: str, status: str = "finished") -> None:
        if status not in END_STATUSES:
            raise InvalidInput(f"a run ends {' or '.join(END_STATUSES)}, not {status!r}")
        with self._lock:
            self._check_open()
            row = self._row(run)
            row["status"] = status
            self._touch(run, row)

    def write_metrics(self, run: str, metrics: MetricDict, *, fresh: bool = False) -> None:
        """New ids with new names (the usual write: a schema part's fresh metrics) cost a
        vectorised lookup in the run's name index, or with `fresh` (the caller checked the
        names) only an id check; anything else (an upsert of an old id, a name that may be
        taken) is checked against the whole dictionary, as merge_metrics defines it."""
        new = metrics_frame(metrics)
        with self._lock:
            self._check_open()
            row = self._row(run)
            names = self._names.get(run)
            if names is None:
                names = self._names[run] = _DictNames(self._committed_metrics(run))
            if not names.appends(new, vouched=fresh):
                merged = merge_metrics(self._dictionary(run), new)  # raises on a taken name
                names.rebuild(merged)
            self._pending_metrics.setdefault(run, []).append(new)
            self._touch(run, row)

    def _dictionary(self, run: str) -> pl.DataFrame:
        """Committed and pending dictionary rows of a run, merged (the exact, slow path)."""
        return last_wins(
            pl.concat([self._committed_metrics(run), *self._pending_metrics.get(run, [])]),
            ["metric_id"],
            maintain_order=True,
        )

    def _write_values(
        self, run: str, table: str, frame: pl.DataFrame, *, advances: bool = True
    ) -> None:
        """Buffer rows of a value table; `advances`: their steps count toward last_step
        (events and clip updates describe steps already written, so they do not)."""
        with self._lock:
            self._check_open()
            row = self._row(run)
            if frame.height == 0:
                return
            self._pending.setdefault((run, table), []).append(frame)
            # the column's max, not a select: no query engine per write (1-2 ms each, per part)
            self._touch(run, row, int(frame["step"].to_numpy().max()) if advances else None)

    def write_raw(self, run: str, batch: ValueBatch) -> None:
        self._write_vectors(run, *batch_vectors(batch))

    def write_raw_block(self, run: str, block: RawBlock) -> None:
        self._write_vectors(run, *block_vectors(block))

    def _write_vectors(self, run: str, frame: pl.DataFrame, layouts: dict[int, np.ndarray]) -> None:
        with self._lock:
            self._write_values(run, "raw_vectors", frame)
            if frame.height:
                self._pending_layouts.setdefault(run, {}).update(layouts)

    def write_reduced(self, run: str, batch: ValueBatch) -> None:
        c = values_arrays(batch, "reduced")
        frame, layouts = reduced_vectors(c["step"], c["metric_id"], c["value"], c["n_ranks"])
        with self._lock:
            self._write_values(run, "reduced_vectors", frame)
            if frame.height:
                self._pending_layouts.setdefault(run, {}).update(layouts)

    def write_steps(self, run: str, steps: list[StepStatus]) -> None:
        self._write_values(run, "steps", steps_frame(steps))

    def write_events(self, run: str, events: list[EventRecord]) -> None:
        self._write_values(run, "events", events_frame(events), advances=False)

    def write_clips(self, run: str, clips: list[ClipRecord]) -> None:
        self._write_values(run, "clips", clips_frame(clips), advances=False)

    def write_detector_state(self, run: str, step: int, state: bytes, kind: str = "detect") -> None:
        self._write_values(
            run, "detector_state", detector_state_frame(kind, step, state), advances=False
        )

    def detector_state(self, run: str, kind: str = "detect") -> tuple[int, bytes] | None:
        df = self._whole_table(run, "detector_state").filter(pl.col("kind") == kind)
        if df.height == 0:
            return None
        row = df.row(0, named=True)
        return int(row["step"]), bytes(row["state"])

    def flush(self) -> None:
        with self._lock:
            self._check_open()
            if not (self._dirty_runs or self._pending):
                return
            values = {
                (run, table): self._combine(table, chunks)
                for (run, table), chunks in self._pending.items()
            }
            runs = {run: dict(self._run_rows[run]) for run in self._dirty_runs}
            metrics = {
                run: last_wins(pl.concat(chunks), ["metric_id"], maintain_order=True)
                for run, chunks in self._pending_metrics.items()
            }
            if self.shares_raw:
                self._share_raw(values)
            self._commit(runs, metrics, values, dict(self._pending_layouts))
            self._pending.clear()
            self._pending_metrics.clear()
            self._pending_layouts.clear()
            self._dirty_runs.clear()

    def _share_raw(self, values: dict[tuple[str, str], pl.DataFrame]) -> None:
        """A world-1 run's reduced rows that equal its raw values of this flush become
        references to them (reduced.share_with_raw): its values are stored once."""
        for (run, table), frame in values.items():
            raw = values.get((run, "raw_vectors"))
            if table != "reduced_vectors" or raw is None:
                continue
            if self._run_rows[run].get("world_size") != 1:
                continue
            values[(run, table)] = share_with_raw(frame, raw, self._pending_layouts.get(run, {}))

    def discard(self) -> None:
        """Drop everything written since the last flush, and the run rows this writer
        cached (the next write reads the committed row again). For a writer that keeps its
        writes elsewhere while the backend is away (the collector's spool): a dead backend's
        retries then never pile up in memory."""
        with self._lock:
            self._pending.clear()
            self._pending_metrics.clear()
            self._names.clear()  # held pending names too: rebuilt from the committed rows
            self._pending_layouts.clear()
            self._dirty_runs.clear()
            self._run_rows.clear()

    def _combine(self, table: str, chunks: list[pl.DataFrame]) -> pl.DataFrame:
        """One flush's rows of a table for `_commit`, in write order, one per key (last write
        wins). A backend whose reads resolve repeated keys itself may keep them all, in write
        order, and skip this pass (ClickHouse: per-row versions, argMax on read). Raw vectors
        keep write order: it becomes their ver, which decides cells across layouts."""
        vectors = table in ("raw_vectors", "reduced_vectors")
        return last_wins(pl.concat(chunks), TABLES[table][1], maintain_order=vectors)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                self.flush()
            finally:
                self._closed = True
                self._release()

    def _release(self) -> None:
        """Free backend resources (locks, connections) once closed."""

    # ---- reads -----------------------------------------------------------------------------
    def runs(self) -> pl.DataFrame:
        self._check_open()
        df = self._read_runs()
        return df.select(list(RUNS_SCHEMA)).cast(RUNS_SCHEMA).sort(["started_at", "run"])

    def _known_run(self, run: str) -> None:
        check_run_name(run)
        self._check_open()
        if self._committed_run(run) is None:
            raise NotFound(f"no run named {run!r}")

    def metrics(self, run: str) -> pl.DataFrame:
        self._known_run(run)
        return self._committed_metrics(run).cast(METRICS_SCHEMA).sort("metric_id")

    def series(
        self,
        run: str,
        metric: str,
        *,
        start: int | None = None,
        stop: int | None = None,
        rank: int | None = None,
    ) -> pl.DataFrame:
        start, stop, rank = (
            _check_step(k, v) for k, v in (("start", start), ("stop", stop), ("rank", rank))
        )
        if not isinstance(metric, str):
            raise InvalidInput(f"metric must be a name (str), got {metric!r}")
        self._known_run(run)
        hit = self._committed_metrics(run).filter(pl.col("name") == metric)
        if hit.height == 0:
            raise NotFound(f"no metric named {metric!r} in run {run!r}")
        mid = int(hit["metric_id"][0])
        if rank is None:
            df = self._read_reduced(run, metric_id=mid, start=start, stop=stop)
        else:
            df = self._read_raw(run, rank=rank, metric_id=mid, start=start, stop=stop)
        return df.select(list(SERIES_SCHEMA)).cast(SERIES_SCHEMA).sort("step")

    def at_step(
        self, run: str, step: int, pattern: str = "*", *, rank: int | None = None
    ) -> pl.DataFrame:
        at, rank = _check_step("step", step), _check_step("rank", rank)
        if at is None:
            raise InvalidInput("step must be an integer")
        regex = glob_to_regex(pattern)
        self._known_run(run)
        names = self._committed_metrics(run).filter(pl.col("name").str.contains(regex))
        if rank is None:
            vals = self._read_reduced(run, start=at, stop=at + 1)
        else:
            vals = self._read_raw(run, rank=rank, start=at, stop=at + 1)
        df = names.join(vals.select("metric_id", "value"), on="metric_id", how="inner")
        return df.select(list(AT_STEP_SCHEMA)).cast(AT_STEP_SCHEMA).sort("metric_id")

    def steps(self, run: str) -> pl.DataFrame:
        return self._whole_table(run, "steps")

    def events(self, run: str) -> pl.DataFrame:
        return self._whole_table(run, "events")

    def clips(self, run: str) -> pl.DataFrame:
        return self._whole_table(run, "clips")

    def _whole_table(self, run: str, table: str) -> pl.DataFrame:
        """A whole small table of one run, in its schema, sorted by its natural key."""
        self._known_run(run)
        schema, keys = TABLES[table]
        df = self._read_values(run, table)
        return df.select(list(schema)).cast(schema).sort(list(keys))
