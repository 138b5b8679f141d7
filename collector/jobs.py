"""What the writer stores: one job per store write, in memory and as a spool record.

The event loop builds jobs (open a run, new metric rows, a ready step, a late rank's raw
values, clip rows, finish a run) and hands them to the writer (writer.py), which either applies
them to the store or, while the store is away, appends them to the spool (spool.py) as records.
A record holds exactly what `apply` writes, so replaying it later writes the same rows:

    payload = u32 length of meta | meta (JSON) | the arrays meta["arrays"] lists, raw bytes

meta holds the scalars and strings, and per array its dtype and shape; arrays go as they are in
memory (little-endian on every machine we run on, and the dtype string says so), so encoding a
step of millions of values is one pass of writes, not a conversion. `decode(kind, payload)`
gives back a job whose `apply` writes the same rows; a WriteStep comes back as WriteRows (the
reduction already done).

nbytes: the bytes of step data a job holds, reserved in the ByteBudget until the job is durable
(in the store or in the spool), when the writer releases them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import struct
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import polars as pl

from collector.barrier import ReadyStep
from collector.reduction import StepRows, reduce_step
from store.base import (
    ClipRecord,
    EventRecord,
    MetricDict,
    NotFound,
    RawBlock,
    RunInfo,
    StepStatus,
    Store,
    ValueBatch,
)

log = logging.getLogger("collector.writer")
U32 = struct.Struct("<I")


class NotDurable(Exception):
    """A job that must not be stored or acknowledged: a tier job whose coordinator call gave
    up (tier.py). The writer fails it (its frames are never acked; the ranks resend them)."""


# record kinds (spool.py's header byte)
OPEN_RUN, FINISH_RUN, METRICS, RAW, ROWS, CLIPS, EVENTS, DETECTOR_STATE = range(1, 9)


# ---- encoding ----------------------------------------------------------------------------------
def _pack(meta: dict[str, Any], arrays: list[np.ndarray]) -> list[bytes | memoryview]:
    meta = {**meta, "arrays": [[a.dtype.str, list(a.shape)] for a in arrays]}
    text = json.dumps(meta, separators=(",", ":")).encode()
    parts: list[bytes | memoryview] = [U32.pack(len(text)), text]
    parts += [np.ascontiguousarray(a).data.cast("B") for a in arrays]
    return parts


def _unpack(payload: bytes) -> tuple[dict[str, Any], list[np.ndarray]]:
    (n,) = U32.unpack_from(payload, 0)
    meta = json.loads(payload[4 : 4 + n])
    pos, arrays = 4 + n, []
    for dtype, shape in meta.pop("arrays"):
        dt = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        arrays.append(np.frombuffer(payload, dt, count, pos).reshape(shape))
        pos += count * dt.itemsize
    if pos != len(payload):
        raise ValueError(f"record payload has {len(payload) - pos} bytes beyond its arrays")
    return meta, arrays


def _batch_arrays(b: ValueBatch) -> list[np.ndarray]:
    last = b.rank if b.rank is not None else b.n_ranks
    assert last is not None  # raw rows have ranks, reduced rows n_ranks
    return [b.step, b.metric_id, b.value, last]


def _batch(arrays: list[np.ndarray], *, raw: bool) -> ValueBatch:
    step, metric_id, value, last = arrays
    if raw:
        return ValueBatch(step=step, metric_id=metric_id, value=value, rank=last)
    return ValueBatch(step=step, metric_id=metric_id, value=value, n_ranks=last)


# ---- jobs --------------------------------------------------------------------------------------
@dataclass
class OpenRun:
    info: RunInfo
    nbytes = 0
    kind: ClassVar[int] = OPEN_RUN

    def apply(self, store: Store) -> int:
        store.open_run(self.info)
        return 0

    def encode(self) -> list[bytes | memoryview]:
        return _pack(dataclasses.asdict(self.info), [])


@dataclass
class FinishRun:
    run: str
    status: str = "finished"  # or "abandoned" (every rank vanished, ingest.py)
    nbytes = 0
    kind: ClassVar[int] = FINISH_RUN

    def apply(self, store: Store) -> int:
        store.finish_run(self.run, self.status)
        return 0

    def notify(self, observer) -> None:
        on_finish = getattr(observer, "on_finish", None)
        if on_finish is not None:  # the detectors' state saved as of the run's last step
            on_finish(self.run)

    def encode(self) -> list[bytes | memoryview]:
        return _pack({"run": self.run, "status": self.status}, [])


STR_FIELDS = ("name", "stat", "unit", "reduce")


def _strings(col: list[str] | pl.Series) -> list[str]:
    """A MetricDict string column as JSON can carry it (only a spooled dictionary pays it)."""
    return col.to_list() if isinstance(col, pl.Series) else list(col)


@dataclass
class WriteMetrics:
    run: str
    metrics: MetricDict
    nbytes = 0  # the registry holds the dictionary's bytes (registry.py)
    kind: ClassVar[int] = METRICS

    def apply(self, store: Store) -> int:
        # fresh: a registry (registry.py, or the coordinator's for a tier) gave these names
        # their ids, having checked them against the run's whole dictionary
        store.write_metrics(self.run, self.metrics, fresh=True)
        return 0

    def notify(self, observer) -> None:
        observer.on_metrics(self.run, self.metrics)

    def encode(self) -> list[bytes | memoryview]:
        return pack_metrics({"run": self.run}, self.metrics)


@dataclass
class WriteRaw:
    """Values of a step that was already reduced: recorded, never reduced."""

    run: str
    batch: ValueBatch
    nbytes: int
    kind: ClassVar[int] = RAW

    def apply(self, store: Store) -> int:
        store.write_raw(self.run, self.batch)
        return int(self.batch.value.size)

    def encode(self) -> list[bytes | memoryview]:
        return _pack({"run": self.run}, _batch_arrays(self.batch))


def write_rows(store: Store, run: str, rows: StepRows) -> int:
    """A reduced step's rows: one RawBlock per layout of whole vectors, flat rows for partial
    ones, the reduced rows and the status. Returns the raw values written."""
    for block in rows.blocks:
        store.write_raw_block(run, block)
    if rows.rest.value.size:
        store.write_raw(run, rows.rest)
    if rows.raw_only:  # a tier collector's: the reduction and status are the coordinator's
        return rows.n_raw
    if rows.reduced.value.size:
        store.write_reduced(run, rows.reduced)
    store.write_steps(run, [rows.status])
    return rows.n_raw


@dataclass
class WriteStep:
    """A step out of the barrier: reduce it (on the writer thread), then write its rows."""

    run: str
    ready: ReadyStep
    id_maps: list[np.ndarray]  # per ready.parts entry: schema position -> metric id
    ops_M: np.ndarray  # op code per metric id, as registered when it was ready
    ready_at: float = 0.0  # monotonic clock when the barrier released the step
    rows: StepRows | None = None  # the reduction, computed once (retries reuse it)
    accumulate: bool = True  # False: raw rows only (a tier collector's, tier.py)
    kind: ClassVar[int] = ROWS

    @property
    def nbytes(self) -> int:
        return self.ready.nbytes

    def reduce(self) -> StepRows:
        if self.rows is None:
            parts = [
                (rank, ids, v, h) for (rank, _, v, h), ids in zip(self.ready.parts, self.id_maps)
            ]
            self.rows = reduce_step(
                self.ready.step,
                parts,
                self.ready.included,
                self.ops_M,
                self.ready.status,
                accumulate=self.accumulate,
            )
            self.ready.parts, self.id_maps = [], []  # copied into rows: free the vectors now
        return self.rows

    def apply(self, store: Store) -> int:
        return write_rows(store, self.run, self.reduce())

    def notify(self, observer) -> None:
        if self.rows is not None:
            observer.on_step(self.run, self.rows, self.ready.included, self.ready_at)

    def encode(self) -> list[bytes | memoryview]:
        return WriteRows(self.run, self.reduce()).encode()


@dataclass
class WriteRows:
    """A reduced step as a spool record gives it back: its rows, written as WriteStep would."""

    run: str
    rows: StepRows
    nbytes = 0
    kind: ClassVar[int] = ROWS

    def apply(self, store: Store) -> int:
        return write_rows(store, self.run, self.rows)

    def encode(self) -> list[bytes | memoryview]:
        r = self.rows
        arrays: list[np.ndarray] = []
        for b in r.blocks:
            arrays += [b.rank, b.metric_id, b.value]
        arrays += _batch_arrays(r.rest) + _batch_arrays(r.reduced)
        meta = {
            "run": self.run,
            "status": dataclasses.asdict(r.status),
            "blocks": [b.step for b in r.blocks],
            "raw_only": r.raw_only,
        }
        return _pack(meta, arrays)


@dataclass
class WriteClips:
    """Clip-update rows (a new version, or a version's rows again with the acked step)."""

    run: str
    records: list[ClipRecord]
    nbytes = 0
    kind: ClassVar[int] = CLIPS

    def apply(self, store: Store) -> int:
        try:
            store.write_clips(self.run, self.records)
        except NotFound:  # an operator's update for a run the store has not seen: sent,
            log.warning(
                "clip update for run %r not stored: the store has no such run", self.run
            )  # not recorded (retrying cannot help)
        return 0

    def encode(self) -> list[bytes | memoryview]:
        return _pack(
            {"run": self.run, "records": [dataclasses.asdict(c) for c in self.records]}, []
        )


@dataclass
class WriteEvents:
    """The online detectors' events of one step (detect.py writes them through EventSink)."""

    run: str
    events: list[EventRecord]
    nbytes = 0
    kind: ClassVar[int] = EVENTS

    def apply(self, store: Store) -> int:
        store.write_events(self.run, self.events)
        return 0

    def encode(self) -> list[bytes | memoryview]:
        return _pack({"run": self.run, "events": [dataclasses.asdict(e) for e in self.events]}, [])


@dataclass
class WriteDetectorState:
    """The online detectors' saved state of a run (detect.py, through EventSink)."""

    run: str
    step: int
    state: bytes
    kind_name: str = "detect"  # the store's detector_state kind
    nbytes = 0
    kind: ClassVar[int] = DETECTOR_STATE

    def apply(self, store: Store) -> int:
        store.write_detector_state(self.run, self.step, self.state, self.kind_name)
        return 0

    def encode(self) -> list[bytes | memoryview]:
        meta = {"run": self.run, "step": self.step, "kind_name": self.kind_name}
        return _pack(meta, [np.frombuffer(self.state, np.uint8)])


@dataclass
class Forget:
    """A run left the collector's memory (ingest.py evicted it): the observer forgets it too,
    after every job of the run before it. Writes nothing."""

    run: str
    nbytes = 0
    kind: ClassVar[int] = 0  # never spooled

    def apply(self, store: Store) -> int:
        return 0

    def encode(self) -> list[bytes | memoryview]:
        raise TypeError("Forget writes nothing and is never spooled")

    def notify(self, observer) -> None:
        forget = getattr(observer, "forget", None)
        if forget is not None:
            forget(self.run)


Job = (OpenRun | FinishRun | WriteMetrics | WriteRaw | WriteStep | WriteRows | WriteClips) | (
    WriteEvents | WriteDetectorState | Forget
)


def pack_metrics(meta: dict[str, Any], m: MetricDict) -> list[bytes | memoryview]:
    """A metric dictionary as one payload: `meta` plus its string columns as JSON lists, its
    id and label columns as arrays (the spool's METRICS record, the tier's Register call)."""
    meta = {**meta, **{k: _strings(getattr(m, k)) for k in STR_FIELDS}}
    return _pack(meta, [m.metric_id, m.layer, m.expert, m.head])


def unpack_metrics(meta: dict[str, Any], a: list[np.ndarray]) -> MetricDict:
    """pack_metrics' payload (already split by _unpack) back into a MetricDict."""
    return MetricDict(
        metric_id=a[0],
        name=meta["name"],
        layer=a[1],
        expert=a[2],
        head=a[3],
        stat=meta["stat"],
        unit=meta["unit"],
        reduce=meta["reduce"],
    )


def decode(kind: int, payload: bytes) -> Job:
    """A spool record back into the job that writes its rows; ValueError if it is not one."""
    meta, a = _unpack(payload)
    run: str = meta.get("run", "")
    if kind == OPEN_RUN:
        return OpenRun(RunInfo(**meta))
    if kind == FINISH_RUN:
        return FinishRun(run, meta["status"])
    if kind == METRICS:
        return WriteMetrics(run, unpack_metrics(meta, a))
    if kind == RAW:
        return WriteRaw(run, _batch(a, raw=True), 0)
    if kind == ROWS:
        n = len(meta["blocks"])
        blocks = [
            RawBlock(step=s, rank=a[3 * i], metric_id=a[3 * i + 1], value=a[3 * i + 2])
            for i, s in enumerate(meta["blocks"])
        ]
        rest = _batch(a[3 * n : 3 * n + 4], raw=True)
        reduced = _batch(a[3 * n + 4 : 3 * n + 8], raw=False)
        st = meta["status"]
        status = StepStatus(**{**st, "missing_ranks": tuple(st["missing_ranks"])})
        raw_only = bool(meta.get("raw_only", False))
        return WriteRows(run, StepRows(blocks, rest, reduced, status, raw_only=raw_only))
    if kind == CLIPS:
        return WriteClips(run, [ClipRecord(**c) for c in meta["records"]])
    if kind == EVENTS:
        return WriteEvents(run, [EventRecord(**e) for e in meta["events"]])
    if kind == DETECTOR_STATE:
        return WriteDetectorState(run, int(meta["step"]), a[0].tobytes(), meta["kind_name"])
    raise ValueError(f"unknown spool record kind {kind}")


class EventSink:
    """What the online detectors write events and saved state to (detect.py's `store`): each
    call becomes a WriteEvents / WriteDetectorState job that the writer stores right after the
    job being observed (or after the flush whose on_durable wrote it), in order, in the store
    or in the spool alike. Writer thread only."""

    def __init__(self) -> None:
        self.jobs: list[WriteEvents | WriteDetectorState] = []

    def write_events(self, run: str, events: list[EventRecord]) -> None:
        self.jobs.append(WriteEvents(run, list(events)))

    def write_detector_state(self, run: str, step: int, state: bytes, kind: str = "detect") -> None:
        self.jobs.append(WriteDetectorState(run, step, bytes(state), kind))
