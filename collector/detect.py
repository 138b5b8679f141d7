"""Online detection: analytics' detectors on every reduced step, and the clip control loop.

    writer thread:  WriteMetrics -> on_metrics   (the run's MetricIndex grows)
                    WriteStep    -> on_step      (frame -> DetectorSet -> events, each with
                                                  its decision and incident (decision layer)
                                                  -> store.write_events
                                                  -> ClipPolicy (acts on `clamp` decisions)
                                                  -> push(...) unless observe-only)

The frame is built from the step's reduced rows exactly as analytics/offline.py builds it from
the store, so online and offline events are the same. Events go to the store on the writer
thread (the only thread that touches the store) and are flushed with the step's values.
The policy hears, for each clamped site, the max|h| and parameter norm of the experts that
triggered it (analytics.clip_policy.site_readings), so it relaxes a clamp that no longer binds
and keeps one over a still-growing expert. Clip decisions go to `push`
(control.ClipControl.push: versioned, every rank's stream,
stored with their reason), stamped with the monotonic time the step left the barrier so the
collector can measure frame-arrival -> update-on-the-wire latency.

Operators act on the same per-run ClipPolicy (freeze, set, clear) from the event loop; one
lock orders them with the writer thread. Nothing here raises into the writer: the writer
logs an observer error and goes on.

Each step is fed once: a step at or below the last one fed (a resend re-reduced after a
restart, a coordinator retrying a step while its store is away) is skipped, counted in
`steps_detected_again`.

Restarts. The run's detectors, decision layer and clip policy are saved to the store
(`store.write_detector_state`: analytics.state's blob of {"step", "detectors", "policy"},
one per run, the last write wins) every `state_every` steps, in order with the step's rows
(the single collector: a jobs.WriteDetectorState after the step's job, in the store or the
spool alike; the coordinator: buffered with the step and flushed with it), and when the run
finishes, once its finish is durable (`on_durable`: the clients' close does not wait for it). A process that meets a run it does not hold (its first dictionary rows or step)
loads that state (`load_state`) and goes on from it. Steps the store holds after the saved
one (a collector killed between two saves: reduced, stored, acked, never resent) are then
replayed from the store into the detectors and the policy at the first step fed, with their
events and clip decisions left as the previous process made them (stored, pushed), so
detection continues as if there had been no restart. Steps the store never got are a hole
to the detectors, as for any step nobody sent. No state, or state that cannot be read
(damaged, another format, other detectors): one log line, and the run's detection starts
afresh; never an error into the writer.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np

from analytics import state as state_codec
from analytics.catalog import MetricIndex
from analytics.clip_policy import ClipDecision, ClipPolicy, site_readings
from analytics.detectors import DetectorSet
from analytics.events import Event, to_records
from analytics.frame import StepFrame
from analytics.offline import iter_frames
from collector.reduction import StepRows
from collector.stats import Counters
from store.base import MetricDict, NotFound, RawBlock, Store, ValueBatch

log = logging.getLogger("collector.detect")
KEEP_EVENTS = 10_000  # online events remembered per run (for tests and introspection)
STATE_EVERY = 50  # steps between two saves of a run's detector state
STATE_KIND = "detect"  # the store's detector_state kind of this state
CATCH_UP_MAX = 10 * STATE_EVERY  # stored steps replayed after a restored state, at most

# push(run, settings, reason, step, origin_monotonic) -> version
PushFn = Callable[[str, list, str, int, float | None], int]
# load_state(run) -> (step, blob) | None: store.detector_state
LoadFn = Callable[[str], "tuple[int, bytes] | None"]


@dataclass
class RunDetect:
    index: MetricIndex = field(default_factory=MetricIndex)
    detectors: DetectorSet = field(default_factory=DetectorSet)
    policy: ClipPolicy = field(default_factory=ClipPolicy)
    events: list[Event] = field(default_factory=list)
    last_step: int = -1  # the last step fed: a step is fed once
    saved_step: int = -1  # the step of the last saved state
    loaded: bool = False  # the store's saved state was looked for (writer thread)
    catch_up: bool = False  # restored: replay the stored steps after it at the next step
    save_due: bool = False  # finished: save at the next on_durable
    early_ops: list[tuple[str, list]] = field(default_factory=list)  # operator commands
    # applied before the saved state was looked for: applied again on top of it


class Detect:
    def __init__(
        self,
        store: Store,
        push: PushFn,
        counters: Counters,
        *,
        observe_only: bool = False,
        make_detectors: Callable[[], DetectorSet] = DetectorSet,
        make_policy: Callable[[], ClipPolicy] = ClipPolicy,
        load_state: LoadFn | None = None,
        read_store: Callable[[], Store] | None = None,
        state_every: int = STATE_EVERY,
    ) -> None:
        """store: where events and saved state go (write_events, write_detector_state);
        load_state: where a run's saved state comes from (default: store.detector_state);
        read_store: the store to replay steps from after a restore (default: store)."""
        self.store = store
        self.push = push
        self.counters = counters
        self.observe_only = observe_only
        self._make_detectors, self._make_policy = make_detectors, make_policy
        self._load = load_state or getattr(store, "detector_state", None)
        self._read_store = read_store or (lambda: store)
        if state_every < 1:
            raise ValueError(f"state_every must be >= 1, got {state_every}")
        self.state_every = state_every
        self._runs: dict[str, RunDetect] = {}
        self._lock = threading.Lock()

    def _run(self, run: str) -> RunDetect:
        rd = self._runs.get(run)
        if rd is None:
            rd = self._runs[run] = RunDetect(
                detectors=self._make_detectors(), policy=self._make_policy()
            )
        return rd

    def _held(self, run: str) -> RunDetect:
        """The run (writer thread): on first sight, its saved state is looked for."""
        with self._lock:
            rd = self._run(run)
            if rd.loaded:
                return rd
            rd.loaded = True
        self._restore(run, rd)
        return rd

    # ---- writer thread ------------------------------------------------------------------
    def on_metrics(self, run: str, md: MetricDict) -> None:
        rd = self._held(run)
        with self._lock:
            rd.index.extend(md.metric_id, md.name, md.layer, md.expert, md.head, md.stat)

    def on_step(
        self,
        run: str,
        rows: StepRows,
        included: set[int],
        ready_at: float,
        rank_evidence: Mapping[int, np.ndarray] | None = None,
    ) -> None:
        """One reduced step into the run's detectors. The per-rank values they ask for come
        from the step's raw rows, or `rank_evidence` where there are none (a coordinator:
        partials.NonFiniteRanks)."""
        rd = self._held(run)
        step = rows.status.step
        if step <= rd.last_step:  # a step is fed once
            self.counters.add("steps_detected_again")
            log.debug("run %s step %d: fed to the detectors before, skipped", run, step)
            return
        if rd.catch_up:
            rd.catch_up = False
            self._catch_up(run, rd, step)
        rd.last_step = step
        ranks = tuple(sorted(included))
        size = rd.index.size

        def rank_vectors() -> Mapping[int, np.ndarray]:  # only when a detector asks
            if rank_evidence is not None:
                return rank_evidence
            return RankVectors(rows.blocks, rows.rest, size, ranks)

        frame = StepFrame.from_rows(
            run, step, rows.reduced.metric_id, rows.reduced.value, size, ranks, rank_vectors
        )
        events, decisions = self._feed(run, rd, frame)
        self._act(run, step, events, decisions, ready_at)
        if step - rd.saved_step >= self.state_every:
            self._save(run, rd)

    def on_finish(self, run: str) -> None:
        """The run finished (or the collector stops): its state is saved as of its last step
        at the next `on_durable`, once the finish itself is durable, so a client's close
        (which waits for that) never waits for the save: at a million metrics the state is
        tens of MiB. A process lost in between restores the last periodic save and replays
        the stored steps after it (at most `state_every` of them)."""
        with self._lock:
            rd = self._runs.get(run)
            if rd is not None:
                rd.save_due = True

    def on_durable(self) -> int:
        """Everything handed to the store so far is durable (the writer's flush, the
        coordinator's tick after a finish): the saves `on_finish` put off are made now.
        Returns how many were written (to be flushed)."""
        with self._lock:
            due = [(run, rd) for run, rd in self._runs.items() if rd.save_due]
        saved = 0
        for run, rd in due:
            rd.save_due = False
            if rd.last_step > rd.saved_step:
                saved += self._save(run, rd)
        return saved

    # ---- saved state (writer thread) ------------------------------------------------------
    def _save(self, run: str, rd: RunDetect) -> bool:
        with self._lock:
            step = rd.last_step
            state = {
                "step": step,
                "detectors": rd.detectors.state_dict(),
                "policy": rd.policy.state_dict(),
            }
        try:
            blob = state_codec.encode(state)
            self.store.write_detector_state(run, step, blob, STATE_KIND)
        except Exception:  # detection goes on; the previous save stays the one restored
            self.counters.add("detector_state_errors")
            log.exception("run %s: detector state of step %d not saved", run, step)
            return False
        rd.saved_step = step
        self.counters.add("detector_states_saved")
        log.debug("run %s: detector state of step %d saved (%d bytes)", run, step, len(blob))
        return True

    def _restore(self, run: str, rd: RunDetect) -> None:
        """The run's saved state, if there is one that fits; else a fresh start, said once."""
        if self._load is None:
            return
        try:
            saved = self._load(run)
        except NotFound:  # a run the store has not seen: nothing to restore
            return
        except Exception as exc:  # noqa: BLE001 - a store away or broken: a fresh start, said
            self.counters.add("detector_state_errors")
            log.error(
                "run %s: saved detector state could not be read (%s: %s); its detection "
                "starts afresh",
                run,
                type(exc).__name__,
                exc,
            )
            return
        if saved is None:
            return
        step, blob = saved
        try:
            state = state_codec.decode(blob)
            if int(state["step"]) != step:
                raise ValueError(f"blob of step {state['step']} stored as step {step}")
            detectors, policy = self._make_detectors(), self._make_policy()
            detectors.load_state_dict(state["detectors"])
            policy.load_state_dict(state["policy"])
        except Exception as exc:  # noqa: BLE001 - any unusable blob: a fresh start, said
            self.counters.add("detector_state_refused")
            log.error(
                "run %s: saved detector state of step %d is unusable (%s: %s); its detection "
                "starts afresh",
                run,
                step,
                type(exc).__name__,
                exc,
            )
            return
        with self._lock:
            rd.detectors, rd.policy = detectors, policy
            rd.last_step = rd.saved_step = step
            rd.catch_up = True
            for op, items in rd.early_ops:  # an operator's command of before wins
                self._apply_op(policy, op, items)
            rd.early_ops.clear()
        self.counters.add("detector_states_restored")
        log.info("run %s: detector state restored as of step %d", run, step)

    def _catch_up(self, run: str, rd: RunDetect, upto: int) -> None:
        """Replay the stored steps between the restored state and `upto` (exclusive) into
        the detectors and the policy; their events and decisions were made before."""
        start = rd.last_step + 1
        if upto <= start:
            return
        try:
            store = self._read_store()
            stored = store.steps(run)["step"]
            n = int(((stored >= start) & (stored < upto)).sum())
            if n > CATCH_UP_MAX:
                raise ValueError(f"{n} steps, more than {CATCH_UP_MAX}")
            fed = 0  # frames as offline analysis builds them: per-rank values on demand too
            for frame in iter_frames(store, run, rd.index, start, upto):
                rd.last_step = frame.step
                self._feed(run, rd, frame)
                fed += 1
        except Exception as exc:  # noqa: BLE001 - the replay is best effort, its end said
            self.counters.add("detector_state_errors")
            log.error(
                "run %s: stored steps %d-%d not replayed into the restored detectors (%s: %s);"
                " they are a hole to them",
                run,
                start,
                upto - 1,
                type(exc).__name__,
                exc,
            )
            return
        if fed:
            self.counters.add("steps_replayed", fed)
            log.info(
                "run %s: %d stored steps after the restored state replayed (%d-%d)",
                run,
                fed,
                start,
                rd.last_step,
            )

    def _feed(
        self, run: str, rd: RunDetect, frame: StepFrame
    ) -> tuple[list[Event], list[ClipDecision]]:
        """One step into the detectors (and decision layer) and the clip policy."""
        events = rd.detectors.observe(frame, rd.index)
        with self._lock:
            watched = rd.policy.watched()
        held, norms = site_readings(frame, rd.index, watched)
        with self._lock:
            return events, rd.policy.step(frame.step, events, held, norms)

    def _act(
        self,
        run: str,
        step: int,
        events: list[Event],
        decisions: list[ClipDecision],
        ready_at: float,
    ) -> None:
        """A fed step's events logged and stored, its clip decisions pushed."""
        if events:
            self.counters.add("events", len(events))
            for ev in events:
                log.log(
                    logging.ERROR
                    if ev.severity == "critical"
                    else logging.WARNING
                    if ev.severity == "warning"
                    else logging.INFO,
                    "run %s: %s",
                    run,
                    ev.brief(),
                )
            with self._lock:
                rd = self._run(run)
                rd.events += events
                del rd.events[:-KEEP_EVENTS]
            self.store.write_events(run, to_records(events))
        for d in decisions:
            setting = [(d.layer, d.site, d.limit)]
            if self.observe_only:
                self.counters.add("clip_decisions_observed")
                log.warning(
                    "run %s (observe-only): would set %s clamp of layer %d to %s (%s)",
                    run,
                    d.site,
                    d.layer,
                    d.limit,
                    d.reason,
                )
                continue
            try:
                self.push(run, setting, d.reason, d.step, ready_at)
            except Exception:
                self.counters.add("clip_push_errors")
                log.exception("run %s: clip update %s failed", run, setting)

    # ---- operators (event loop) ----------------------------------------------------------
    def operator(self, run: str, op: str, items: list) -> list[tuple[int, str]]:
        """Apply an operator command to the run's policy; returns the frozen sites."""
        with self._lock:
            rd = self._run(run)
            if not rd.loaded:  # the saved state is not read yet: this goes on top of it
                rd.early_ops.append((op, list(items)))
            self._apply_op(rd.policy, op, items)
            return rd.policy.frozen

    @staticmethod
    def _apply_op(policy: ClipPolicy, op: str, items: list) -> None:
        for item in items:
            layer, site = item[0], item[1]
            if op == "set":
                policy.operator_set(layer, site, item[2])
            elif op == "clear":
                policy.operator_clear(layer, site)
            elif op == "freeze":
                policy.freeze(layer, site)
            elif op == "unfreeze":
                policy.unfreeze(layer, site)

    def forget(self, run: str) -> None:
        """The collector evicted the run (writer thread, after the run's last step): its
        state saved first, for when it comes back (no client waits for this)."""
        with self._lock:
            rd = self._runs.pop(run, None)
        if rd is not None and rd.last_step > rd.saved_step:
            self._save(run, rd)

    def events(self, run: str) -> list[Event]:
        with self._lock:
            rd = self._runs.get(run)
            return list(rd.events) if rd else []


class RankVectors(Mapping):
    """rank -> that rank's raw values of the step as a dense float64 vector (NaN: not sent),
    as analytics.frame.rank_vectors gives them, but built on access from the step's own
    RawBlocks (one R x M matrix per layout) and flat rows; and `matrix(ids)`, the ranks'
    values of a few ids, which is what the detectors ask for.

    A detector asks for per-rank values only once it has found something (NonFinite names the
    ranks a NaN came from; the blow-up rules ask whether each rank sees an expert's growth on
    its own). At 4,096 ranks x 65,000 metrics the dense vectors are ~2 GB and building them
    all took 1.2 s a step; `matrix` reads the asked columns out of the blocks instead (no pass
    over the step's millions of values), and a single rank's vector is one row per block.
    Where a (rank, id) is sent twice, the flat rows win over the blocks and a later row over
    an earlier one, as in the raw rows' order."""

    def __init__(
        self, blocks: list[RawBlock], rest: ValueBatch, size: int, ranks: tuple[int, ...]
    ) -> None:
        self._blocks = blocks
        ids = np.asarray(rest.metric_id)
        keep = (ids >= 0) & (ids < size)
        assert rest.rank is not None  # raw rows always name their rank
        self._rest = (
            ids[keep].astype(np.int64),
            np.asarray(rest.rank, dtype=np.int64)[keep],
            np.asarray(rest.value, dtype=np.float32)[keep],
        )
        self._ranks = tuple(int(r) for r in ranks)
        self._sorted = np.array(sorted(self._ranks), dtype=np.int64)
        self._known = set(self._ranks)
        self._size = size

    @classmethod
    def from_rows(
        cls,
        metric_id: np.ndarray,
        rank: np.ndarray,
        value: np.ndarray,
        size: int,
        ranks: tuple[int, ...],
    ) -> RankVectors:
        rows = ValueBatch(
            step=np.zeros(len(metric_id), np.int64),
            metric_id=np.asarray(metric_id),
            value=np.asarray(value),
            rank=np.asarray(rank),
        )
        return cls([], rows, size, ranks)

    def __getitem__(self, rank: int) -> np.ndarray:
        if rank not in self._known:
            raise KeyError(rank)
        vec = np.full(self._size, np.nan)
        for b in self._blocks:
            hit = np.flatnonzero(np.asarray(b.rank) == rank)
            if hit.size:
                m = np.asarray(b.metric_id, dtype=np.int64)
                ok = (m >= 0) & (m < self._size)
                vec[m[ok]] = np.asarray(b.value)[hit[-1]][ok]
        ids, rk, val = self._rest
        sel = rk == rank
        vec[ids[sel]] = val[sel]
        return vec

    def matrix(self, ids: np.ndarray) -> np.ndarray:
        """float64 [len(self), len(ids)]: row i is rank list(self)[i]'s value of each id (NaN:
        not sent, or the id is < 0)."""
        want = np.asarray(ids, dtype=np.int64).reshape(-1)
        uniq, inv = np.unique(want, return_inverse=True)
        out = np.full((len(self._ranks), uniq.size), np.nan)
        if not uniq.size or not self._ranks:
            return out[:, inv]
        row_of = {r: i for i, r in enumerate(self._ranks)}
        rank_rows = np.array([row_of[int(r)] for r in self._sorted], dtype=np.int64)

        def found(keys: np.ndarray, sorted_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            """Positions in keys that are in sorted_keys, and where each is there."""
            at = np.searchsorted(sorted_keys, keys)
            ok = at < sorted_keys.size
            ok[ok] = sorted_keys[at[ok]] == keys[ok]
            return np.flatnonzero(ok), at[ok]

        for b in self._blocks:
            where, col = found(np.asarray(b.metric_id, dtype=np.int64), uniq)
            if where.size:
                r_in, at = found(np.asarray(b.rank, dtype=np.int64), self._sorted)
                out[np.ix_(rank_rows[at], col)] = np.asarray(b.value)[np.ix_(r_in, where)]
        ids_r, rk_r, val_r = self._rest
        where, col = found(ids_r, uniq)
        if where.size:
            r_in, at = found(rk_r[where], self._sorted)
            out[rank_rows[at], col[r_in]] = val_r[where[r_in]]  # a later row wins
        return out[:, inv]

    def __iter__(self) -> Iterator[int]:
        return iter(self._ranks)

    def __len__(self) -> int:
        return len(self._ranks)
