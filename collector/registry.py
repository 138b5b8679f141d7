"""Metric and schema registry of one run: names -> dense int32 ids, schemas -> id arrays.

Metric identity is the name. The first rank to register a name fixes its labels (layer,
expert, head, stat, unit) and reduce op and gets the next dense id; every other rank that
registers the same name gets the same id, and must declare the same labels and op. Each
(rank, schema_id) keeps one int32 array mapping schema position -> metric id, which is all the
hot path needs (a chunk's ids are a slice of it). Registration runs once per schema, so it may
loop over MetricDefs in Python; nothing per step does.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from collector.errors import InvalidArgument, ResourceExhausted
from collector.reduction import OP_MAX, OP_MEAN, OP_MIN, OP_NAMES, OP_SUM
from proto.v1 import telemetry_pb2 as pb
from store.base import RUN_NAME_RE, MetricDict

PROTOCOL_VERSION = 1
MAX_NAME_CHARS = 512
REDUCE_CODES = {pb.REDUCE_SUM: OP_SUM, pb.REDUCE_MEAN: OP_MEAN, pb.REDUCE_MAX: OP_MAX,
                pb.REDUCE_MIN: OP_MIN}
assert all(k == v for k, v in REDUCE_CODES.items()), "reduction op codes mirror proto ReduceOp"

Labels = tuple[int, int, int, str, str, int]      # layer, expert, head, stat, unit, op


def check_hello(h: pb.Hello, max_world_size: int) -> tuple[str, int, int]:
    """(run, rank, world_size) of a Hello, or InvalidArgument saying what is wrong."""
    run, rank = h.header.run, h.header.rank
    if not RUN_NAME_RE.match(run):
        raise InvalidArgument(f"run name {run!r} must match {RUN_NAME_RE.pattern}")
    if h.protocol_version != PROTOCOL_VERSION:
        raise InvalidArgument(f"protocol_version {h.protocol_version} is not supported; this "
                              f"collector speaks {PROTOCOL_VERSION}")
    if not 1 <= h.world_size <= max_world_size:
        raise InvalidArgument(f"world_size must be in [1, {max_world_size}], got {h.world_size}")
    if not 0 <= rank < h.world_size:
        raise InvalidArgument(f"rank {rank} is outside [0, world_size={h.world_size})")
    return run, rank, h.world_size


@dataclass(frozen=True)
class Schema:
    ids: np.ndarray        # int32: schema position -> metric id (never mutated)
    fingerprint: bytes     # digest of the MetricDefs, for idempotent re-registration


def _labels(m: pb.MetricDef) -> Labels:
    return (m.layer, m.expert, m.head, m.stat, m.unit, REDUCE_CODES[m.reduce])


def _describe(name: str, lab: Labels) -> str:
    layer, expert, head, stat, unit, op = lab
    return (f"{name!r} (layer={layer}, expert={expert}, head={head}, stat={stat!r}, "
            f"unit={unit!r}, reduce={OP_NAMES[op]})")


class RunMetrics:
    """One run's metric dictionary and every rank's schemas."""

    def __init__(self, run: str, *, max_metrics: int, max_schemas_per_rank: int) -> None:
        self.run = run
        self.max_metrics = max_metrics
        self.max_schemas_per_rank = max_schemas_per_rank
        self.ids: dict[str, int] = {}
        self._labels: list[Labels] = []
        # op code per metric id. Replaced, never written in place: the writer thread reduces
        # with whatever array it was handed.
        self.ops = np.zeros(0, dtype=np.int8)
        self._schemas: dict[tuple[int, int], Schema] = {}
        self._rank_ids: dict[int, np.ndarray] = {}    # all ids in a rank's schemas

    def has_schema(self, rank: int, schema_id: int) -> bool:
        return (rank, schema_id) in self._schemas

    def schema(self, rank: int, schema_id: int) -> np.ndarray:
        s = self._schemas.get((rank, schema_id))
        if s is None:
            raise InvalidArgument(f"unknown schema_id {schema_id} for rank {rank} of run "
                                  f"{self.run!r}: send its Schema frame first")
        return s.ids

    def register(self, rank: int, schema_id: int, metrics: Sequence[pb.MetricDef]
                 ) -> MetricDict | None:
        """Register a schema; returns the metric-dictionary rows it created (None if none).
        Validates everything before changing anything."""
        for i, m in enumerate(metrics):
            if m.reduce not in REDUCE_CODES:
                raise InvalidArgument(f"metric {i} ({m.name!r}) of schema {schema_id} has "
                                      f"reduce op {m.reduce}: declare sum, mean, max or min")
            if not m.name or len(m.name) > MAX_NAME_CHARS:
                raise InvalidArgument(f"metric {i} of schema {schema_id}: name must have 1.."
                                      f"{MAX_NAME_CHARS} characters")
            if min(m.layer, m.expert, m.head) < -1:
                raise InvalidArgument(f"metric {m.name!r}: layer/expert/head must be >= -1")
        names = [m.name for m in metrics]
        labels = [_labels(m) for m in metrics]
        digest = hashlib.blake2b(repr((names, labels)).encode(), digest_size=16).digest()
        old = self._schemas.get((rank, schema_id))
        if old is not None:
            if old.fingerprint == digest:
                return None                               # a resend after reconnect
            raise InvalidArgument(f"schema_id {schema_id} of rank {rank} was registered with "
                                  f"other metrics; schema ids are unique per (run, rank)")
        if not metrics:
            raise InvalidArgument(f"schema {schema_id} has no metrics")
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise InvalidArgument(f"metric {dup!r} appears twice in schema {schema_id}")
        n_rank = sum(1 for (r, _) in self._schemas if r == rank)
        if n_rank >= self.max_schemas_per_rank:
            raise ResourceExhausted(f"rank {rank} already has {n_rank} schemas "
                                    f"(max_schemas_per_rank={self.max_schemas_per_rank})")

        ids = np.full(len(names), -1, dtype=np.int32)
        new: list[int] = []
        for i, (name, lab) in enumerate(zip(names, labels)):
            mid = self.ids.get(name)
            if mid is None:
                new.append(i)
            elif self._labels[mid] != lab:
                raise InvalidArgument(f"metric {_describe(name, lab)} conflicts with its "
                                      f"registration as {_describe(name, self._labels[mid])}")
            else:
                ids[i] = mid
        if len(self.ids) + len(new) > self.max_metrics:
            raise ResourceExhausted(f"run {self.run!r} would have {len(self.ids) + len(new)} "
                                    f"metrics (max_metrics_per_run={self.max_metrics})")
        known = ids[ids >= 0]
        mine = self._rank_ids.get(rank)
        if mine is not None and known.size:
            clash = known[np.isin(known, mine)]
            if clash.size:
                name = names[int(np.flatnonzero(ids == clash[0])[0])]
                raise InvalidArgument(f"metric {name!r} is already in another schema of rank "
                                      f"{rank}; a rank sends each metric once per step")

        first = len(self._labels)                         # commit: nothing raises below
        for k, i in enumerate(new):
            self.ids[names[i]] = first + k
            self._labels.append(labels[i])
            ids[i] = first + k
        self.ops = np.concatenate([self.ops, np.array([labels[i][5] for i in new], np.int8)])
        self._schemas[(rank, schema_id)] = Schema(ids, digest)
        self._rank_ids[rank] = ids if mine is None else np.concatenate([mine, ids])
        if not new:
            return None
        lab = [labels[i] for i in new]
        return MetricDict(
            metric_id=np.arange(first, first + len(new), dtype=np.int32),
            name=[names[i] for i in new],
            layer=np.array([x[0] for x in lab], np.int32),
            expert=np.array([x[1] for x in lab], np.int32),
            head=np.array([x[2] for x in lab], np.int32),
            stat=[x[3] for x in lab], unit=[x[4] for x in lab],
            reduce=[OP_NAMES[x[5]] for x in lab])
