"""Metric and schema registry of one run: names -> dense int32 ids, schemas -> id arrays.

Metric identity is the name. The first rank to register a name fixes its labels (layer,
expert, head, stat, unit) and reduce op and gets the next dense id; every other rank that
registers the same name gets the same id, and must declare the same labels and op. Each
(rank, schema_id) keeps one int32 array mapping schema position -> metric id, which is all the
hot path needs (a chunk's ids are a slice of it).

Registration runs once per schema, but a 4,096-rank job sends 4,096 schemas of ~1,465
MetricDefs at connect, and the ranks of one expert-parallel group send identical ones. So a
schema is keyed by a digest of its serialized metrics (hashed in C, no per-def Python): a
digest the run has registered before maps to the same id array, and only the per-rank checks
run. A first-time schema becomes columns (`_Columns`: numpy arrays and one polars string
column) and everything after that is vectorised: the checks, the name lookup (store/names.py:
sorted 64-bit hashes, confirmed by comparing names), the label comparison with earlier
registrations and the id assignment. A schema in the packed form (Schema.packed, PackedMetrics)
arrives as those columns already; the MetricDef form (older clients) is read into them once.
Per registered metric the run keeps ~100 bytes in arrays (name bytes, hash table, labels, op), no
Python object.
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa

from collector.barrier import ByteBudget
from collector.errors import InvalidArgument, ResourceExhausted
from collector.idset import IdRanges
from collector.reduction import OP_MAX, OP_MEAN, OP_MEAN_NONZERO, OP_MIN, OP_NAMES, OP_SUM
from proto.v1 import telemetry_pb2 as pb
from store.base import RUN_NAME_RE, MetricDict
from store.frames import from_arrow
from store.names import NameTable, name_hashes

PROTOCOL_VERSION = 1
MAX_NAME_CHARS = 512
REDUCE_CODES = {
    pb.REDUCE_SUM: OP_SUM,
    pb.REDUCE_MEAN: OP_MEAN,
    pb.REDUCE_MAX: OP_MAX,
    pb.REDUCE_MIN: OP_MIN,
    pb.REDUCE_MEAN_NONZERO: OP_MEAN_NONZERO,
}
assert all(k == v for k, v in REDUCE_CODES.items()), "reduction op codes mirror proto ReduceOp"

Labels = tuple[int, int, int, str, str, int]  # layer, expert, head, stat, unit, op
# What one registered name costs the collector besides its characters, measured on a
# collector process (Parquet store, detectors on, 1 M, 3 M and 10 M names of 21-30 characters
# in packed parts: ~255-320 bytes of RSS per name, 3.0 GiB at 10 M;
# tests/integration/test_durability.py checks the bound holds): the registry's columns and
# hash table (~100 B), the store's name index and the allocator's slack after its dictionary
# parts, the online detectors' index, the rows on their way to the store. (Before the
# columnar registry it was 1,024: a dict entry, a label tuple and Python strings per name in
# the registry and the detectors.)
NAME_OVERHEAD_BYTES = 384


def name_bytes(name: str) -> int:
    return NAME_OVERHEAD_BYTES + 2 * len(name)


def names_bytes(n_names: int, n_chars: int) -> int:
    """name_bytes summed over n_names names of n_chars characters in all."""
    return NAME_OVERHEAD_BYTES * n_names + 2 * n_chars


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


class _Grow:
    """A growable numpy column: `view()` is the first n values. Capacity doubles, so adding
    P parts costs O(total), and a view handed out earlier never changes (values are only
    ever appended beyond it, or into a new buffer)."""

    def __init__(self, dtype: type) -> None:
        self._buf: np.ndarray = np.zeros(0, dtype)
        self.n = 0

    def view(self) -> np.ndarray:
        return self._buf[: self.n]

    def extend(self, values: np.ndarray) -> None:
        need = self.n + values.size
        if need > self._buf.size:
            buf = np.zeros(max(need, 2 * self._buf.size, 1024), self._buf.dtype)
            buf[: self.n] = self._buf[: self.n]
            self._buf = buf
        self._buf[self.n : need] = values
        self.n = need


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
        self.ids = NameTable()  # name -> dense id (`name in ids`, `len(ids)`)
        self._layer, self._expert, self._head = _Grow(np.int32), _Grow(np.int32), _Grow(np.int32)
        self._stat, self._unit = _Grow(np.int32), _Grow(np.int32)  # codes into _strings
        self._op = _Grow(np.int8)
        self._strings: dict[str, int] = {}  # stat and unit labels: a handful per run
        # op code per metric id. Never written in place below its length: the writer thread
        # reduces with whatever view it was handed.
        self.ops = self._op.view()
        self._schemas: dict[tuple[int, int], Schema] = {}
        self._n_schemas: dict[int, int] = {}  # schemas per rank
        self._rank_ids: dict[int, IdRanges] = {}  # all ids in a rank's schemas
        # digest of a schema's metrics -> their id array. Sound because names and labels are
        # never removed or changed: metrics that resolved once resolve to the same ids forever.
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
        """Register a Schema message as received (either form); returns the metric-dictionary
        rows it created (None if none). Validates everything before changing anything.
        Identical metrics (any rank, any schema_id) get the same id array object. They are
        fingerprinted from the message's own serialization (one C copy and encode) rather than
        by wrapping each def."""
        if s.HasField("packed"):
            if len(s.metrics):
                raise InvalidArgument(
                    f"schema {s.schema_id} sets both metrics and packed: send one form"
                )
            digest = _digest(b"packed\0" + s.packed.SerializeToString())
            return self._register(rank, s.schema_id, digest, lambda: _packed_columns(s))
        defs = pb.Schema()
        defs.CopyFrom(s)
        defs.ClearField("header")
        defs.ClearField("schema_id")
        digest = _digest(defs.SerializeToString())
        return self._register(rank, s.schema_id, digest, lambda: _def_columns(s))

    def _register(self, rank: int, schema_id: int, digest: bytes, columns) -> MetricDict | None:
        old = self._schemas.get((rank, schema_id))
        if old is not None and old.fingerprint == digest:
            return None  # a resend after reconnect
        cols: _Columns | None = None  # a first-time schema's metrics, checked before the rest
        new = np.zeros(0, np.int64)
        ids = self._layouts.get(digest)
        if ids is None:
            cols = columns()
            n_rank = self._check_slot(rank, schema_id, old)
            ids, new = self._resolve(cols)
        else:
            n_rank = self._check_slot(rank, schema_id, old)
        mine = self._rank_ids.get(rank)
        if mine is not None:
            clash = mine.contains(ids)
            if clash.any():
                name = self.ids.names[int(ids[int(np.flatnonzero(clash)[0])])]
                raise InvalidArgument(
                    f"metric {name!r} is already in another schema of rank "
                    f"{rank}; a rank sends each metric once per step"
                )

        if new.size and self.budget is not None:
            assert cols is not None  # new names come only from a first-time schema
            chars = int(cols.names.gather(new).str.len_chars().sum())
            cost = names_bytes(new.size, chars)
            self.budget.reserve(cost, f"{new.size} new metric names of run {self.run!r}")
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

    def _codes(self, table: list[str], local: np.ndarray) -> np.ndarray:
        """A part's stat/unit codes (indexes into its own table) as this run's codes; a
        string the run has not seen gets a negative code, equal to no registered one."""
        run_code = np.array([self._strings.get(t, -1 - i) for i, t in enumerate(table)], np.int32)
        return run_code[local] if run_code.size else np.zeros(local.shape, np.int32)

    def _labels_of(self, mid: int) -> Labels:
        strings = list(self._strings)
        return (
            int(self._layer.view()[mid]),
            int(self._expert.view()[mid]),
            int(self._head.view()[mid]),
            strings[int(self._stat.view()[mid])],
            strings[int(self._unit.view()[mid])],
            int(self._op.view()[mid]),
        )

    def _resolve(self, cols: _Columns) -> tuple[np.ndarray, np.ndarray]:
        """Ids of a first-time schema's names (-1 where new) and the positions of new names;
        rejects a name declared with other labels than its registration, and too many."""
        ids = self.ids.lookup(cols.names, cols.hashes)
        known = np.flatnonzero(ids >= 0)
        if known.size:
            mid = ids[known]
            differs = (
                (self._layer.view()[mid] != cols.layer[known])
                | (self._expert.view()[mid] != cols.expert[known])
                | (self._head.view()[mid] != cols.head[known])
                | (self._op.view()[mid] != cols.op[known])
                | (self._stat.view()[mid] != self._codes(cols.stats, cols.stat)[known])
                | (self._unit.view()[mid] != self._codes(cols.units, cols.unit)[known])
            )
            if differs.any():
                i = int(known[int(np.flatnonzero(differs)[0])])
                name = cols.names[i]
                raise InvalidArgument(
                    f"metric {_describe(name, cols.labels(i))} conflicts with its "
                    f"registration as {_describe(name, self._labels_of(int(ids[i])))}"
                )
        new = np.flatnonzero(ids < 0)
        if len(self.ids) + new.size > self.max_metrics:
            raise ResourceExhausted(
                f"run {self.run!r} would have {len(self.ids) + new.size} "
                f"metrics (max_metrics_per_run={self.max_metrics})",
                permanent=True,
            )
        return ids, new

    def _add(self, cols: _Columns, ids: np.ndarray, new: np.ndarray) -> MetricDict | None:
        """Give the new names of a validated schema the next dense ids (filling `ids` in)
        and return their dictionary rows."""
        if not new.size:
            return None
        for t in (*cols.stats, *cols.units):
            self._strings.setdefault(t, len(self._strings))
        names = cols.names.gather(new)
        fresh = self.ids.append(names, cols.hashes[new])
        ids[new] = fresh
        layer, expert, head, op = cols.layer[new], cols.expert[new], cols.head[new], cols.op[new]
        stat, unit = (
            self._codes(cols.stats, cols.stat)[new],
            self._codes(cols.units, cols.unit)[new],
        )
        for col, v in (
            (self._layer, layer),
            (self._expert, expert),
            (self._head, head),
            (self._stat, stat),
            (self._unit, unit),
            (self._op, op),
        ):
            col.extend(v)
        self.ops = self._op.view()
        strings = pl.Series(list(self._strings), dtype=pl.Utf8)
        return MetricDict(
            metric_id=fresh,
            name=names,
            layer=layer,
            expert=expert,
            head=head,
            stat=strings.gather(stat),
            unit=strings.gather(unit),
            reduce=_OP_SERIES.gather(op.astype(np.int64)),
        )


_OP_SERIES = pl.Series([OP_NAMES.get(i, "") for i in range(max(OP_NAMES) + 1)], dtype=pl.Utf8)


@dataclass(frozen=True)
class _Columns:
    """A schema's metrics as columns: names, their hashes, labels; stat and unit as indexes
    into the schema's own tables."""

    names: pl.Series  # Utf8
    hashes: np.ndarray  # uint64 (store.names.name_hashes)
    layer: np.ndarray  # int32
    expert: np.ndarray
    head: np.ndarray
    stats: list[str]
    stat: np.ndarray  # int64 index into stats
    units: list[str]
    unit: np.ndarray
    op: np.ndarray  # int8, proto ReduceOp = collector op code

    def labels(self, i: int) -> Labels:
        return (
            int(self.layer[i]),
            int(self.expert[i]),
            int(self.head[i]),
            self.stats[int(self.stat[i])],
            self.units[int(self.unit[i])],
            int(self.op[i]),
        )


