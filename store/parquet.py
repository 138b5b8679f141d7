"""ParquetStore: the embedded default backend, files under one directory.

    DIR/<run>/run.parquet        the run row (one row, rewritten atomically per flush)
    DIR/<run>/metrics/           the metric dictionary: one file per flush that brought new
                                 rows (NNNNNNNNNNNN.parquet, appended, never rewritten; a
                                 later file's row wins for a repeated metric_id). Stores of
                                 older versions kept one DIR/<run>/metrics.parquet: still read,
                                 as the oldest part.
    DIR/<run>/raw_vectors/       per-rank vectors  } segment files, one per flush, compacted
    DIR/<run>/reduced_vectors/   reduced vectors   } (segments.py): a series read touches a
    DIR/<run>/steps/             barrier outcomes  } few files and skips most row groups
    DIR/<run>/reduced/           reduced values of stores written before reduced vectors
                                 (one row per value): read, never written
    DIR/<run>/layouts/           the metric ids of each vector layout (raw and reduced), one
                                 file per flush that brought new layouts (vectors.py:
                                 layout_hash -> ids)
    DIR/<run>/.writer.lock       flock held by the one store instance writing the run
    DIR/~writer.lock             flock held by the one process writing the store, when it
                                 asks (lock_writer: the collector does, and a second
                                 collector on the same directory waits for it or is refused)

Any number of readers, in any process, see exactly what was flushed: every read lists the
directory afresh (the caches, the metric dictionary keyed by the file's identity and layout
files by name, hold only what cannot change).
One writer per run at a time: a second instance writing the same run gets StoreError.

Raw values are vectors (one row per rank, step and layout, all of a rank's values in one
binary cell), sorted by (rank, step) in row groups of about a MiB. The trade-off: writing a
step is one row per rank instead of one per value (what makes 6 M values per step
affordable), while a per-rank series read decodes whole vectors - it reads only that rank's
row groups and only vectors whose layout holds the metric, but each such vector is read
entirely (thousands of values for one). at_step(rank=) reads exactly the vectors it needs.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from store.base import RUN_NAME_RE, StoreError
from store.buffered import BufferedStore
from store.frames import (
    METRICS_SCHEMA,
    RAW_VECTORS_SCHEMA,
    REDUCED_VECTORS_SCHEMA,
    RUNS_SCHEMA,
    TABLES,
    empty,
    from_arrow,
    last_wins,
    state_from_text,
)
from store.locks import Locked, lock_file
from store.segments import SegmentLog, read_file, remove_temp_files, write_atomic
from store.vectors import layouts_holding

log = logging.getLogger(__name__)
LAYOUT_FILE_RE = re.compile(r"^(\d{12})\.parquet$")
PART_FILE_RE = LAYOUT_FILE_RE  # metrics/ parts are numbered the same way
LEGACY_DICT = "metrics.parquet"
MAX_DICT_PARTS = 4096  # beyond it the parts are merged into one (~67 M names of 16 K a part)
# Dictionary parts: ids and labels delta-coded, only the few distinct labels dictionary-coded,
# one row group a part (read whole): 1 M names take 9.5 MB instead of 13.9 MB
DICT_WRITE_OPTIONS = {
    "use_dictionary": ["stat", "unit", "reduce"],
    "column_encoding": {c: "DELTA_BINARY_PACKED" for c in ("metric_id", "layer", "expert", "head")},
    "row_group_size": 1 << 20,
}
# detector_state's segments hold the blob as bytes, uncompressed (frames.py); the directory
# named after the table holds the base64 text of stores written before, still read
STATE_DIR, LEGACY_STATE_DIR = "detector_blobs", "detector_state"
STATE_WRITE_OPTIONS = {"compression": "none", "use_dictionary": False}
LAYOUTS_SCHEMA = {"layout": pl.UInt64, "ids": pl.Binary}  # ids: int32 little-endian
ROOT_LOCK = "~writer.lock"  # '~' is no run-name character: never a run's directory


class ParquetStore(BufferedStore):
    def __init__(self, root: str, *, fsync: bool = True) -> None:
        """Directories are created when a run is first written, so a reader never litters.
        fsync=False keeps atomicity (temp + rename) but not durability across power loss."""
        super().__init__()
        if not isinstance(root, (str, os.PathLike)) or not str(root):
            raise StoreError(f"ParquetStore needs a directory, got {root!r}")
        self.root = os.path.abspath(os.fspath(root))
        self.fsync = fsync
        self._locks: dict[str, int] = {}  # run -> fd holding its writer flock
        self._root_lock: int | None = None  # fd holding ROOT_LOCK (lock_writer)
        # run -> (the dictionary files read, in order, and their merged rows); parts never
        # change once written, so a reader reads only the parts it has not seen
        self._dict_cache: dict[str, tuple[list[str], pl.DataFrame]] = {}
        # run -> (layout files read, {hash: ids}); files are written once and never change.
        self._layout_cache: dict[str, tuple[set[str], dict[int, np.ndarray]]] = {}

    def _run_dir(self, run: str) -> str:
        return os.path.join(self.root, run)

    def _log(self, run: str, table: str) -> SegmentLog:
        if table == "detector_state":
            d, opts = os.path.join(self._run_dir(run), STATE_DIR), STATE_WRITE_OPTIONS
            return SegmentLog(d, table, fsync=self.fsync, options=opts)
        return SegmentLog(os.path.join(self._run_dir(run), table), table, fsync=self.fsync)

    # ---- writer side -----------------------------------------------------------------------
    def _claim(self, run: str) -> None:
        """Take the run's writer lock; then leftovers of a crashed writer are safe to remove."""
        if run in self._locks:
            return
        try:
            os.makedirs(self._run_dir(run), exist_ok=True)
            fd = os.open(os.path.join(self._run_dir(run), ".writer.lock"), os.O_RDWR | os.O_CREAT)
        except OSError as e:
            raise StoreError(f"cannot write run {run!r} under {self.root}: {e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(
                f"run {run!r} in {self.root} is being written by another store "
                "instance (one writer per run)"
            ) from None
        self._locks[run] = fd
        remove_temp_files(self._run_dir(run))
        for table in TABLES:
            try:
                self._log(run, table).drop_subsumed()
            except OSError:  # harmless to reads; retried at compaction
                log.warning("could not clean up %s/%s", self._run_dir(run), table, exc_info=True)

    def _commit(self, runs, metrics, values, layouts) -> None:
        # Dictionary and layouts first, run row last: a reader that finds a value can name and
        # decode it, and a run row's last_step never runs ahead of the values it announces.
        try:
            for run, df in metrics.items():
                self._append_dictionary(run, df)
            for run, new in layouts.items():
                self._write_layouts(run, new)
            for (run, table), df in values.items():
                self._log(run, table).append(df)
            for run, row in runs.items():
                write_atomic(
                    os.path.join(self._run_dir(run), "run.parquet"),
                    pl.DataFrame([row], schema=RUNS_SCHEMA),
                    fsync=self.fsync,
                )
        except OSError as e:
            raise StoreError(f"flush to {self.root} failed: {e}") from e

    def _append_dictionary(self, run: str, rows: pl.DataFrame) -> None:
        """One more dictionary part (the rows since the last flush); past MAX_DICT_PARTS the
        whole dictionary becomes one part and the older files go (a reader that lists them
        mid-way finds the merged part last, or re-lists: `_committed_metrics`)."""
        if rows.height == 0:
            return
        d = os.path.join(self._run_dir(run), "metrics")
        os.makedirs(d, exist_ok=True)
        parts = _numbered(d)
        n = int(parts[-1].partition(".")[0]) + 1 if parts else 1
        opts = DICT_WRITE_OPTIONS
        write_atomic(os.path.join(d, f"{n:012d}.parquet"), rows, fsync=self.fsync, options=opts)
        if len(parts) + 1 > MAX_DICT_PARTS:
            whole = self._committed_metrics(run)
            path = os.path.join(d, f"{n + 1:012d}.parquet")
            write_atomic(path, whole, fsync=self.fsync, options=opts)
            for old in [*parts, f"{n:012d}.parquet"]:
                os.unlink(os.path.join(d, old))
            legacy = os.path.join(self._run_dir(run), LEGACY_DICT)
            if os.path.exists(legacy):
                os.unlink(legacy)

    def _write_layouts(self, run: str, new: dict[int, np.ndarray]) -> None:
        """Append the layouts this run's files do not hold yet as one more layout file."""
        known = self._layouts(run)
        fresh = {h: ids for h, ids in new.items() if h not in known}
        if not fresh:
            return
        d = os.path.join(self._run_dir(run), "layouts")
        os.makedirs(d, exist_ok=True)
        n = (
            max(
                (int(m.group(1)) for f in os.listdir(d) if (m := LAYOUT_FILE_RE.match(f))),
                default=0,
            )
            + 1
        )
        df = pl.DataFrame(
            {"layout": list(fresh), "ids": [ids.astype("<i4").tobytes() for ids in fresh.values()]},
            schema=LAYOUTS_SCHEMA,
        )
        write_atomic(os.path.join(d, f"{n:012d}.parquet"), df, fsync=self.fsync)

    def lock_writer(self, timeout_s: float = 0.0) -> None:
        """This process becomes the store directory's one writer until close(): a second
        process asking waits up to timeout_s, then gets StoreError naming the holder."""
        if self._root_lock is not None:
            return
        try:
            os.makedirs(self.root, exist_ok=True)
            self._root_lock = lock_file(
                os.path.join(self.root, ROOT_LOCK), timeout_s, f"parquet store {self.root}"
            )
        except Locked as e:
            raise StoreError(f"{e}: one collector per store directory") from None
        except OSError as e:
            raise StoreError(f"cannot lock {self.root}: {e}") from e

    def _release(self) -> None:
        for fd in self._locks.values():
            os.close(fd)  # closing the fd drops the flock
        self._locks.clear()
        if self._root_lock is not None:
            os.close(self._root_lock)
            self._root_lock = None

    # ---- reader side -----------------------------------------------------------------------
    def _committed_run(self, run: str) -> dict[str, Any] | None:
        path = os.path.join(self._run_dir(run), "run.parquet")
        try:
            df = from_arrow(read_file(path))
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (OSError, pa.ArrowException) as e:
            raise StoreError(f"cannot read {path}: {e}") from e
        return df.cast(RUNS_SCHEMA).row(0, named=True)

    def _committed_metrics(self, run: str) -> pl.DataFrame:
        for _ in range(8):  # a writer merging its parts may remove a listed file: list again
            try:
                return self._read_dictionary(run)
            except FileNotFoundError:
                continue
        raise StoreError(f"the metric dictionary of run {run!r} kept changing while read")

    def _read_dictionary(self, run: str) -> pl.DataFrame:
        d = os.path.join(self._run_dir(run), "metrics")
        files = [os.path.join(d, f) for f in _numbered(d)]
        legacy = os.path.join(self._run_dir(run), LEGACY_DICT)
        if os.path.exists(legacy):
            files.insert(0, legacy)
        seen, df = self._dict_cache.get(run, ([], empty(METRICS_SCHEMA)))
        if files[: len(seen)] != seen:  # merged by the writer (or a legacy file appeared)
            seen, df = [], empty(METRICS_SCHEMA)
        if len(files) == len(seen):
            return df
        try:
            fresh = [from_arrow(read_file(f)).cast(METRICS_SCHEMA) for f in files[len(seen) :]]
        except FileNotFoundError:
            raise  # merged away while listed: the caller lists again
        except (OSError, pa.ArrowException) as e:
            raise StoreError(f"cannot read the metric dictionary of run {run!r}: {e}") from e
        top, ascending = (int(df["metric_id"].to_numpy().max()) if df.height else -1), True
        for f in fresh:  # the usual parts: each one's ids above all before it
            ids = f["metric_id"].to_numpy()
            if ids.size:
                ascending &= bool(int(ids.min()) > top and (np.diff(ids) > 0).all())
                top = max(top, int(ids.max()))
        df = pl.concat([df, *fresh])
        if not ascending:  # an upsert, or parts out of id order
            df = last_wins(df, ["metric_id"], maintain_order=True).sort("metric_id")
        self._dict_cache[run] = (files, df)
        return df

    def _read_runs(self) -> pl.DataFrame:
        try:
            names = sorted(os.listdir(self.root))
        except FileNotFoundError:
            names = []
        rows = [
            row
            for n in names
            if RUN_NAME_RE.match(n) and (row := self._committed_run(n)) is not None
        ]
        return pl.DataFrame(rows or None, schema=RUNS_SCHEMA)

    def _read_values(
        self,
        run: str,
        table: str,
        *,
        metric_id: int | None = None,
        start: int | None = None,
        stop: int | None = None,
    ) -> pl.DataFrame:
        if table == "reduced" and not os.path.isdir(os.path.join(self._run_dir(run), table)):
            return empty(TABLES[table][0])  # no rows of an older store: skip the listing
        df = self._log(run, table).scan(metric_id=metric_id, start=start, stop=stop)
        if table == "detector_state":
            return self._with_legacy_states(run, df)
        return df

    def _with_legacy_states(self, run: str, df: pl.DataFrame) -> pl.DataFrame:
        """States a store written before saved as base64 text, under the ones saved since
        (those win a kind)."""
        legacy = os.path.join(self._run_dir(run), LEGACY_STATE_DIR)
        if not os.path.isdir(legacy):
            return df
        old = SegmentLog(legacy, "detector_state").scan()
        try:
            old = state_from_text(old) if old.height else old
        except pl.exceptions.ComputeError as e:
            raise StoreError(f"run {run!r}: a stored detector state is not base64 ({e})") from e
        return last_wins(pl.concat([old.cast(df.schema), df]), ("kind",), maintain_order=True)

    def _layouts(self, run: str) -> dict[int, np.ndarray]:
        """Every committed layout of the run: hash -> ids (files not seen before are read)."""
        d = os.path.join(self._run_dir(run), "layouts")
        seen, known = self._layout_cache.setdefault(run, (set(), {}))
        try:
            names = sorted(f for f in os.listdir(d) if LAYOUT_FILE_RE.match(f))
        except FileNotFoundError:
            names = []
        for name in names:
            if name in seen:
                continue
            try:
                df = from_arrow(read_file(os.path.join(d, name)))
            except (OSError, pa.ArrowException) as e:
                raise StoreError(f"cannot read {os.path.join(d, name)}: {e}") from e
            for h, ids in zip(df["layout"].to_list(), df["ids"].to_list()):
                known[h] = np.frombuffer(ids, "<i4").astype(np.int32)
            seen.add(name)
        return known

    def _read_vectors(self, run, *, rank, start, stop, metric_id=None):
        known = self._layouts(run)
        holding = layouts_holding(known, metric_id)
        if holding == []:
            return empty(RAW_VECTORS_SCHEMA), known
        vec = self._log(run, "raw_vectors").scan(rank=rank, layout=holding, start=start, stop=stop)
        return vec, known

    def _read_reduced_vectors(self, run, *, start, stop, metric_id=None):
        known = self._layouts(run)
        holding = layouts_holding(known, metric_id)
        if holding == []:
            return empty(REDUCED_VECTORS_SCHEMA), known
        vec = self._log(run, "reduced_vectors").scan(layout=holding, start=start, stop=stop)
        return vec, known


def _numbered(directory: str) -> list[str]:
    """The NNNNNNNNNNNN.parquet files of a directory, in number order ([] if none)."""
    try:
        return sorted(f for f in os.listdir(directory) if PART_FILE_RE.match(f))
    except FileNotFoundError:
        return []
