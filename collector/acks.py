"""Cumulative acknowledgement of one (run, rank): the highest seq below which all is durable.

A frame is durable when what it carried has been flushed to the store. Frames of a step still
in the barrier wait for that step's write; frames written on their own (a schema's new metrics,
a late rank's raw values, a ClipAck's acknowledged step) wait for their write job; frames that
need no write (an EndOfStep of an already reduced step) are durable once received. The ack is therefore

    (lowest seq still waiting) - 1, or the highest seq received when nothing waits,

which only grows. Writer jobs carry increasing ids; the writer reports "flushed through job J"
(and which jobs failed: their frames keep waiting, so a failed write is never acked).
Hello frames are not tracked: a reconnecting client must be able to resend frames whose seqs
are lower than its new Hello's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class RankAcks:
    acked: int = 0  # last cumulative ack computed (and sent)
    max_seq: int = 0  # highest data-frame seq received
    durable_step: int = -1  # highest step of this rank made durable
    sent_at: float = float("-inf")  # clock reading when an Ack last went to this rank
    _open: dict[int, int] = field(default_factory=dict)  # step in barrier -> lowest seq
    _waiting: list[tuple[int, int, int]] = field(default_factory=list)  # (job, seq, step)
    _failed: int | None = None  # lowest seq whose write failed: the ack never passes it
    # min of every seq above (inf: none), None once a removal may have raised it. Frames add
    # seqs (a min of two) and steps move theirs from _open to _waiting (no change): only a
    # flush recomputes, where a scan of every waiting seq per frame was O(steps in flight).
    _low: float | None = None

    def is_duplicate(self, seq: int) -> bool:
        """seq <= acked: already durable, ignore the frame (and ack again)."""
        return seq <= self.acked

    def is_resend(self, seq: int) -> bool:
        """Received before (the data is held or being written), but not yet acked."""
        return seq <= self.max_seq

    def received(self, seq: int) -> None:
        """A frame that needs no write: durable as soon as everything below it is (the
        caller calls advance() after it)."""
        self.max_seq = max(self.max_seq, seq)

    def in_step(self, seq: int, step: int) -> None:
        """A frame whose data sits in the barrier for `step`."""
        self.received(seq)
        low = self._open.get(step)
        self._open[step] = seq if low is None else min(low, seq)
        self._lowers(seq)

    def in_job(self, seq: int, job: int, step: int = -1) -> None:
        """A frame written by writer job `job`."""
        self.received(seq)
        self._waiting.append((job, seq, step))
        self._lowers(seq)

    def _lowers(self, seq: int) -> None:
        if self._low is not None:
            self._low = min(self._low, seq)

    def step_submitted(self, step: int, job: int) -> None:
        """The barrier released `step` to writer job `job`."""
        low = self._open.pop(step, None)
        if low is not None:
            self._waiting.append((job, low, step))

    def flushed(self, through_job: int, failed: set[int]) -> bool:
        """Jobs <= through_job are flushed (except `failed`). True if the ack advanced."""
        keep = []
        for job, seq, step in self._waiting:
            if job > through_job:
                keep.append((job, seq, step))
            elif job in failed:
                self._failed = seq if self._failed is None else min(self._failed, seq)
            else:
                self.durable_step = max(self.durable_step, step)
        self._waiting = keep
        self._low = None
        return self.advance()

    def advance(self) -> bool:
        """Recompute the frontier; True if it moved (send an Ack)."""
        if self._low is None:
            lows = [*self._open.values(), *(seq for _, seq, _ in self._waiting)]
            if self._failed is not None:
                lows.append(self._failed)
            self._low = min(lows, default=math.inf)
        frontier = int(self._low) - 1 if self._low != math.inf else self.max_seq
        if frontier > self.acked:
            self.acked = frontier
            return True
        return False

    @property
    def settled(self) -> bool:
        """Everything received is acked (a half-closed stream may end)."""
        return self.acked >= self.max_seq
