"""The clip control plane: every clip update of every run goes through one `ClipControl`.

    push      a detector's decision (writer thread, detect.py), an operator's set or clear
              (event loop, operator.py) or Collector.push_clip (any thread): a new version of
              the run's table (clipboard.py), its rows to the store (a writer job), the update
              to every connected rank of the run
    acked     a rank's ClipAck (event loop, ingest.py): the version's rows stored again, with
              the step it took effect
    sent      the update written to a stream (the servicer): closes the version's latency
              measurement
    operator  an operator stream's command (event loop): set and clear push a new version,
              freeze and unfreeze only steer the clip policy; answered with the run's table

The closed loop: a reduced step -> detectors -> clip policy -> push -> every rank's stream;
the latency from the step leaving the barrier (its last frame arrived) to the update being
written to a stream is measured per version (`latency_ms`).

`push_clip`, `push`, `acks` and `latency_ms` are safe from any thread; `acked`, `sent` and
`operator` run on the event loop. The plane is built before the stages it feeds (the
detectors push through it, ingest reports acks and operator commands to it); `connect`
hands them over once they exist.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

from collector.clipboard import ClipAckRecord, ClipBoard
from collector.detect import Detect
from collector.ingest import Ingest
from collector.jobs import WriteClips
from collector.operator import apply_command
from collector.stats import Counters
from collector.writer import Writer
from proto.v1 import telemetry_pb2 as pb
from store.base import RUN_NAME_RE

log = logging.getLogger("collector")


class ClipControl:
    _writer: Writer
    _ingest: Ingest
    _detect: Detect | None
    _call_soon: Callable[..., None]  # call_soon(fn, *args): fn(*args) on the event loop, if it runs

    def __init__(self, counters: Counters, *, observe_only: bool) -> None:
        self.clips = ClipBoard()
        self.counters = counters
        self.observe_only = observe_only
        self._latency_lock = threading.Lock()
        self._origin: dict[tuple[str, int], float] = {}  # (run, version) -> t0
        self._latency: dict[tuple[str, int], float] = {}  # (run, version) -> ms

    def connect(
        self,
        writer: Writer,
        ingest: Ingest,
        detect: Detect | None,
        call_soon: Callable[..., None],
    ) -> None:
        """The stages the plane feeds: the writer stores clip rows, ingest holds the streams,
        detect's clip policy takes operator commands; call_soon runs a call on the event loop."""
        self._writer, self._ingest, self._detect = writer, ingest, detect
        self._call_soon = call_soon

    # ---- pushes (any thread) ------------------------------------------------------------------
    def push_clip(
        self, run: str, settings: Iterable[tuple[int, str, float]], reason: str = "operator"
    ) -> int:
        """Merge (layer, site, limit) settings into the run's clip table and send the new
        version down every connected rank's stream (ranks connecting later get it on Hello).
        The update is stored (store.clips) with its reason. Returns the version."""
        return self.push(run, list(settings), reason, 0, None)

    def push(self, run: str, settings: list, reason: str, step: int, origin: float | None) -> int:
        """push_clip decided at the run's `step`; `origin` (monotonic, the causing step
        leaving the barrier) starts the version's latency measurement (detect.PushFn)."""
        update = self.clips.push(run, settings, reason, step)
        self.counters.add("clip_updates")
        if origin is not None:
            with self._latency_lock:
                self._origin[(run, update.version)] = origin
        self._writer.submit(WriteClips(run, self.clips.records(run, update.version)))
        self._call_soon(self._ingest.broadcast_clip, run, update)
        return update.version

    # ---- acks and the wire (event loop) -------------------------------------------------------
    def acked(self, run: str, version: int) -> int | None:
        """A rank acknowledged; the version's rows are stored again with the step it took
        effect (the latest over ranks). Returns the writer job (the ClipAck frame is acked
        once it is flushed), None when there is nothing to store."""
        records = self.clips.records(run, version)
        return self._writer.submit(WriteClips(run, records)) if records else None

    def sent(self, run: str, version: int) -> None:
        """A ClipUpdate was written to a stream; the first one of a version that a detector
        caused closes its latency measurement."""
        now = time.monotonic()
        with self._latency_lock:
            t0 = self._origin.pop((run, version), None)
            if t0 is None:
                return
            ms = (now - t0) * 1000.0
            self._latency[(run, version)] = ms
        log.info(
            "run %s: clip update v%d on the wire %.1f ms after its step's last frame arrived",
            run,
            version,
            ms,
        )

    # ---- operator commands (event loop) -------------------------------------------------------
    def operator(self, hello: pb.Hello) -> pb.ClipUpdate:
        """An operator stream's command: apply it, answer with the run's table. set/clear
        push a new version to the run's ranks; freeze/unfreeze only steer the clip policy.
        The answer's reason is JSON: frozen sites, observe-only, the op."""
        run = hello.header.run
        step = self._last_step(run) if RUN_NAME_RE.match(run) else 0
        answer = apply_command(
            run, hello.config_json, self.push, step, self.clips, self._detect, self.observe_only
        )
        self.counters.add("operator_commands")
        return answer

    def _last_step(self, run: str) -> int:
        r = self._ingest.runs.get(run)
        return max(0, r.barrier.reduced_through) if r is not None else 0

    # ---- introspection (any thread) -----------------------------------------------------------
    def acks(self, run: str) -> list[ClipAckRecord]:
        return self.clips.acks(run)

    def latency_ms(self, run: str) -> dict[int, float]:
        """version -> ms from the step that caused it leaving the barrier (its last frame
        arrived) to the update being written to the first rank's stream."""
        with self._latency_lock:
            return {v: ms for (r, v), ms in self._latency.items() if r == run}
