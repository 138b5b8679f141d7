"""The client's bounded buffer: steps waiting to be sent plus frames sent but not acknowledged.

Capacity is counted in steps and in bytes of values (waiting + in flight), so client memory
stays bounded however long the collector is away. When full, the configured policy applies:
  drop_oldest  drop the oldest step not yet sent; if every buffered step is already in flight,
               drop the new one. A sent frame is never dropped: its seq is owed to the
               collector, which refuses a gap;
  block        wait up to block_timeout_s for an ack to free space, then drop the new step.
A drop is never silent: it is counted, logged as a warning with counts (rate-limited), and
kept in `drops` (DropLog) until the sender has reported it to the collector as a hole.
Control items (ClipAcks, mid-run Schemas) are tiny and never dropped.

One re-entrant condition guards everything; the sender waits on it too, and every thread
(training, sender worker, stream reader) bumps `counters` only while holding it.
"""

from __future__ import annotations

import bisect
import collections
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hooks.frames import ends_step, seq_of
from proto.v1 import telemetry_pb2 as pb

log = logging.getLogger("stepwatch.hooks")


@dataclass
class StepItem:
    """One step as the training thread hands it over; encoded by the sender worker."""

    step: int
    vector: Any  # has materialize() -> np.ndarray (hooks.stats.HostVector)
    schemas: Sequence[tuple[int, int]]  # (schema_id, n_values) in vector order
    wall_time: float
    patch_idx: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    patch_vals: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    user: Any = None  # hooks.userlog.UserValues: the last schema's values, after the vector
    _values: np.ndarray | None = None

    def values(self) -> np.ndarray:
        """The packed vector: the device copy with the host-side values (lr, step time...)
        written into their slots, then the user's logged values. Waits for the copy; sender
        thread only."""
        if self._values is None:
            values = self.vector.materialize() if self.vector is not None else np.zeros(0, "f4")
            values[self.patch_idx] = self.patch_vals
            if self.user is not None:
                values = np.concatenate([values, self.user.array()])
            self._values = values
        return self._values

    @property
    def nbytes(self) -> int:
        """Bytes of float32 values this step sends."""
        return 4 * sum(n for _, n in self.schemas)


@dataclass
class SchemaItem:
    """A schema registered mid-run (the user's logged names): sent before any later step."""

    schema_id: int
    specs: Any  # hooks.schemas.SpecColumns (or MetricSpecs)


@dataclass
class AckItem:
    """A ClipAck to send: `version` took effect at `step`."""

    step: int
    version: int


class DropLog:
    """Steps dropped but not yet reported to the collector, as ascending disjoint ranges
    [first, last]; `total` counts every drop. Bounded: beyond MAX_RANGES separate ranges the
    newest drops are only counted (`unrecorded`)."""

    MAX_RANGES = 4096

    def __init__(self) -> None:
        self.ranges: list[list[int]] = []
        self.total = 0
        self.unrecorded = 0

    def add(self, step: int) -> None:
        self.total += 1
        r = self.ranges
        if r and r[-1][0] <= step <= r[-1][1] + 1:  # the usual case: the next step of a run
            r[-1][1] = max(r[-1][1], step)
            return
        i = bisect.bisect_left(r, [step, step])  # a resumed run may repeat step numbers
        if i > 0 and r[i - 1][1] + 1 >= step:
            r[i - 1][1] = max(r[i - 1][1], step)
        elif i < len(r) and r[i][0] - 1 <= step:
            r[i][0] = min(r[i][0], step)
        elif len(r) < self.MAX_RANGES:
            r.insert(i, [step, step])
        else:
            self.unrecorded += 1
            return
        self._merge(max(i - 1, 0))

    def _merge(self, i: int) -> None:
        r = self.ranges
        while i + 1 < len(r) and r[i][1] + 1 >= r[i + 1][0]:
            r[i][1] = max(r[i][1], r.pop(i + 1)[1])

    def take(self) -> list[tuple[int, int]]:
        """The unreported ranges, now handed to the sender."""
        out = [(a, b) for a, b in self.ranges]
        self.ranges = []
        return out


