"""Schemas on the wire: a rank's logical schemas cut into wire parts, in either encoding.

A Schema message is not chunked, so a logical schema (a list of MetricSpecs) is cut into wire
schemas ("parts") by encoded size, each part sent as repeated MetricDefs or, to a collector
whose Welcome says takes_packed_schema, as packed columns (PackedMetrics). Everything here
works on columns (SpecColumns: one C-level pass per field, no Python code per metric) so a
rank can register 10^7 metrics. Step values are cut at the same places (part_layouts,
wire_layout); frames.py builds the step, control and batch frames.
"""

from __future__ import annotations

import operator
from collections import OrderedDict
from collections.abc import Iterator, Sequence, Sized

import numpy as np

from hooks.frames import Identity
from hooks.layout import MetricSpec
from proto.v1 import telemetry_pb2 as pb

# A Schema message is not chunked, so a logical schema is cut into wire schemas ("parts") by
# encoded size: each part's metrics take at most SCHEMA_PART_BYTES in either form (MetricDefs,
# or the packed columns a collector that says takes_packed_schema gets), which
# with its header stays under the contract's 1 MiB per message (the collector takes 1 MiB +
# 64 KiB). A def takes 10-600 bytes (names up to 512 characters), so a part holds ~1,700 to
# ~60,000 metrics; parts per logical schema are at most MAX_SCHEMA_PARTS (a rank can register
# 10^7 metrics of any name length). Part 0 keeps the logical id, part k >= 1 gets
# (id << 16) | k. Values keep their order, so the packed vector is cut at the same places.
SCHEMA_PART_BYTES = 1_000_000
MAX_SCHEMA_PARTS = 1 << 16
REDUCE = {
    "sum": pb.REDUCE_SUM,
    "mean": pb.REDUCE_MEAN,
    "max": pb.REDUCE_MAX,
    "min": pb.REDUCE_MIN,
    "mean_nonzero": pb.REDUCE_MEAN_NONZERO,
}
_OP_OF: dict[int, str] = {int(v): k for k, v in REDUCE.items()}


def _part_id(schema_id: int, k: int) -> int:
    return schema_id if k == 0 else (schema_id << 16) | k


def _varint_len(v: np.ndarray) -> np.ndarray:
    """Bytes of the base-128 varint of each non-negative value."""
    n = np.ones(v.shape, np.int64)
    top = int(v.max()) if v.size else 0
    for bits in range(7, 64, 7):
        if top < (1 << bits):  # no value has this many bits: neither has any longer one
            break
        n += v >= (1 << bits)
    return n


def _int32_field(v: np.ndarray) -> np.ndarray:
    """Bytes of an int32 field (tag + varint; 0 is not encoded, negatives take 10)."""
    body = np.where(v < 0, 10, _varint_len(np.maximum(v, 0)))
    return np.where(v == 0, 0, 1 + body)


def _str_field(n: np.ndarray) -> np.ndarray:
    """Bytes of a string field of n UTF-8 bytes (tag + length + bytes; empty: none)."""
    return np.where(n == 0, 0, 1 + _varint_len(n) + n)


def _utf8_lens(texts: Sequence[str]) -> np.ndarray:
    """UTF-8 bytes of each text (one C pass each; ASCII, the usual case, is just len)."""
    if all(map(str.isascii, texts)):  # no joined copy of every name (GBs at 10 M)
        return np.fromiter(map(len, texts), np.int64, len(texts))
    return np.fromiter(map(len, map(str.encode, texts)), np.int64, len(texts))


# Packed bytes per metric besides its name: name_ends, layer, expert, head, stat_index and
# unit_index (4 each), reduce (1). A part also carries its tables and ~12 field headers.
PACKED_METRIC_BYTES = 25
PACKED_PART_OVERHEAD = 128