def _checked(schema_id: int, names: pl.Series, **cols) -> _Columns:
    """Columns checked in bulk; InvalidArgument naming the first bad metric (its first bad
    field, in the order: reduce op, name length, labels), an empty schema, or a name that
    appears twice (the first in schema order that has a twin)."""
    n = names.len()
    if n == 0:
        raise InvalidArgument(f"schema {schema_id} has no metrics")
    op = cols["op"]
    n_chars = names.str.len_chars().to_numpy()
    bad_op = (op < 1) | (op > max(OP_NAMES))
    bad_name = (n_chars < 1) | (n_chars > MAX_NAME_CHARS)
    bad_label = (cols["layer"] < -1) | (cols["expert"] < -1) | (cols["head"] < -1)
    bad = bad_op | bad_name | bad_label
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        name = names[i]
        if bad_op[i]:
            raise InvalidArgument(
                f"metric {i} ({name!r}) of schema {schema_id} has "
                f"reduce op {int(op[i])}: declare sum, mean, max, min or mean_nonzero"
            )
        if bad_name[i]:
            raise InvalidArgument(
                f"metric {i} of schema {schema_id}: name must have 1..{MAX_NAME_CHARS} characters"
            )
        raise InvalidArgument(f"metric {name!r}: layer/expert/head must be >= -1")
    dup = names.is_duplicated()
    if dup.any():
        raise InvalidArgument(
            f"metric {names.filter(dup)[0]!r} appears twice in schema {schema_id}"
        )
    return _Columns(names=names, hashes=name_hashes(names), **cols)


