"""Holes: steps a rank's client dropped (its buffer was full while the collector was away) and
reported in a StepsDropped frame, stored as events so the store and the dashboard show them.

One event per reported range: kind HOLE_KIND, site "telemetry/rank<R>", step = the range's
last step, onset_step = its first, value = its number of steps, severity warning, detail JSON
{"rank", "first", "last", "steps", "client_total", "reason"}. The store keys events by
(step, kind, site), so a resent report rewrites the same rows. The frame is durable (acked)
once its write job is durable (flushed, or in the spool while the store is away), like any
data frame. Event-loop thread only (ingest.py hands
the frame over after its header and seq checks).
"""

from __future__ import annotations

import json

from collector.acks import RankAcks
from collector.errors import InvalidArgument
from collector.jobs import WriteEvents
from collector.stats import Counters
from collector.writer import Writer
from proto.v1 import telemetry_pb2 as pb
from store.base import HOLE_EVENT_KIND, EventRecord

HOLE_KIND = HOLE_EVENT_KIND
MAX_RANGES = 4096  # per frame; the client's DropLog keeps at most this many


def hole_site(rank: int) -> str:
    return f"telemetry/rank{rank}"


def hole_records(rank: int, msg: pb.StepsDropped) -> list[EventRecord]:
    """The events of a report; InvalidArgument if its ranges are not ascending and disjoint."""
    if not 1 <= len(msg.ranges) <= MAX_RANGES:
        raise InvalidArgument(f"StepsDropped must carry 1..{MAX_RANGES} ranges")
    out, prev = [], -1
    for r in msg.ranges:
        if not prev < r.first <= r.last:
            raise InvalidArgument(
                f"StepsDropped ranges must be ascending and disjoint with 0 <= first <= last, "
                f"got [{r.first}, {r.last}] after step {prev}"
            )
        prev = r.last
        steps = r.last - r.first + 1
        detail = {
            "rank": rank,
            "first": r.first,
            "last": r.last,
            "steps": steps,
            "client_total": msg.total,
            "reason": msg.reason[:200],
        }
        out.append(
            EventRecord(
                step=r.last,
                kind=HOLE_KIND,
                site=hole_site(rank),
                value=float(steps),
                threshold=0.0,
                severity="warning",
                onset_step=r.first,
                detail=json.dumps(detail),
            )
        )
    return out


def steps_dropped(
    run: str, rank: int, msg: pb.StepsDropped, acks: RankAcks, writer: Writer, counters: Counters
) -> None:
    """Store a hole report; its seq waits for the write."""
    records = hole_records(rank, msg)  # checked before anything changes
    acks.in_job(msg.header.seq, writer.submit(WriteEvents(run, records)))  # spooled like any event
    counters.add("holes_reported", sum(int(e.value) for e in records))
