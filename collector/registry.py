"""Metric and schema registry of one run: names -> dense int32 ids, schemas -> id arrays.

Metric identity is the name. The first rank to register a name fixes its labels (layer,
expert, head, stat, unit) and reduce op and gets the next dense id; every other rank that
registers the same name gets the same id, and must declare the same labels and op. Each
(rank, schema_id) keeps one int32 array mapping schema position -> metric id, which is all the
hot path needs (a chunk's ids are a slice of it).

Registration runs once per schema, but a 4,096-rank job sends 4,096 schemas of ~1,465
MetricDefs at connect, and the ranks of one expert-parallel group send identical ones. So a
schema is keyed by a digest of its serialized MetricDefs (hashed in C, no per-def Python): a
digest the run has registered before maps to the same id array, and only the per-rank checks
run. A first-time schema reads each def's fields once into columns and checks them in bulk.
"""

from __future__ import annotations

import hashlib
import operator
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from collector.barrier import ByteBudget
from collector.errors import InvalidArgument, ResourceExhausted
from collector.idset import IdRanges
from collector.reduction import OP_MAX, OP_MEAN, OP_MIN, OP_NAMES, OP_SUM
from proto.v1 import telemetry_pb2 as pb
from store.base import RUN_NAME_RE, MetricDict

PROTOCOL_VERSION = 1
MAX_NAME_CHARS = 512
REDUCE_CODES = {
    pb.REDUCE_SUM: OP_SUM,
    pb.REDUCE_MEAN: OP_MEAN,
    pb.REDUCE_MAX: OP_MAX,
    pb.REDUCE_MIN: OP_MIN,
}
assert all(k == v for k, v in REDUCE_CODES.items()), "reduction op codes mirror proto ReduceOp"

Labels = tuple[int, int, int, str, str, int]  # layer, expert, head, stat, unit, op
# What one registered name costs the collector, measured on a collector process (Parquet
# store, detectors on: 1.2 KB of RSS per ~45-character name; tests/integration/test_limits.py
# checks the bound holds): the registry's dict entry and label tuple, the metric-dictionary
# frames the store and the online detectors keep, the rows on their way to the store.
NAME_OVERHEAD_BYTES = 1024


def name_bytes(name: str) -> int:
    return NAME_OVERHEAD_BYTES + 2 * len(name)


def check_hello(h: pb.Hello, max_world_size: int) -> tuple[str, int, int]:
    """(run, rank, world_size) of a Hello, or InvalidArgument saying what is wrong."""
    run, rank = h.header.run, h.header.rank
    if not RUN_NAME_RE.match(run):
        raise InvalidArgument(f"run name {run!r} must match {RUN_NAME_RE.pattern}")
    if h.protocol_version != PROTOCOL_VERSION:
        raise InvalidArgument(
            f"protocol_version {h.protocol_version} is not supported; this "
            f"collector speaks {PROTOCOL_VERSION}"
        )
    if not 1 <= h.world_size <= max_world_size:
        raise InvalidArgument(f"world_size must be in [1, {max_world_size}], got {h.world_size}")
    if not 0 <= rank < h.world_size:
        raise InvalidArgument(f"rank {rank} is outside [0, world_size={h.world_size})")
    return run, rank, h.world_size


@dataclass(frozen=True)
class Schema:
    ids: np.ndarray  # int32: schema position -> metric id (never mutated)
    fingerprint: bytes  # digest of the serialized MetricDefs (_digest)


def _digest(defs: bytes) -> bytes:
    """Identity of a schema's serialized MetricDefs (sha256: hardware-accelerated here,
    ~65 us for 1,465 defs, and no client can craft two schemas that share a digest)."""
    return hashlib.sha256(defs).digest()


def _describe(name: str, lab: Labels) -> str:
    layer, expert, head, stat, unit, op = lab
    return (
        f"{name!r} (layer={layer}, expert={expert}, head={head}, stat={stat!r}, "
        f"unit={unit!r}, reduce={OP_NAMES[op]})"
    )