def _def_columns(s: pb.Schema) -> _Columns:
    """The MetricDef form (older clients): each def's fields read once into columns."""
    metrics: Sequence[pb.MetricDef] = s.metrics
    if not metrics:
        raise InvalidArgument(f"schema {s.schema_id} has no metrics")
    names, layer, expert, head, stat, unit, reduce = zip(*map(_FIELDS, metrics))
    stats, stat_ix = _table(stat)
    units, unit_ix = _table(unit)
    i32 = lambda v: np.array(v, np.int64).clip(-(2**31), 2**31 - 1).astype(np.int32)
    return _checked(
        s.schema_id,
        pl.Series(names, dtype=pl.Utf8),
        layer=i32(layer),
        expert=i32(expert),
        head=i32(head),
        stats=stats,
        stat=stat_ix,
        units=units,
        unit=unit_ix,
        op=np.array(reduce, np.int64).clip(-1, 127).astype(np.int8),
    )


def _table(values: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """(distinct values in first-seen order, index of each value into them)."""
    table = list(dict.fromkeys(values))
    index = {v: i for i, v in enumerate(table)}
    return table, np.fromiter(map(index.__getitem__, values), np.int64, len(values))


def _array(schema_id: int, field: str, data: bytes, dtype: str, n: int) -> np.ndarray:
    a = np.frombuffer(data, dtype)
    if a.size != n or len(data) != n * a.itemsize:
        raise InvalidArgument(
            f"schema {schema_id}: packed.{field} holds {len(data)} bytes, not {n} x "
            f"{np.dtype(dtype).itemsize} (one {dtype} per metric)"
        )
    return a


def _packed_columns(s: pb.Schema) -> _Columns:
    """The packed form: arrays read in place, names as one Arrow string array."""
    p, sid = s.packed, s.schema_id
    n = p.count
    ends = _array(sid, "name_ends", p.name_ends, "<u4", n).astype(np.int64)
    stat = _array(sid, "stat_index", p.stat_index, "<u4", n).astype(np.int64)
    unit = _array(sid, "unit_index", p.unit_index, "<u4", n).astype(np.int64)
    if n and (int(stat.max()) >= len(p.stats) or int(unit.max()) >= len(p.units)):
        raise InvalidArgument(f"schema {sid}: packed stat/unit index outside its table")
    if n and (int(ends[-1]) != len(p.names) or bool((np.diff(ends) < 0).any())):
        raise InvalidArgument(
            f"schema {sid}: packed.name_ends must ascend to len(names) = {len(p.names)}"
        )
    offsets = np.concatenate([[0], ends]).astype(np.int32)
    try:
        arr = pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(p.names))
        arr.validate(full=True)  # offsets and UTF-8
    except (pa.ArrowException, ValueError) as e:
        raise InvalidArgument(f"schema {sid}: packed names are not valid UTF-8: {e}") from None
    names = from_arrow(pa.table({"name": arr}))["name"]
    return _checked(
        sid,
        names,
        layer=_array(sid, "layer", p.layer, "<i4", n).astype(np.int32),
        expert=_array(sid, "expert", p.expert, "<i4", n).astype(np.int32),
        head=_array(sid, "head", p.head, "<i4", n).astype(np.int32),
        stats=list(p.stats),
        stat=stat,
        units=list(p.units),
        unit=unit,
        op=_array(sid, "reduce", p.reduce, "u1", n).astype(np.int8),
    )


_FIELDS = operator.attrgetter("name", "layer", "expert", "head", "stat", "unit", "reduce")
