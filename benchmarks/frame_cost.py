"""The event loop's work per data frame, in process: R ranks' chunks parsed and applied to Ingest.

    python -m benchmarks.frame_cost [--ranks 4096] [--metrics 1460] [--steps 12] [--stagger 8]

No gRPC and no store: the collector's `Ingest` (frame checks, registry lookups, the barrier's
copy, acks) on a writer that only records jobs, as one rank-step per StepChunk that also ends
its step (what the hooks send). Ranks run `--stagger` steps apart (rank r is r % stagger steps
behind), so the barrier holds that many steps, as at 4,096 streams with 32 steps in flight.
Baseline in the same run: the same frames only parsed (`ClientFrame.FromString`), the floor of
any Python collector. Last line: `frame_us=<per frame> parse_us=<per frame> ratio=<x>`.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from collector.barrier import ByteBudget
from collector.clipboard import ClipBoard
from collector.config import CollectorConfig
from collector.conn import Conn
from collector.ingest import Ingest
from collector.stats import Counters
from proto.v1 import telemetry_pb2 as pb

RUN = "frame-cost"


class _Jobs:
    """The writer's side Ingest uses; the jobs are dropped (their vectors freed) as they come."""

    saturated = False

    def __init__(self) -> None:
        self.n = 0

    def submit(self, job) -> int:
        self.n += 1
        return self.n

    def flush_soon(self) -> None:
        pass


def _header(rank: int, step: int, seq: int) -> pb.FrameHeader:
    return pb.FrameHeader(run=RUN, rank=rank, step=step, seq=seq)


def build(ranks: int, metrics: int) -> tuple[Ingest, list[Conn]]:
    cfg = CollectorConfig(max_pending_bytes=16 << 30)
    ingest = Ingest(cfg, _Jobs(), ByteBudget(cfg.max_pending_bytes), ClipBoard(), Counters())
    defs = [
        pb.MetricDef(
            name=f"moe/layer{i // 100:02d}/expert{i % 100:03d}/x",
            reduce=pb.REDUCE_MEAN,
            stat="x",
            layer=i // 100,
            expert=i % 100,
            head=-1,
        )
        for i in range(metrics)
    ]
    conns = []
    for r in range(ranks):
        conn = Conn(f"peer{r}")
        hello = pb.Hello(header=_header(r, -1, 0), world_size=ranks, protocol_version=1)
        ingest.receive(conn, pb.ClientFrame(hello=hello))
        schema = pb.Schema(header=_header(r, -1, 1), schema_id=1, metrics=defs)
        ingest.receive(conn, pb.ClientFrame(schema=schema))
        conn.take()
        conns.append(conn)
    return ingest, conns


def frames(ranks: int, metrics: int, steps: int, stagger: int) -> list[tuple[int, bytes]]:
    """(rank, serialized frame) in arrival order: rank r runs r % stagger steps behind."""
    values = np.random.default_rng(0).standard_normal(metrics).astype("<f4").tobytes()
    out = []
    for t in range(steps + stagger):
        for r in range(ranks):
            s = t - r % stagger
            if 0 <= s < steps:
                chunk = pb.StepChunk(
                    header=_header(r, s, 2 + s),
                    schema_id=1,
                    offset=0,
                    total=metrics,
                    values=values,
                    ends_step=True,
                    step_values=metrics,
                    wall_time=1.0,
                )
                out.append((r, pb.ClientFrame(chunk=chunk).SerializeToString()))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=4096)
    ap.add_argument("--metrics", type=int, default=1460)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--stagger", type=int, default=8)
    a = ap.parse_args(argv)
    ingest, conns = build(a.ranks, a.metrics)
    wire = frames(a.ranks, a.metrics, a.steps, a.stagger)
    t0 = time.perf_counter()
    for r, data in wire:
        pb.ClientFrame.FromString(data)
        conns[r].take()
    parse = (time.perf_counter() - t0) / len(wire)
    t0 = time.perf_counter()
    for r, data in wire:
        ingest.receive(conns[r], pb.ClientFrame.FromString(data))
        conns[r].take()
    frame = (time.perf_counter() - t0) / len(wire)
    counts = ingest.counters.snapshot()
    reduced, incomplete = counts["steps_reduced"], counts["steps_incomplete"]
    if reduced != a.steps or incomplete:
        raise SystemExit(
            f"{reduced} steps left the barrier ({incomplete} incomplete), expected {a.steps}"
        )
    print(
        f"{a.ranks} ranks x {a.metrics} metrics, {a.steps} steps, {a.stagger} apart: "
        f"{len(wire)} frames, {reduced} steps reduced"
    )
    print(f"frame_us={frame * 1e6:.1f} parse_us={parse * 1e6:.1f} ratio={frame / parse:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
