"""Append-only segment files for one value table of one run: atomic writes, last-wins scans,
tiered compaction. Used by the Parquet backend only.

A flush writes one segment: rows deduplicated and sorted by the table's key (metric_id first),
zstd, small row groups with statistics, so a filtered scan skips most of each file (groups are
bounded in bytes too: a raw vector row holds thousands of values). Its name
carries everything a reader needs to plan without opening it:

    {lo:012d}-{hi:012d}.L{level}.s{step_min}-{step_max}.n{rows}.parquet

lo..hi is the range of flush sequence numbers folded into the segment. A table with a `ver`
column (raw vectors: which of several rows covering one cell was written last) gets
ver = lo << 32 | row index at append, so ver follows write order across flushes and merges. Segments hold disjoint
ranges, so "later hi wins" is "later write wins"; a merge only ever folds a contiguous run of
segments, writes the result under its own name, then deletes the inputs. A reader that lists
in between sees inputs and result together and still resolves every key the same way: the
result's (hi, level) ranks above each input, and it holds exactly their last-wins rows. A crash
between those two steps leaves inputs that the next writer removes (`drop_subsumed`). Files
being written are dot-named `*.tmp` and renamed into place; nothing else is ever read.
"""

from __future__ import annotations

import builtins  # SegmentLog.list shadows list in the class body
import logging
import os
import re
import uuid
from dataclasses import dataclass
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from store.base import StoreError
from store.frames import TABLES, empty, from_arrow, last_wins

log = logging.getLogger(__name__)


def _dataset() -> Any:
    """pyarrow.dataset, imported on the first read of a segment: it loads pandas (~50 MiB of
    RSS), which a collector that only appends (a fresh run) never needs."""
    import pyarrow.dataset as ds

    return ds


def read_file(path: str) -> pa.Table:
    """One whole Parquet file, through ParquetFile (pq.read_table goes through
    pyarrow.dataset, and so pandas, even for a single file)."""
    with pq.ParquetFile(path) as f:
        return f.read()


NAME_RE = re.compile(r"^(\d{12})-(\d{12})\.L(\d+)\.s(\d+)-(\d+)\.n(\d+)\.parquet$")
FANOUT = 8  # merge the newest FANOUT segments of one level into one
MERGE_MAX_ROWS = 4_000_000  # bound on a merge's memory; bigger segments just stay as they are
MERGE_MAX_BYTES = 64 << 20  # the same on disk: a flush of full-size raw vectors is never merged
ROW_GROUP_ROWS = 65_536  # small enough that one metric's rows skip most of a big file
ROW_GROUP_BYTES = 1 << 20  # and one rank's vectors skip most of a big raw-vector file
SCAN_RETRIES = 5  # a compaction may delete files between our listing and our read


@dataclass(frozen=True)
class Segment:
    path: str
    lo: int
    hi: int
    level: int
    step_min: int
    step_max: int
    rows: int

    @property
    def rank(self) -> tuple[int, int]:
        """Recency: a higher rank wins a key (a merge result outranks its own inputs)."""
        return (self.hi, self.level)

    def overlaps(self, start: int | None, stop: int | None) -> bool:
        return (start is None or self.step_max >= start) and (stop is None or self.step_min < stop)