class StepBuffer:
    def __init__(
        self,
        capacity: int,
        policy: str,
        block_timeout_s: float,
        capacity_bytes: int = 1 << 62,
        log_interval_s: float = 10.0,
        label: str = "",
    ) -> None:
        self.capacity, self.policy, self.block_timeout_s = capacity, policy, block_timeout_s
        self.capacity_bytes, self.log_interval_s = capacity_bytes, log_interval_s
        self.label = label  # whose buffer, in log lines: "run 'x' rank 3"
        self.cond = threading.Condition(threading.RLock())
        self.counters: collections.Counter = collections.Counter()
        self._pending: collections.deque = collections.deque()  # StepItem | AckItem
        self._pending_steps = 0
        self._unacked: collections.deque = collections.deque()  # (seq, ClientFrame, nbytes)
        self._unacked_steps = 0
        # The item the worker popped and is encoding: still buffered until record_sent (a
        # close that looked only at pending and unacked could say goodbye before its frames)
        self._taken: StepItem | AckItem | SchemaItem | None = None
        self._bytes = 0  # values of pending steps and of unacknowledged chunks
        self.drops = DropLog()
        self._logged_at = -float("inf")  # when drops were last logged
        self._unlogged: list[int] = []  # [count, first step, last step] since then
        self.closing = False
        self.stopped = False  # a permanent error: nothing is sent any more

    # ------------------------------------------------------------------ training thread
    def submit(self, item: StepItem) -> bool:
        """Buffer one step. Returns False when it was dropped (counted)."""
        with self.cond:
            if self.stopped:
                self.counters["dropped_steps"] += 1
                self.counters["dropped_stopped"] += 1  # the one error said so already
                return False
            if self.closing:
                self.counters["dropped_steps"] += 1
                return False
            if self._full(item.nbytes):
                if self.policy == "drop_oldest":
                    while self._full(item.nbytes):
                        if not self._drop_oldest_waiting():
                            self._dropped(item.step, "dropped_newest")
                            return False
                else:
                    self.counters["blocked_submits"] += 1
                    space = self.cond.wait_for(
                        lambda: not self._full(item.nbytes) or self.closing or self.stopped,
                        timeout=self.block_timeout_s,
                    )
                    if not space or self.closing or self.stopped:
                        self._dropped(item.step, "dropped_block_timeout")
                        return False
            self._pending.append(item)
            self._pending_steps += 1
            self._bytes += item.nbytes
            self.counters["steps_enqueued"] += 1
            self.cond.notify_all()
            return True

    def _full(self, nbytes: int) -> bool:
        if self.buffered() >= self.capacity:
            return True
        return self.buffered() > 0 and self._bytes + nbytes > self.capacity_bytes

    def submit_control(self, item: AckItem | SchemaItem) -> None:
        with self.cond:
            self._pending.append(item)
            self.cond.notify_all()

    def _drop_oldest_waiting(self) -> bool:
        """Drop the oldest step not yet sent; False if none is waiting (every buffered step
        is in flight and its seqs are owed)."""
        for i, item in enumerate(self._pending):
            if isinstance(item, StepItem):
                del self._pending[i]
                self._pending_steps -= 1
                self._bytes -= item.nbytes
                self._dropped(item.step, "dropped_oldest")
                return True
        return False

    def _dropped(self, step: int, key: str) -> None:
        """Count, remember for the collector, and log (at most every log_interval_s)."""
        self.counters["dropped_steps"] += 1
        self.counters[key] += 1
        self.drops.add(step)
        n, first, _ = self._unlogged or [0, step, step]
        self._unlogged = [n + 1, min(first, step), step]
        if time.monotonic() - self._logged_at >= self.log_interval_s:
            self.log_drops()

    def log_drops(self) -> None:
        """The warning for drops not logged yet (also called by the sender on reconnect)."""
        with self.cond:
            if not self._unlogged:
                return
            n, first, last = self._unlogged
            self._unlogged, self._logged_at = [], time.monotonic()
            total = self.counters["dropped_steps"]
        log.warning(
            "stepwatch: %sclient buffer full (%d steps, %.1f MiB; policy %s): dropped %d "
            "step(s) between %d and %d, %d in total; each is reported to the collector as a hole",
            f"{self.label}: " if self.label else "",
            self.buffered(),
            self._bytes / (1 << 20),
            self.policy,
            n,
            first,
            last,
            total,
        )

    def stop(self) -> int:
        """A permanent error: drop everything buffered (returned, counted as lost) and refuse
        every later step."""
        with self.cond:
            lost = self.buffered()
            self.stopped = True
            self._pending = collections.deque(
                i for i in self._pending if not isinstance(i, StepItem)
            )
            self._unacked.clear()
            self._pending_steps = self._unacked_steps = self._bytes = 0
            self.counters["lost_stopped"] += lost
            self.cond.notify_all()
            return lost

    # ------------------------------------------------------------------ sender side
    def pop(self) -> StepItem | AckItem | SchemaItem | None:
        """The oldest waiting item, to be encoded and sent."""
        with self.cond:
            if not self._pending:
                return None
            item = self._pending.popleft()
            if isinstance(item, StepItem):
                self._pending_steps -= 1
                self._bytes -= item.nbytes
            self._taken = item
            return item

    def release(self) -> None:
        """The popped item is encoded and recorded (or its encoding failed: it is gone)."""
        with self.cond:
            self._taken = None
            self.cond.notify_all()

    def record_sent(self, frames: list[pb.ClientFrame], is_step: bool) -> None:
        with self.cond:
            for frame in frames:
                nbytes = _value_bytes(frame)
                self._unacked.append((seq_of(frame), frame, nbytes))
                self._bytes += nbytes
            self._unacked_steps += int(is_step)
            self._taken = None

    def ack(self, seq: int) -> None:
        """Cumulative: every frame with seq <= `seq` is durable and leaves the buffer."""
        with self.cond:
            while self._unacked and self._unacked[0][0] <= seq:
                _, frame, nbytes = self._unacked.popleft()
                self._bytes -= nbytes
                if ends_step(frame):
                    self._unacked_steps -= 1
            self.counters["acked_seq"] = max(self.counters["acked_seq"], seq)
            self.cond.notify_all()

    def unacked_frames(self) -> list[pb.ClientFrame]:
        with self.cond:
            return [frame for _, frame, _ in self._unacked]

    def replace_unacked(self, frames: list[pb.ClientFrame]) -> None:
        """The unacknowledged frames, rewritten (same steps, e.g. renumbered for another
        collector's protocol); the caller holds the lock across reading and replacing."""
        with self.cond:
            self._bytes -= sum(n for _, _, n in self._unacked)
            self._unacked = collections.deque((seq_of(f), f, _value_bytes(f)) for f in frames)
            self._bytes += sum(n for _, _, n in self._unacked)

    def waiting_steps(self) -> list[StepItem]:
        with self.cond:
            return [i for i in self._pending if isinstance(i, StepItem)]

    def has_pending(self) -> bool:
        with self.cond:
            return bool(self._pending)

    def has_unacked(self) -> bool:
        with self.cond:
            return bool(self._unacked)

    def all_sent(self) -> bool:
        """Nothing waits to be encoded and sent (what was sent may still be unacked)."""
        with self.cond:
            return not self._pending and self._taken is None

    def drained(self) -> bool:
        with self.cond:
            return not self._pending and not self._unacked and self._taken is None

    def buffered(self) -> int:
        with self.cond:
            taken = int(isinstance(self._taken, StepItem))
            return self._pending_steps + self._unacked_steps + taken

    def buffered_bytes(self) -> int:
        with self.cond:
            return self._bytes

    def count(self, key: str, n: int = 1) -> None:
        with self.cond:
            self.counters[key] += n


def _value_bytes(frame: pb.ClientFrame) -> int:
    return len(frame.chunk.values) if frame.WhichOneof("kind") == "chunk" else 0
