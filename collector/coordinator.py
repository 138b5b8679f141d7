"""The coordinator role of a collector tier: partials in, the reduced step out.

    python -m collector coordinate --store URL --port P (--token-file F | --insecure)

Tier collectors (tier.py) hold the ranks; this process holds the run-wide view. What the
calls collectors make mean (tierwire.py moves them: unary RPCs between our own processes, so
the rank-facing proto/v1 contract stays untouched):

    Register  a collector's new metric-dictionary rows -> the run's GLOBAL metric ids (the
              first to send a name fixes its id, labels and op, like registry.py within one
              collector); the rows are stored (and flushed) before the answer, and the run is
              opened in the store on its first call
    Partial   one step of some ranks (partials.py), sent twice: once to be taken (answered
              at once), then again with `wait` (tier.py's confirmer thread), answered once
              the step is reduced and durable here (every rank of world_size covered, or
              straggler_timeout_s after its first partial) with the run's clip table; a
              collector acks its ranks' frames only after that answer, and forwards a clip
              the step caused before those acks. The second copy is what rebuilds a step
              at a restarted coordinator. A partial whose ranks are
              all covered already waits like the first copy (a resend); one that overlaps
              covered ranks is answered "overlap" with them, and the collector sends the
              rest; one for a step already reduced is answered "late" (its raw values are
              stored by the collector; the reduction stands, as for a single collector's
              late rank)
    Finish    ranks that said goodbye (or, "abandoned", a collector evicted them); once
              every rank said goodbye the pending steps are reduced and the run finishes

The reduced step then goes exactly where a single collector's goes: detect.Detect (the same
detectors, decision layer and clip policy), events, clip rows and reduced rows and the step
status to the store. Everything runs under one lock, on gRPC's handler threads and one ticker
thread (straggler timeouts, idle runs; tierwire.CoordinatorServer).

Restart: nothing is acked before it is stored, so a restarted coordinator rebuilds every
pending step from the collectors' resent partials; a run it does not hold is reloaded from
the store (its dictionary, so ids stay the same, and the last stored step, so no step is
reduced twice), its clip table (versions go on from the last stored one), and its detector
and clip-policy state (detect.py "Restarts": saved every few steps and at the end, the
stored steps after the save replayed into it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from collector.clipboard import ClipBoard
from collector.detect import Detect
from collector.errors import InvalidArgument
from collector.operator import apply_command
from collector.partials import NonFiniteRanks, Partial, combine, finish
from collector.reduction import OP_NAMES, StepRows
from collector.stats import Counters
from proto.v1 import telemetry_pb2 as pb
from store.base import MetricDict, NotFound, RunInfo, StepStatus, Store, ValueBatch

log = logging.getLogger("collector.coordinator")
OP_CODES = {name: code for code, name in OP_NAMES.items()}
PARTIAL_WAIT_S = 60.0
RESEND_GRACE_S = 5.0  # > a collector's longest retry backoff (tier.py: 2 s)  # a Partial call answers UNAVAILABLE after this (the caller retries)


@dataclass
class _Step:
    parts: list[Partial] = field(default_factory=list)
    covered: set[int] = field(default_factory=set)
    first_at: float = 0.0


@dataclass
class _Run:
    info: RunInfo
    ids: dict[str, int] = field(default_factory=dict)
    labels: list[tuple] = field(default_factory=list)  # per global id
    ops: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int8))
    pending: dict[int, _Step] = field(default_factory=dict)
    reduced_through: int = -1
    goodbye: set[int] = field(default_factory=set)
    abandoned: bool = False
    finished: bool = False
    last_seen: float = 0.0


class Coordinator:
    def __init__(
        self,
        store: Store,
        *,
        straggler_timeout_s: float = 30.0,
        run_idle_s: float = 300.0,
        detect: bool = True,
        observe_only: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.straggler_timeout_s, self.run_idle_s = straggler_timeout_s, run_idle_s
        self.clock = clock
        self.counters = Counters()
        self.clips = ClipBoard()
        self.observe_only = observe_only
        self.detect = (
            Detect(store, self._push, self.counters, observe_only=observe_only) if detect else None
        )
        self._runs: dict[str, _Run] = {}
        self._cond = threading.Condition(threading.RLock())

    # ---- runs and the dictionary (under the lock) ----------------------------------------------
    def _run(self, name: str, info: RunInfo | None = None) -> _Run:
        run = self._runs.get(name)
        if run is not None:
            return run
        metrics: pl.DataFrame | None = None
        steps: pl.DataFrame | None = None
        try:  # a run this process does not hold: what the store has of it (a restart)
            metrics, steps = self.store.metrics(name), self.store.steps(name)
            stored = self.store.runs().filter(run=name)
        except NotFound:
            if info is None:
                raise
        if info is None:
            row = stored.row(0, named=True)  # store.steps found the run
            info = RunInfo(name, int(row["world_size"]), row.get("config_json") or "{}")
        run = self._runs[name] = _Run(info=info, last_seen=self.clock())
        if info is not None and metrics is None:
            self.store.open_run(info)
            self.store.flush()  # a collector sharing the store finds the run (tier.py)
        if metrics is not None and metrics.height:
            for r in metrics.iter_rows(named=True):
                self._add_name(run, r["name"], self._labels_of(r))
            if self.detect is not None:  # the detectors' index, and their saved state
                self.detect.on_metrics(name, _metric_dict(metrics))
        if steps is not None and steps.height:
            run.reduced_through = int(steps["step"].to_numpy().max())
        if metrics is not None:
            self._reload_clips(name)
        log.info(
            "run %s: %d metrics, reduced through step %d", name, len(run.ids), run.reduced_through
        )
        return run

    def _reload_clips(self, name: str) -> None:
        """The run's clip table as stored, so versions go on from the last one (collectors
        ignore a version that is not newer than the one they hold)."""
        self.clips.adopt_stored(name, self.store.clips(name))

    @staticmethod
    def _labels_of(r: dict) -> tuple:
        return (
            int(r["layer"]),
            int(r["expert"]),
            int(r["head"]),
            r["stat"],
            r["unit"],
            r["reduce"],
        )

    def _add_name(self, run: _Run, name: str, labels: tuple) -> int:
        gid = run.ids[name] = len(run.labels)
        run.labels.append(labels)
        run.ops = np.append(run.ops, np.int8(OP_CODES[labels[5]]))
        return gid

    def register(self, run_name: str, info: RunInfo, md: MetricDict) -> np.ndarray:
        """Global ids of md's rows (new names get the next ids); new rows stored and flushed."""
        with self._cond:
            run = self._run(run_name, info)
            run.last_seen = self.clock()
            out = np.empty(len(md.name), np.int32)
            new: list[int] = []
            for i, name in enumerate(md.name):
                labels = (
                    int(md.layer[i]),
                    int(md.expert[i]),
                    int(md.head[i]),
                    md.stat[i],
                    md.unit[i],
                    md.reduce[i],
                )
                gid = run.ids.get(name)
                if gid is None:
                    gid = self._add_name(run, name, labels)
                    new.append(i)
                elif run.labels[gid] != labels:
                    raise ValueError(f"metric {name!r} registered with other labels {labels}")
                out[i] = gid
            if new:
                sel = np.array(new)
                rows = MetricDict(
                    metric_id=out[sel],
                    name=[md.name[i] for i in new],
                    layer=md.layer[sel],
                    expert=md.expert[sel],
                    head=md.head[sel],
                    stat=[md.stat[i] for i in new],
                    unit=[md.unit[i] for i in new],
                    reduce=[md.reduce[i] for i in new],
                )
                self.store.write_metrics(run_name, rows, fresh=True)  # new to the run
                self.store.flush()
                if self.detect is not None:
                    self.detect.on_metrics(run_name, rows)
            return out

    # ---- partials --------------------------------------------------------------------------
    def partial(self, p: Partial) -> tuple[str, list[int]]:
        """Take a partial; returns ("ok" | "late" | "overlap", covered ranks): with p.wait,
        "ok" once its step is reduced and durable (TimeoutError: not in PARTIAL_WAIT_S), else
        once it is taken (held in memory only: the caller acks nothing before a wait)."""
        with self._cond:
            run = self._run(p.run)
            run.last_seen = self.clock()
            if p.step <= run.reduced_through and p.step not in run.pending:
                return "late", []
            st = run.pending.get(p.step)
            if st is None:
                st = run.pending[p.step] = _Step(first_at=self.clock())
            if p.ranks <= st.covered:
                self.counters.add("frames_duplicate")
            elif p.ranks & st.covered:
                return "overlap", sorted(st.covered)
            else:
                bad = [r for r in p.ranks if not 0 <= r < run.info.world_size]
                if bad:
                    raise ValueError(f"ranks {bad} outside world_size {run.info.world_size}")
                if p.ids.size and not 0 <= int(p.ids.min()) <= int(p.ids.max()) < run.ops.size:
                    raise ValueError(
                        f"partial names metric ids outside [0, {run.ops.size}) of the run"
                    )
                st.parts.append(p)
                st.covered |= p.ranks
                if len(st.covered) == run.info.world_size:
                    self._advance(p.run, run)
            if not p.wait:
                return "ok", []
            deadline = time.monotonic() + PARTIAL_WAIT_S
            while p.step in run.pending or p.step > run.reduced_through:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"step {p.step} of run {p.run} not reduced yet")
                self._cond.wait(min(left, 1.0))
            return "ok", []

    def _advance(self, name: str, run: _Run) -> None:
        """Reduce pending steps in order, oldest first, while the oldest is complete, or past
        its straggler timeout, or a later step is complete and the oldest has waited
        RESEND_GRACE_S (its ranks gave up on it, as a single collector's barrier assumes -
        but not at once: after a restart here a collector's copy of an older step may still
        be on its way, one retry backoff behind the newer steps)."""
        now = self.clock()
        while run.pending:
            s = min(run.pending)
            st = run.pending[s]
            world = run.info.world_size
            waited = now - st.first_at
            later = any(len(x.covered) == world for k, x in run.pending.items() if k > s)
            if not (
                len(st.covered) == world
                or waited >= self.straggler_timeout_s
                or (later and waited >= RESEND_GRACE_S)
            ):
                break
            log.debug(
                "run %s step %d: %d of %d ranks after %.3f s",
                name,
                s,
                len(st.covered),
                world,
                waited,
            )
            self._reduce_through(name, run, s)

    def _reduce_through(self, name: str, run: _Run, step: int) -> None:
        """Reduce every pending step <= step, oldest first (a later complete step means the
        ranks gave up on the earlier ones), store them, wake their callers."""
        for s in sorted(k for k in run.pending if k <= step):
            self._reduce(name, run, s, run.pending[s])
            del run.pending[s]
            run.reduced_through = max(run.reduced_through, s)
        self._cond.notify_all()

    def _reduce(self, name: str, run: _Run, step: int, st: _Step) -> None:
        world = run.info.world_size
        ranks = set(st.covered)
        evidence = NonFiniteRanks()
        if st.parts:
            c = combine(st.parts)
            ids, vals, n = finish(c, run.ops)
            wall = c.wall_time
            evidence = NonFiniteRanks(c.nonfinite)
            if c.nonfinite_more:
                self.counters.add("nonfinite_pairs_unlisted", c.nonfinite_more)
        else:
            ids, vals, n, wall = (
                np.empty(0, np.int32),
                np.empty(0, np.float32),
                np.empty(0, np.int32),
                0.0,
            )
        missing = tuple(sorted(set(range(world)) - ranks))
        status = StepStatus(
            step=step,
            n_ranks=len(ranks),
            missing_ranks=missing,
            complete=not missing,
            wall_time=wall,
        )
        empty = np.empty(0, np.int32)
        rows = StepRows(
            blocks=[],
            rest=ValueBatch(np.empty(0, np.int64), empty, np.empty(0, np.float32), rank=empty),
            reduced=ValueBatch(np.full(ids.size, step, np.int64), ids, vals, n_ranks=n),
            status=status,
        )
        if self.detect is not None:
            try:
                self.detect.on_step(name, rows, ranks, st.first_at, evidence)
            except Exception:  # detection never fails a step
                self.counters.add("observer_errors")
                log.exception("run %s step %d: detection failed", name, step)
        if ids.size:
            self.store.write_reduced(name, rows.reduced)
        self.store.write_steps(name, [status])
        self.store.flush()
        self.counters.add("steps_reduced")
        if missing:
            self.counters.add("steps_incomplete")
            self.counters.add("stragglers", len(missing))

    # ---- clips (detect.PushFn; under the lock: the reduction's thread holds it) --------------
    def _push(self, run: str, settings: list, reason: str, step: int, origin) -> int:
        update = self.clips.push(run, settings, reason, step)
        self.counters.add("clip_updates")
        self.store.write_clips(run, self.clips.records(run, update.version))
        return update.version

    def push_clip(self, run: str, settings, reason: str = "operator") -> int:
        """An operator's clip update: collectors forward it with their next step's answer."""
        with self._cond:
            version = self._push(run, list(settings), reason, max(0, self._step_of(run)), None)
            self.store.flush()
            return version

    def operate(self, run: str, config_json: str) -> pb.ClipUpdate:
        """An operator's clip command (operator.py's form), forwarded by a tier collector:
        applied as a single collector applies it, stored before the answer; the new table
        reaches the ranks with each collector's next step's answer."""
        with self._cond:
            answer = apply_command(
                run,
                config_json,
                self._push,
                max(0, self._step_of(run)),
                self.clips,
                self.detect,
                self.observe_only,
            )
            self.store.flush()
            self.counters.add("operator_commands")
            return answer

    def _step_of(self, run: str) -> int:
        r = self._runs.get(run)
        return r.reduced_through if r else 0

    def clip_acks(self, run: str, acks: list[tuple[int, int, int]]) -> None:
        """(rank, version, step) acks a collector forwards; the version's rows are stored
        again with the step it took effect."""
        with self._cond:
            for rank, version, step in acks:
                try:
                    self.clips.record_ack(run, rank, version, step)
                except InvalidArgument as exc:  # a version of before a restart here
                    log.warning("clip ack not recorded: %s", exc)
            for version in sorted({v for _, v, _ in acks}):
                self.store.write_clips(run, self.clips.records(run, version))
            self.store.flush()

    # ---- goodbyes and idle runs ------------------------------------------------------------
    def finish_ranks(self, name: str, ranks: list[int], status: str) -> None:
        with self._cond:
            run = self._run(name)
            run.last_seen = self.clock()
            if status == "abandoned":
                run.abandoned = True
            else:
                run.goodbye |= set(ranks)
            if len(run.goodbye) >= run.info.world_size and not run.finished:
                self._end(name, run, "finished")

    def _end(self, name: str, run: _Run, status: str) -> None:
        if run.pending:
            self._reduce_through(name, run, max(run.pending))
        self.store.finish_run(name, status)
        self.store.flush()
        if self.detect is not None:  # its state saved as of its last step, by the next tick
            self.detect.on_finish(name)
        run.finished = True
        log.info("run %s %s", name, status)

    def tick(self) -> None:
        """Straggler timeouts and idle runs (the ticker thread, every 50 ms)."""
        now = self.clock()
        with self._cond:
            for name, run in list(self._runs.items()):
                if run.pending:
                    self._advance(name, run)
                if now - run.last_seen >= self.run_idle_s:
                    if not run.finished:
                        self._end(name, run, "abandoned")
                    del self._runs[name]
            # finished runs' detector state, after their finish is durable: the goodbye that
            # finished a run is answered without waiting for this save
            if self.detect is not None and self.detect.on_durable():
                self.store.flush()

    def clip_table(self, run: str) -> pb.ClipUpdate | None:
        return self.clips.latest(run)

    def flush(self) -> None:
        """Everything written so far made durable (the server's stop), the detector state
        of runs that finished since the last tick included."""
        with self._cond:
            if self.detect is not None:
                self.detect.on_durable()
            self.store.flush()


def _metric_dict(df: pl.DataFrame) -> MetricDict:
    """A stored dictionary (store.metrics) as the rows the detectors' index takes."""
    return MetricDict(
        metric_id=df["metric_id"].to_numpy(),
        name=df["name"],
        layer=df["layer"].to_numpy(),
        expert=df["expert"].to_numpy(),
        head=df["head"].to_numpy(),
        stat=df["stat"],
        unit=df["unit"],
        reduce=df["reduce"],
    )