class RunMetrics:
    """One run's metric dictionary and every rank's schemas.

    Memory: every new name reserves name_bytes(name) in the collector's dictionary budget
    (max_dictionary_bytes), held until the run is evicted (`release`); a schema whose new
    names do not fit is refused RESOURCE_EXHAUSTED before anything of it registers."""

    def __init__(
        self,
        run: str,
        *,
        max_metrics: int,
        max_schemas_per_rank: int,
        budget: ByteBudget | None = None,
    ) -> None:
        self.run = run
        self.max_metrics = max_metrics
        self.max_schemas_per_rank = max_schemas_per_rank
        self.budget = budget
        self.nbytes = 0  # reserved in budget for this run's names
        self.ids: dict[str, int] = {}
        self._labels: list[Labels] = []
        # op code per metric id. Replaced, never written in place: the writer thread reduces
        # with whatever array it was handed.
        self.ops = np.zeros(0, dtype=np.int8)
        self._schemas: dict[tuple[int, int], Schema] = {}
        self._n_schemas: dict[int, int] = {}  # schemas per rank
        self._rank_ids: dict[int, IdRanges] = {}  # all ids in a rank's schemas
        # digest of MetricDefs -> their id array. Sound because names and labels are never
        # removed or changed: defs that resolved once resolve to the same ids forever.
        self._layouts: dict[bytes, np.ndarray] = {}

    def release(self) -> None:
        """The run leaves memory: give its names' bytes back to the budget."""
        if self.budget is not None and self.nbytes:
            self.budget.release(self.nbytes)
            self.nbytes = 0

    def has_schema(self, rank: int, schema_id: int) -> bool:
        return (rank, schema_id) in self._schemas

    def schema(self, rank: int, schema_id: int) -> np.ndarray:
        s = self._schemas.get((rank, schema_id))
        if s is None:
            raise InvalidArgument(
                f"unknown schema_id {schema_id} for rank {rank} of run "
                f"{self.run!r}: send its Schema frame first"
            )
        return s.ids

    def register_schema(self, rank: int, s: pb.Schema) -> MetricDict | None:
        """Register a Schema message as received; returns the metric-dictionary rows it
        created (None if none). Validates everything before changing anything. Identical
        MetricDefs (any rank, any schema_id) get the same id array object. The defs are
        fingerprinted from the message's own serialization (one C copy and encode, ~0.2 ms for
        1,465 defs) rather than by wrapping each def, which is most of the cost of registering
        a schema the run has already seen."""
        defs = pb.Schema()
        defs.CopyFrom(s)
        defs.ClearField("header")
        defs.ClearField("schema_id")
        return self._register(rank, s.schema_id, s.metrics, defs.SerializeToString())

    def _register(
        self, rank: int, schema_id: int, metrics: Sequence[pb.MetricDef], defs: bytes
    ) -> MetricDict | None:
        digest = _digest(defs)
        old = self._schemas.get((rank, schema_id))
        if old is not None and old.fingerprint == digest:
            return None  # a resend after reconnect
        cols: _Columns | None = None  # a first-time schema's defs, checked before the rest
        new: list[int] = []
        ids = self._layouts.get(digest)
        if ids is None:
            cols = _columns(schema_id, metrics)
            n_rank = self._check_slot(rank, schema_id, old)
            ids, new = self._resolve(cols)
        else:
            n_rank = self._check_slot(rank, schema_id, old)
        mine = self._rank_ids.get(rank)
        if mine is not None:
            clash = mine.contains(ids)
            if clash.any():
                name = metrics[int(np.flatnonzero(clash)[0])].name
                raise InvalidArgument(
                    f"metric {name!r} is already in another schema of rank "
                    f"{rank}; a rank sends each metric once per step"
                )

        if new and self.budget is not None:
            assert cols is not None  # new names come only from a first-time schema
            cost = sum(name_bytes(cols.names[i]) for i in new)
            self.budget.reserve(cost, f"{len(new)} new metric names of run {self.run!r}")
            self.nbytes += cost
        rows = None if cols is None else self._add(cols, ids, new)  # commit: nothing raises
        self._layouts.setdefault(digest, ids)
        self._schemas[(rank, schema_id)] = Schema(ids, digest)
        self._n_schemas[rank] = n_rank + 1
        self._rank_ids.setdefault(rank, IdRanges()).add(ids)
        return rows

    def _check_slot(self, rank: int, schema_id: int, old: Schema | None) -> int:
        """The rank's schema count, once schema_id is known to be free and the rank has room."""
        if old is not None:
            raise InvalidArgument(
                f"schema_id {schema_id} of rank {rank} was registered with "
                f"other metrics; schema ids are unique per (run, rank)"
            )
        n_rank = self._n_schemas.get(rank, 0)
        if n_rank >= self.max_schemas_per_rank:
            raise ResourceExhausted(
                f"rank {rank} already has {n_rank} schemas "
                f"(max_schemas_per_rank={self.max_schemas_per_rank})",
                permanent=True,  # schemas are never unregistered: a resend cannot fit
            )
        return n_rank

    def _resolve(self, cols: _Columns) -> tuple[np.ndarray, list[int]]:
        """Ids of a first-time schema's names (-1 where new) and the positions of new names;
        rejects a name declared with other labels than its registration, and too many."""
        got = list(map(self.ids.get, cols.names))
        new = [i for i, mid in enumerate(got) if mid is None]
        bad = next(
            (
                (i, mid)
                for i, mid in enumerate(got)
                if mid is not None and self._labels[mid] != cols.labels[i]
            ),
            None,
        )
        if bad is not None:
            i, mid = bad
            raise InvalidArgument(
                f"metric {_describe(cols.names[i], cols.labels[i])} conflicts with its "
                f"registration as {_describe(cols.names[i], self._labels[mid])}"
            )
        if len(self.ids) + len(new) > self.max_metrics:
            raise ResourceExhausted(
                f"run {self.run!r} would have {len(self.ids) + len(new)} "
                f"metrics (max_metrics_per_run={self.max_metrics})",
                permanent=True,
            )
        ids = np.array([-1 if mid is None else mid for mid in got], dtype=np.int32)
        return ids, new

    def _add(self, cols: _Columns, ids: np.ndarray, new: list[int]) -> MetricDict | None:
        """Give the new names of a validated schema the next dense ids (filling `ids` in)
        and return their dictionary rows."""
        if not new:
            return None
        first = len(self._labels)
        fresh = np.arange(first, first + len(new), dtype=np.int32)
        ids[new] = fresh
        names = [cols.names[i] for i in new]
        lab = [cols.labels[i] for i in new]
        self.ids.update(zip(names, fresh.tolist()))
        self._labels.extend(lab)
        layer, expert, head, stat, unit, op = zip(*lab)
        self.ops = np.concatenate([self.ops, np.array(op, np.int8)])
        return MetricDict(
            metric_id=fresh,
            name=names,
            layer=np.array(layer, np.int32),
            expert=np.array(expert, np.int32),
            head=np.array(head, np.int32),
            stat=list(stat),
            unit=list(unit),
            reduce=[OP_NAMES[x] for x in op],
        )


