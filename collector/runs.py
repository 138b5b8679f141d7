"""The runs one collector holds, from a run's first Hello until it is evicted. Event loop only.

    join      a Hello: the run (created in memory, world size fixed while it lives), the
              identity rule (trust.py: one client per (run, rank)), the Welcome's acked_seq
    open      a run's first data frame: OpenRun, so only now does the run exist in the store
              (a Hello alone leaves nothing behind)
    finish    every rank said goodbye: pending steps reduced, FinishRun
    detach    a stream ended; a run that never sent data is forgotten with its last stream
    evict     a run with no open stream for run_idle_s (checked once a second), or the one
              idle longest when a new run would pass max_runs: abandoned first if it had not
              finished (pending steps reduced as incomplete, status "abandoned"), then dropped
              from memory with its dictionary's bytes. Its data stays readable; a rank that
              comes back later starts it afresh and resumes its seqs (trust.py).

So runs whose trainers were killed, OOM'd or preempted (no goodbye) never pile up: max_runs
counts, in effect, runs with open streams.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from collector.acks import RankAcks
from collector.barrier import ByteBudget, StepBarrier
from collector.config import CollectorConfig
from collector.conn import Conn
from collector.errors import Aborted, AlreadyExists, InvalidArgument, ResourceExhausted
from collector.jobs import FinishRun, Forget, OpenRun
from collector.registry import RunMetrics, check_hello
from collector.run import Run
from collector.stats import Counters
from collector.steps import Steps
from collector.writer import Writer
from proto.v1 import telemetry_pb2 as pb
from store.base import RunInfo

log = logging.getLogger("collector.ingest")


class Runs:
    def __init__(
        self,
        config: CollectorConfig,
        writer: Writer,
        steps: Steps,
        budget: ByteBudget,
        dict_budget: ByteBudget,
        counters: Counters,
        clock: Callable[[], float],
    ) -> None:
        self.config, self.writer, self.steps = config, writer, steps
        self.budget, self.dict_budget = budget, dict_budget
        self.counters, self.clock = counters, clock
        self.runs: dict[str, Run] = {}

    # ---- Hello ------------------------------------------------------------------------------
    def join(self, conn: Conn, hello: pb.Hello) -> int:
        """Attach the stream to its run; returns the Welcome's acked_seq."""
        name, rank, world = check_hello(hello, self.config.max_world_size)
        session = hello.session
        run = self.runs.get(name)
        try:
            if run is None:
                run = self._new_run(name, world, hello.config_json)
            elif run.world_size != world:
                raise InvalidArgument(
                    f"run {name!r} is live with world_size {run.world_size}; a "
                    f"Hello with world_size {world} cannot join it"
                )
            self._claim_identity(run, rank, session)
        except (AlreadyExists, ResourceExhausted):
            self.counters.add("hellos_refused")
            raise
        if run.finished:  # a rank came back: live again (OpenRun with its first data)
            run.finished, run.finish_job, run.opened = False, None, False
        run.barrier.join(rank)  # a tier collector waits for its ranks (tier.py)
        conn.run, conn.rank, conn.session = name, rank, session
        run.conns.setdefault(rank, set()).add(conn)
        run.idle_since = None
        run.said_goodbye.discard(rank)
        acks = run.acks.setdefault(rank, RankAcks())
        known = run.sessions.get(rank)
        run.sessions[rank] = session
        # A new client of this rank numbers its frames above every seq the rank has used, so
        # they can never be taken for resends of the previous client's (trust.py).
        fresh = bool(session) and known is not None and known != session
        return acks.max_seq if fresh else acks.acked

    def _claim_identity(self, run: Run, rank: int, session: str) -> None:
        """trust.py's identity rule: the same session takes over its own open streams;
        another client of an identity that is streaming is refused."""
        live = [c for c in run.conns.get(rank, ()) if c.error is None and not c.done]
        if not live:
            return
        if session and all(c.session == session for c in live):
            for c in live:
                c.fail(Aborted("superseded by a newer stream of the same client"))
                run.conns[rank].discard(c)
                self.counters.add("streams_superseded")
            return
        other = live[0]
        raise AlreadyExists(
            f"rank {rank} of run {run.name!r} is already streaming (from {other.peer}, for "
            f"{self.clock() - other.opened_at:.0f} s, client session "
            f"{other.session[:8] or 'unnamed'}): a second job cannot join a run with an "
            "identity that is in use. Give it another run name, or stop the first job (a "
            "restarted job may rejoin once the first one's streams have ended)"
        )

    def _new_run(self, name: str, world: int, config_json: str) -> Run:
        if len(self.runs) >= self.config.max_runs:
            idle = [r for r in self.runs.values() if not r.conns]
            if not idle:
                raise ResourceExhausted(
                    f"the collector already tracks {len(self.runs)} runs with open streams "
                    f"(max_runs={self.config.max_runs})"
                )
            self.evict(min(idle, key=lambda r: r.idle_since or 0.0), "max_runs reached")
        cfg = self.config
        info = RunInfo(run=name, world_size=world, config_json=config_json, started_at=time.time())
        run = self.runs[name] = Run(
            name=name,
            world_size=world,
            info=info,
            metrics=RunMetrics(
                name,
                max_metrics=cfg.max_metrics_per_run,
                max_schemas_per_rank=cfg.max_schemas_per_rank,
                budget=self.dict_budget,
            ),
            barrier=StepBarrier(
                world,
                straggler_timeout_s=cfg.straggler_timeout_s,
                max_pending_steps=cfg.max_pending_steps,
                budget=self.budget,
            ),
        )
        if cfg.coordinator:
            run.barrier.tier()
        return run

    # ---- data, goodbye, streams ending ----------------------------------------------------
    def open(self, run: Run) -> None:
        """The run's first data frame (since it was created or came back): OpenRun."""
        if not run.opened:
            run.opened = True
            self.writer.submit(OpenRun(run.info))

    def finish(self, run: Run) -> None:
        """Every rank said goodbye (or the collector stops): reduce what is pending, FinishRun."""
        if run.finished:
            return
        self.steps.drain(run)
        if run.opened:
            run.finish_job = self.writer.submit(FinishRun(run.name))
        run.finished = True

    def detach(self, conn: Conn, *, forget_empty: bool = True) -> None:
        run = self.runs.get(conn.run) if conn.run else None
        if run is None:
            return
        conns = run.conns.get(conn.rank)
        if conns is not None:
            conns.discard(conn)
            if not conns:
                del run.conns[conn.rank]
        if not run.conns:
            run.idle_since = self.clock()
            if not run.opened and forget_empty:  # a Hello and nothing else: forget it
                self.evict(run, "it sent no data")

    # ---- eviction -----------------------------------------------------------------------------
    def evict_idle(self, now: float) -> None:
        """Evict every run none of whose ranks has had a stream for run_idle_s."""
        for run in list(self.runs.values()):
            if not run.conns and run.idle_since is not None:
                if now - run.idle_since >= self.config.run_idle_s:
                    self.evict(run, f"no stream for {self.config.run_idle_s:.0f} s")

    def evict(self, run: Run, why: str) -> None:
        """Forget a run with no open stream; unfinished, it is abandoned first."""
        if run.opened and not run.finished:
            self.steps.drain(run)
            self.writer.submit(FinishRun(run.name, "abandoned"))
            self.counters.add("runs_abandoned")
            log.warning("run %s abandoned (%s): evicted, its data stays readable", run.name, why)
        elif run.opened:
            log.info("run %s evicted (%s)", run.name, why)
        self.writer.submit(Forget(run.name))
        run.metrics.release()
        del self.runs[run.name]
        self.counters.add("runs_evicted")
