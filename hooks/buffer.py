"""The client's bounded buffer: steps waiting to be sent plus frames sent but not acknowledged.

Capacity is counted in steps (waiting + in flight), so client memory stays bounded however long
the collector is away. When full, the configured policy applies and is counted:
  drop_oldest  drop the oldest waiting step; if every buffered step is already in flight, drop
               the oldest unacknowledged one (its frames will never be resent: a seq gap the
               collector sees as lost data, counted here as dropped_unacked);
  block        wait up to block_timeout_s for an ack to free space, then drop the new step.
Control items (ClipAcks, mid-run Schemas) are tiny and never dropped.

One re-entrant condition guards everything; the sender waits on it too, and every thread
(training, sender worker, stream reader) bumps `counters` only while holding it.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hooks.frames import ends_step, seq_of
from proto.v1 import telemetry_pb2 as pb


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


@dataclass
class SchemaItem:
    """A schema registered mid-run (the user's logged names): sent before any later step."""

    schema_id: int
    specs: Sequence[Any]  # hooks.layout.MetricSpec


@dataclass
class AckItem:
    """A ClipAck to send: `version` took effect at `step`."""

    step: int
    version: int


class StepBuffer:
    def __init__(self, capacity: int, policy: str, block_timeout_s: float) -> None:
        self.capacity, self.policy, self.block_timeout_s = capacity, policy, block_timeout_s
        self.cond = threading.Condition(threading.RLock())
        self.counters: collections.Counter = collections.Counter()
        self._pending: collections.deque = collections.deque()  # StepItem | AckItem
        self._pending_steps = 0
        self._unacked: collections.deque = collections.deque()  # (seq, ClientFrame)
        self._unacked_steps = 0
        self.closing = False

    # ------------------------------------------------------------------ training thread
    def submit(self, item: StepItem) -> bool:
        """Buffer one step. Returns False when it was dropped (counted)."""
        with self.cond:
            if self.closing:
                self.counters["dropped_steps"] += 1
                return False
            if self.buffered() >= self.capacity:
                if self.policy == "drop_oldest":
                    self._drop_oldest()
                else:
                    self.counters["blocked_submits"] += 1
                    space = self.cond.wait_for(
                        lambda: self.buffered() < self.capacity or self.closing,
                        timeout=self.block_timeout_s,
                    )
                    if not space or self.closing:
                        self.counters["dropped_steps"] += 1
                        self.counters["dropped_block_timeout"] += 1
                        return False
            self._pending.append(item)
            self._pending_steps += 1
            self.counters["steps_enqueued"] += 1
            self.cond.notify_all()
            return True

    def submit_control(self, item: AckItem | SchemaItem) -> None:
        with self.cond:
            self._pending.append(item)
            self.cond.notify_all()

    def _drop_oldest(self) -> None:
        self.counters["dropped_steps"] += 1
        for i, item in enumerate(self._pending):
            if isinstance(item, StepItem):
                del self._pending[i]
                self._pending_steps -= 1
                return
        kept, found = [], False  # every step is in flight: drop the oldest one
        while self._unacked and not found:
            seq, frame = self._unacked.popleft()
            found = ends_step(frame)
            if frame.WhichOneof("kind") in ("clip_ack", "schema"):
                kept.append((seq, frame))
        self._unacked.extendleft(reversed(kept))
        self._unacked_steps -= 1
        self.counters["dropped_unacked"] += 1

    # ------------------------------------------------------------------ sender side
    def pop(self) -> StepItem | AckItem | SchemaItem | None:
        """The oldest waiting item, to be encoded and sent."""
        with self.cond:
            if not self._pending:
                return None
            item = self._pending.popleft()
            if isinstance(item, StepItem):
                self._pending_steps -= 1
            return item

    def record_sent(self, frames: list[pb.ClientFrame], is_step: bool) -> None:
        with self.cond:
            for frame in frames:
                self._unacked.append((seq_of(frame), frame))
            self._unacked_steps += int(is_step)

    def ack(self, seq: int) -> None:
        """Cumulative: every frame with seq <= `seq` is durable and leaves the buffer."""
        with self.cond:
            while self._unacked and self._unacked[0][0] <= seq:
                _, frame = self._unacked.popleft()
                if ends_step(frame):
                    self._unacked_steps -= 1
            self.counters["acked_seq"] = max(self.counters["acked_seq"], seq)
            self.cond.notify_all()

    def unacked_frames(self) -> list[pb.ClientFrame]:
        with self.cond:
            return [frame for _, frame in self._unacked]

    def replace_unacked(self, frames: list[pb.ClientFrame]) -> None:
        """The unacknowledged frames, rewritten (same steps, e.g. renumbered for another
        collector's protocol); the caller holds the lock across reading and replacing."""
        with self.cond:
            self._unacked = collections.deque((seq_of(f), f) for f in frames)

    def waiting_steps(self) -> list[StepItem]:
        with self.cond:
            return [i for i in self._pending if isinstance(i, StepItem)]

    def has_pending(self) -> bool:
        with self.cond:
            return bool(self._pending)

    def has_unacked(self) -> bool:
        with self.cond:
            return bool(self._unacked)

    def drained(self) -> bool:
        with self.cond:
            return not self._pending and not self._unacked

    def buffered(self) -> int:
        with self.cond:
            return self._pending_steps + self._unacked_steps

    def count(self, key: str, n: int = 1) -> None:
        with self.cond:
            self.counters[key] += n