class _Codes(dict):
    """text -> its index in first-seen order, assigned on first lookup: `map(codes.__getitem__,
    texts)` is one C-level pass that builds the table and codes every text (a hit costs no
    Python call; only the few distinct labels reach __missing__)."""

    def __missing__(self, text: str) -> int:
        code = self[text] = len(self)
        return code


class SpecColumns:
    """A schema's MetricSpecs as columns, made once per schema (one C-level pass over the
    specs per field, no Python code per metric): what the wire encoders, the part cut and the
    size checks work on. Slicing gives a part's columns (views, no copy)."""

    def __init__(
        self,
        names: list[str],
        name_len: np.ndarray,
        layer: np.ndarray,
        expert: np.ndarray,
        head: np.ndarray,
        strings: list[str],
        stat: np.ndarray,
        unit: np.ndarray,
        reduce: np.ndarray,
    ) -> None:
        self.names, self.name_len = names, name_len  # UTF-8 bytes of each name
        self.layer, self.expert, self.head = layer, expert, head  # int32
        self.strings = strings  # the distinct stat and unit labels
        self.stat, self.unit = stat, unit  # int64 indexes into strings
        self.reduce = reduce  # uint8 ReduceOp

    @classmethod
    def of(cls, specs: Sequence[MetricSpec] | SpecColumns) -> SpecColumns:
        if isinstance(specs, SpecColumns):
            return specs
        n = len(specs)
        if n == 0:
            z = np.zeros(0, np.int32)
            return cls([], np.zeros(0, np.int64), z, z, z, [], z, z, np.zeros(0, np.uint8))

        def column(field: str) -> Iterator:  # one C-level pass per field (a transpose of
            return map(operator.attrgetter(field), specs)  # tuples costs 4x: allocation, GC)

        names = list(column("name"))
        stat_codes, unit_codes = _Codes(), _Codes()  # one pass each: table and codes
        stat_ix = np.fromiter(map(stat_codes.__getitem__, column("stat")), np.int64, n)
        unit_ix = np.fromiter(map(unit_codes.__getitem__, column("unit")), np.int64, n)
        strings = list(dict.fromkeys((*stat_codes, *unit_codes)))
        code = {t: i for i, t in enumerate(strings)}
        try:
            red = np.fromiter(map(REDUCE.__getitem__, column("reduce")), np.uint8, n)
        except KeyError as e:
            raise ValueError(f"reduce must be one of {sorted(REDUCE)}, got {e.args[0]!r}") from None
        return cls(
            names,
            _utf8_lens(names),
            np.fromiter(column("layer"), np.int32, n),
            np.fromiter(column("expert"), np.int32, n),
            np.fromiter(column("head"), np.int32, n),
            strings,
            np.fromiter(map(code.__getitem__, stat_codes), np.int64, len(stat_codes))[stat_ix],
            np.fromiter(map(code.__getitem__, unit_codes), np.int64, len(unit_codes))[unit_ix],
            red,
        )

    @classmethod
    def from_arrays(
        cls,
        names: list[str],
        reduce: str | Sequence[str],
        stat: str | Sequence[str],
        *,
        layer: np.ndarray | int = -1,
        expert: np.ndarray | int = -1,
        head: np.ndarray | int = -1,
        unit: str = "",
    ) -> SpecColumns:
        """Columns without MetricSpec objects, for a rank of millions of metrics: a scalar
        applies to every metric; reduce and stat may also be one per metric."""
        n = len(names)

        def labels(v: np.ndarray | int) -> np.ndarray:
            return np.broadcast_to(np.asarray(v, np.int32), (n,)).copy()

        if isinstance(reduce, str):
            reduce = [reduce] * n
        if isinstance(stat, str):
            stat = [stat] * n
        strings = list(dict.fromkeys((*dict.fromkeys(stat), unit)))
        code = {t: i for i, t in enumerate(strings)}
        try:
            red = np.fromiter(map(REDUCE.__getitem__, reduce), np.uint8, n)
        except KeyError as e:
            raise ValueError(f"reduce must be one of {sorted(REDUCE)}, got {e.args[0]!r}") from None
        return cls(
            list(names),
            _utf8_lens(names),
            labels(layer),
            labels(expert),
            labels(head),
            strings,
            np.fromiter(map(code.__getitem__, stat), np.int64, n),
            np.full(n, code[unit], np.int64),
            red,
        )

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[MetricSpec]:
        return iter(self.specs())

    def __getitem__(self, part: slice) -> SpecColumns:
        return SpecColumns(
            self.names[part],
            self.name_len[part],
            self.layer[part],
            self.expert[part],
            self.head[part],
            self.strings,
            self.stat[part],
            self.unit[part],
            self.reduce[part],
        )

    def plain_means(self) -> SpecColumns:
        """These columns with mean_nonzero declared as mean (for a collector whose Welcome
        lacks takes_mean_nonzero, which would refuse the op): a copy only where it has one."""
        nz = self.reduce == pb.REDUCE_MEAN_NONZERO
        if not nz.any():
            return self
        out = self[:]
        out.reduce = np.where(nz, np.uint8(pb.REDUCE_MEAN), self.reduce).astype(np.uint8)
        return out

    def specs(self) -> list[MetricSpec]:
        """Back to MetricSpecs (tests, and the rare older collector)."""
        ops = _OP_OF
        t = self.strings
        return [
            MetricSpec(n, ops[int(r)], t[int(s)], int(la), int(e), int(h), t[int(u)])
            for n, r, s, la, e, h, u in zip(
                self.names, self.reduce, self.stat, self.layer, self.expert, self.head, self.unit
            )
        ]

    def def_sizes(self) -> np.ndarray:
        """Exactly the bytes each metric's MetricDef takes inside a Schema (its tag and length
        included), column-wise: no protobuf is built."""
        lens = _utf8_lens(self.strings) if self.strings else np.zeros(0, np.int64)
        body = (
            _str_field(self.name_len)
            + _int32_field(self.layer.astype(np.int64))
            + _int32_field(self.expert.astype(np.int64))
            + _int32_field(self.head.astype(np.int64))
            + _str_field(lens[self.stat] if lens.size else self.stat)
            + _str_field(lens[self.unit] if lens.size else self.unit)
            + 2  # reduce: tag + a one-byte enum value (never 0: REDUCE maps every op to 1..5)
        )
        return 1 + _varint_len(body) + body

    def wire_sizes(self) -> np.ndarray:
        """Bytes each metric takes in a part of either form (the larger of the two): a part
        cut by these fits in both, so its values are cut at the same places whichever form a
        collector takes."""
        return np.maximum(self.def_sizes(), self.name_len + PACKED_METRIC_BYTES)

    def tables_bytes(self) -> int:
        """Bound on the stat/unit tables one packed part carries (all of them, each twice)."""
        return int(2 * (_str_field(_utf8_lens(self.strings)) + 1).sum()) if self.strings else 0

    def packed(self) -> pb.PackedMetrics:
        """The PackedMetrics of these metrics: arrays as bytes, names as one blob."""
        used_s, stat = np.unique(self.stat, return_inverse=True)
        used_u, unit = np.unique(self.unit, return_inverse=True)
        return pb.PackedMetrics(
            count=len(self.names),
            names="".join(self.names).encode(),
            name_ends=np.cumsum(self.name_len).astype("<u4").tobytes(),
            layer=self.layer.astype("<i4").tobytes(),
            expert=self.expert.astype("<i4").tobytes(),
            head=self.head.astype("<i4").tobytes(),
            stats=[self.strings[int(i)] for i in used_s],
            stat_index=stat.astype("<u4").tobytes(),
            units=[self.strings[int(i)] for i in used_u],
            unit_index=unit.astype("<u4").tobytes(),
            reduce=self.reduce.astype("u1").tobytes(),
        )


