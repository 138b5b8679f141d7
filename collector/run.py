"""Run: one live run as the collector holds it, from its first Hello until it is evicted
(ingest.py: idle for run_idle_s with no stream open, or at once if it never sent data).

Its metric registry and step barrier (what its data frames build, steps.py), and per rank the
ack bookkeeping and the open streams (what ingest.py answers and ends). Event-loop thread
only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from collector.acks import RankAcks
from collector.barrier import StepBarrier
from collector.conn import Conn
from collector.registry import RunMetrics
from store.base import RunInfo


@dataclass
class Run:
    name: str
    world_size: int
    info: RunInfo
    metrics: RunMetrics
    barrier: StepBarrier
    acks: dict[int, RankAcks] = field(default_factory=dict)
    conns: dict[int, set[Conn]] = field(default_factory=dict)
    said_goodbye: set[int] = field(default_factory=set)  # ranks that half-closed
    acks_due: set[int] = field(default_factory=set)  # ranks whose Ack pacing holds back
    paced_streams: int = 0  # the streams its pacing is for (ingest._paced_streams; 0: world)
    # (rank, schema_id) -> its id map, one array object per distinct content (a "layout":
    # the ranks of one EP group share it), so the reduction can group parts by identity
    id_maps: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    layouts: dict[bytes, np.ndarray] = field(default_factory=dict)
    finished: bool = False
    finish_job: int | None = None  # writer job that marks the run finished
    opened: bool = False  # OpenRun submitted: the run exists in the store (its first data)
    idle_since: float | None = None  # clock reading when its last stream closed
    latest_step: int = -1  # highest step any rank sent (trust.py's step window)
    sessions: dict[int, str] = field(default_factory=dict)  # rank -> its client's session