@dataclass(frozen=True)
class _Columns:
    names: list[str]
    labels: list[Labels]


def _columns(schema_id: int, metrics: Sequence[pb.MetricDef]) -> _Columns:
    """Each def's fields read once and checked in bulk (builtin min/max over the columns);
    InvalidArgument naming the first bad def, an empty schema, or a name that appears twice."""
    if not metrics:
        raise InvalidArgument(f"schema {schema_id} has no metrics")
    names, layer, expert, head, stat, unit, reduce = zip(*map(_FIELDS, metrics))
    n_chars = list(map(len, names))
    if not (
        set(reduce) <= REDUCE_CODES.keys()
        and min(n_chars) >= 1
        and max(n_chars) <= MAX_NAME_CHARS
        and min(*layer, *expert, *head) >= -1
    ):
        for i, m in enumerate(metrics):
            _check_def(schema_id, i, m)
    if len(set(names)) != len(names):
        count = Counter(names)
        dup = next(n for n in names if count[n] > 1)
        raise InvalidArgument(f"metric {dup!r} appears twice in schema {schema_id}")
    # REDUCE_CODES maps proto codes to themselves (asserted above), so reduce is the op code.
    # stat and unit repeat across thousands of metrics: one string object each, not one per def
    stat, unit = tuple(map(sys.intern, stat)), tuple(map(sys.intern, unit))
    return _Columns(list(names), list(zip(layer, expert, head, stat, unit, reduce)))


_FIELDS = operator.attrgetter("name", "layer", "expert", "head", "stat", "unit", "reduce")


def _check_def(schema_id: int, i: int, m: pb.MetricDef) -> None:
    """InvalidArgument if def i is bad: the per-def checks, run once the bulk check failed."""
    if m.reduce not in REDUCE_CODES:
        raise InvalidArgument(
            f"metric {i} ({m.name!r}) of schema {schema_id} has "
            f"reduce op {m.reduce}: declare sum, mean, max or min"
        )
    if not m.name or len(m.name) > MAX_NAME_CHARS:
        raise InvalidArgument(
            f"metric {i} of schema {schema_id}: name must have 1..{MAX_NAME_CHARS} characters"
        )
    if min(m.layer, m.expert, m.head) < -1:
        raise InvalidArgument(f"metric {m.name!r}: layer/expert/head must be >= -1")