def def_sizes(specs: Sequence[MetricSpec] | SpecColumns) -> np.ndarray:
    """Exactly the bytes each spec's MetricDef takes inside a Schema (SpecColumns.def_sizes)."""
    return SpecColumns.of(specs).def_sizes()


def cut_points(sizes: np.ndarray, budget: int | None = None) -> list[int]:
    """Start offsets of the parts: greedy, each part's sizes summing to at most `budget`
    (default SCHEMA_PART_BYTES; a lone def bigger than it gets a part of its own)."""
    budget = SCHEMA_PART_BYTES if budget is None else budget
    if sizes.size == 0:
        return [0]
    ends = np.cumsum(sizes)
    starts, base = [0], 0
    while True:
        cut = int(np.searchsorted(ends, base + budget, side="right"))
        cut = max(cut, starts[-1] + 1)  # at least one def per part
        if cut >= sizes.size:
            return starts
        starts.append(cut)
        base = int(ends[cut - 1])


def wire_schemas(
    schemas: Sequence[tuple[int, Sequence[MetricSpec] | SpecColumns]],
) -> list[tuple[int, SpecColumns]]:
    """Logical (schema_id, specs) -> wire schemas that take at most SCHEMA_PART_BYTES each in
    either form (MetricDefs, or PackedMetrics with its tables); ValueError beyond
    MAX_SCHEMA_PARTS parts."""
    out = []
    for schema_id, specs in schemas:
        cols = SpecColumns.of(specs)
        budget = SCHEMA_PART_BYTES - cols.tables_bytes() - PACKED_PART_OVERHEAD
        starts = cut_points(cols.wire_sizes(), max(budget, SCHEMA_PART_BYTES // 2))
        if len(starts) > MAX_SCHEMA_PARTS:
            raise ValueError(
                f"schema {schema_id} needs {len(starts)} wire parts of "
                f"{SCHEMA_PART_BYTES} bytes, more than {MAX_SCHEMA_PARTS}"
            )
        for k, (a, b) in enumerate(zip(starts, [*starts[1:], len(cols)])):
            out.append((_part_id(schema_id, k), cols[a:b]))
    return out


def part_layouts(
    wire: Sequence[tuple[int, Sized]],
) -> dict[int, list[tuple[int, int]]]:
    """Logical schema_id -> its parts [(wire schema_id, n_values)] in order, from
    wire_schemas' output: how a step's vector of that schema is cut."""
    out: dict[int, list[tuple[int, int]]] = {}
    for part_id, specs in wire:
        logical = part_id >> 16 if part_id >> 16 else part_id
        out.setdefault(logical, []).append((part_id, len(specs)))
    return out


def wire_layout(
    schemas: Sequence[tuple[int, int]], parts: dict[int, list[tuple[int, int]]]
) -> list[tuple[int, int]]:
    """Logical (schema_id, n_values) in vector order -> the same cut into wire schemas (a
    schema `parts` does not know travels as one part)."""
    out = []
    for schema_id, n in schemas:
        cut = parts.get(schema_id)
        if cut is None or sum(m for _, m in cut) != n:
            out.append((schema_id, n))
        else:
            out.extend(cut)
    return out


class _DefsCache:
    """The MetricDefs of a schema (the form older collectors take), encoded once per content
    (key: the packed encoding): ranks of one EP group (a load generator plays thousands in
    one process) register the same names. The one per-metric Python loop left on the client,
    and only towards a collector without takes_packed_schema."""

    def __init__(self, size: int = 256) -> None:
        self._cache: OrderedDict[bytes, bytes] = OrderedDict()
        self.size = size

    def __call__(self, key: bytes, cols: SpecColumns) -> bytes:
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = pb.Schema(
                metrics=[
                    pb.MetricDef(
                        name=s.name,
                        layer=s.layer,
                        expert=s.expert,
                        head=s.head,
                        stat=s.stat,
                        unit=s.unit,
                        reduce=REDUCE[s.reduce],
                    )
                    for s in cols.specs()
                ]
            ).SerializeToString()
            if len(self._cache) > self.size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return hit

    def cache_clear(self) -> None:
        self._cache.clear()


_metric_defs = _DefsCache()


def schema(
    ident: Identity,
    seq: int,
    schema_id: int,
    specs: Sequence[MetricSpec] | SpecColumns,
    packed: bool = False,
    mean_nonzero: bool = True,
) -> pb.ClientFrame:
    """A Schema frame: PackedMetrics when `packed` (the collector's Welcome said it takes
    them), else the repeated MetricDef form every collector takes; mean_nonzero declared as
    mean unless `mean_nonzero` (the Welcome said takes_mean_nonzero)."""
    cols = SpecColumns.of(specs)
    if not mean_nonzero:
        cols = cols.plain_means()
    if packed:
        msg = pb.Schema(header=ident.header(-1, seq), schema_id=schema_id, packed=cols.packed())
        # a part cut by wire_sizes fits; only stat/unit tables of hundreds of KB could not
        # (then the MetricDef form, which the cut bounds exactly, goes instead)
        if msg.ByteSize() <= SCHEMA_PART_BYTES + PACKED_PART_OVERHEAD + (64 << 10):
            return pb.ClientFrame(schema=msg)
    key = cols.packed().SerializeToString()
    msg = pb.Schema.FromString(_metric_defs(key, cols))
    msg.header.CopyFrom(ident.header(-1, seq))
    msg.schema_id = schema_id
    return pb.ClientFrame(schema=msg)


def declares_mean_nonzero(s: pb.Schema) -> bool:
    if s.HasField("packed"):
        return bytes([pb.REDUCE_MEAN_NONZERO]) in s.packed.reduce
    return any(m.reduce == pb.REDUCE_MEAN_NONZERO for m in s.metrics)


def in_form(frame: pb.ClientFrame, packed: bool, mean_nonzero: bool = True) -> bool:
    """A Schema frame is in the form a collector takes: packed or not as it says, and no
    mean_nonzero unless it takes that op."""
    s = frame.schema
    return s.HasField("packed") == packed and (mean_nonzero or not declares_mean_nonzero(s))


def schema_form(frame: pb.ClientFrame, packed: bool, mean_nonzero: bool = True) -> pb.ClientFrame:
    """A sent Schema frame in the form a collector takes (in_form), same header (a reconnect
    found a collector that takes another one). A mean_nonzero declared as mean for an older
    collector stays mean: the frame no longer says which it was."""
    if in_form(frame, packed, mean_nonzero):
        return frame
    s = frame.schema
    cols = columns_of(s) if s.HasField("packed") else SpecColumns.of(_specs_of(s))
    return schema(_ident_of(s.header), s.header.seq, s.schema_id, cols, packed, mean_nonzero)


def _ident_of(h: pb.FrameHeader) -> Identity:
    return Identity(h.run, h.rank, 0)


def _specs_of(s: pb.Schema) -> list[MetricSpec]:
    return [
        MetricSpec(m.name, _OP_OF[m.reduce], m.stat, m.layer, m.expert, m.head, m.unit)
        for m in s.metrics
    ]


def columns_of(s: pb.Schema) -> SpecColumns:
    """A packed Schema back into columns (the client's own frames only: no checks)."""
    p = s.packed
    ends = np.frombuffer(p.name_ends, "<u4").astype(np.int64)
    starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
    blob = p.names
    names = [blob[a:b].decode() for a, b in zip(starts.tolist(), ends.tolist())]
    strings = [*p.stats, *p.units]
    return SpecColumns(
        names,
        ends - starts,
        np.frombuffer(p.layer, "<i4").astype(np.int32),
        np.frombuffer(p.expert, "<i4").astype(np.int32),
        np.frombuffer(p.head, "<i4").astype(np.int32),
        strings,
        np.frombuffer(p.stat_index, "<u4").astype(np.int64),
        np.frombuffer(p.unit_index, "<u4").astype(np.int64) + len(p.stats),
        np.frombuffer(p.reduce, "u1").copy(),
    )