def write_atomic(
    path: str, df: pl.DataFrame, *, fsync: bool, options: dict[str, Any] | None = None
) -> None:
    """Write `df` as Parquet to a temp name in the same directory, then rename over `path`.
    `options`: more pq.write_table arguments (encodings) or overrides."""
    d, name = os.path.split(path)
    tmp = os.path.join(d, f".{name}.{uuid.uuid4().hex[:12]}.tmp")
    row_bytes = df.estimated_size() // max(1, df.height)
    # Statistics on every column but the vectors' bytes: no read filters on those, and their
    # min/max (whole values, per page and row group) were 13% of a raw-vector file.
    stats = [name for name, dtype in df.schema.items() if dtype != pl.Binary]
    try:
        kwargs: dict[str, Any] = {
            "compression": "zstd",
            "write_statistics": stats,
            "row_group_size": max(
                1,
                min(ROW_GROUP_ROWS, ROW_GROUP_BYTES // row_bytes if row_bytes else ROW_GROUP_ROWS),
            ),
        }
        pq.write_table(df.to_arrow(), tmp, **{**kwargs, **(options or {})})
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if fsync:  # make the rename itself durable
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_temp_files(directory: str) -> None:
    """Remove leftovers of interrupted writes (only the writer holding the run lock may)."""
    for dirpath, _, files in os.walk(directory):
        for f in files:
            if f.endswith(".tmp"):
                try:
                    os.unlink(os.path.join(dirpath, f))
                except OSError:
                    pass


class SegmentLog:
    """One table's directory of segments; `table` is a key of frames.TABLES."""

    def __init__(
        self, directory: str, table: str, *, fsync: bool = True, options: dict | None = None
    ) -> None:
        self.dir = directory
        self.schema, self.keys = TABLES[table]
        self.fsync = fsync
        self.options = options  # pyarrow.parquet.write_table's, over write_atomic's defaults

    def list(self) -> builtins.list[Segment]:
        """Segments on disk, oldest first; anything not named like one is ignored."""
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        segs = []
        for n in names:
            m = NAME_RE.match(n)
            if m:
                lo, hi, level, smin, smax, rows = map(int, m.groups())
                segs.append(Segment(os.path.join(self.dir, n), lo, hi, level, smin, smax, rows))
        return sorted(segs, key=lambda s: s.rank)

    # ---- writes (the single writer of the run) -----------------------------------------
    def _write(self, df: pl.DataFrame, lo: int, hi: int, level: int) -> Segment:
        df = df.sort(list(self.keys))
        lo_step, hi_step = df.select(pl.min("step"), pl.max("step").alias("hi")).row(0)
        smin, smax = int(lo_step), int(hi_step)
        name = f"{lo:012d}-{hi:012d}.L{level}.s{smin}-{smax}.n{df.height}.parquet"
        write_atomic(os.path.join(self.dir, name), df, fsync=self.fsync, options=self.options)
        return Segment(os.path.join(self.dir, name), lo, hi, level, smin, smax, df.height)

    def append(self, df: pl.DataFrame) -> None:
        """Write one flush's rows (already one per key) as a new newest segment, then compact."""
        if df.height == 0:
            return
        os.makedirs(self.dir, exist_ok=True)
        segs = self.list()
        seq = max((s.hi for s in segs), default=0) + 1
        if "ver" in self.schema:
            df = df.with_columns(ver=pl.int_range(df.height, dtype=pl.UInt64) + (seq << 32))
        self._write(df.select(list(self.schema)), seq, seq, 0)
        try:
            self.compact()
        except Exception:  # the flush itself is durable already
            log.warning(
                "compaction of %s failed; will retry on a later flush", self.dir, exc_info=True
            )

    def drop_subsumed(self) -> builtins.list[Segment]:
        """Delete segments whose range a merge result covers (a crash between a merge's write
        and its deletes leaves them); return the live segments, oldest first."""
        segs, live = self.list(), []
        for s in segs:
            covered = any(
                o is not s and o.lo <= s.lo and s.hi <= o.hi and o.rank > s.rank for o in segs
            )
            if covered:
                os.unlink(s.path)
            else:
                live.append(s)
        return live

    def compact(self) -> None:
        """While the newest FANOUT segments share a level, fold them into one a level up.
        Segments thus count in base FANOUT: a few per level, log(flushes) levels."""
        segs = self.drop_subsumed()
        while len(segs) >= FANOUT:
            tail = segs[-FANOUT:]
            if (
                len({s.level for s in tail}) != 1
                or sum(s.rows for s in tail) > MERGE_MAX_ROWS
                or sum(os.path.getsize(s.path) for s in tail) > MERGE_MAX_BYTES
            ):
                return
            frames = [from_arrow(read_file(s.path)) for s in tail]  # oldest first
            merged = last_wins(pl.concat(frames), self.keys)
            out = self._write(merged, tail[0].lo, tail[-1].hi, tail[0].level + 1)
            for s in tail:
                os.unlink(s.path)
            segs = segs[:-FANOUT] + [out]

    # ---- reads (any process) -----------------------------------------------------------
    def scan(
        self,
        *,
        start: int | None = None,
        stop: int | None = None,
        **equal: int | builtins.list[int] | None,
    ) -> pl.DataFrame:
        """Rows with start <= step < stop and each `equal` column equal to its value (or in
        it, for a list; None: no condition), one per key (the highest-ranked segment's)."""
        for _ in range(SCAN_RETRIES):
            segs = [s for s in self.list() if s.overlaps(start, stop)]
            if not segs:  # nothing to read: pyarrow.dataset (and the pandas it loads) stays out
                return empty(self.schema)
            try:
                return self._scan(segs, self._filter(start, stop, equal))
            except (OSError, pa.ArrowException) as e:
                if all(os.path.exists(s.path) for s in segs):  # not a compaction race
                    raise StoreError(f"cannot read {self.dir}: {e}") from e
        raise StoreError(f"{self.dir} kept changing under {SCAN_RETRIES} consecutive reads")

    def _filter(self, start: int | None, stop: int | None, equal: dict[str, Any]) -> Any:
        """The scan's conditions as one pyarrow.dataset expression (None: every row)."""
        ds = _dataset()
        conds = [
            ds.field(col).isin(pa.array(v, self._arrow_type(col)))
            if isinstance(v, list)
            else ds.field(col) == v
            for col, v in equal.items()
            if v is not None
        ]
        conds += [ds.field("step") >= start] if start is not None else []
        conds += [ds.field("step") < stop] if stop is not None else []
        expr = None
        for e in conds:
            expr = e if expr is None else expr & e
        return expr

    def _arrow_type(self, col: str) -> pa.DataType:
        return pl.Series([], dtype=self.schema[col]).to_arrow().type

    def _may_repeat(self, segs: builtins.list[Segment]) -> bool:
        """Keys repeat only across segments; when the key holds the step and the segments'
        step ranges are disjoint (the usual append-only run), no key can, so the
        last-write-wins pass is skipped."""
        if "step" not in self.keys:
            return True
        spans = sorted((s.step_min, s.step_max) for s in segs)
        return any(nxt[0] <= cur[1] for cur, nxt in zip(spans, spans[1:]))

    def _scan(self, segs: builtins.list[Segment], expr) -> pl.DataFrame:
        rank_of = {os.path.basename(s.path): i for i, s in enumerate(segs)}
        dataset = _dataset().dataset([s.path for s in segs], format="parquet")
        frames = []
        for tagged in dataset.scanner(columns=list(self.schema), filter=expr).scan_batches():
            batch = tagged.record_batch
            if batch.num_rows:
                frames.append(
                    from_arrow(batch).with_columns(
                        _rank=pl.lit(
                            rank_of[os.path.basename(tagged.fragment.path)], dtype=pl.Int32
                        )
                    )
                )
        if not frames:
            return empty(self.schema)
        df = pl.concat(frames)
        if df["_rank"].n_unique() > 1 and self._may_repeat(segs):
            df = last_wins(df.sort("_rank", maintain_order=True), self.keys)
        return df.drop("_rank")
