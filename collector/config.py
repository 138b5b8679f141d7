"""CollectorConfig: every bound and timing of the collector, validated once, documented here."""

from __future__ import annotations

import math
from dataclasses import dataclass

MIB = 1 << 20


@dataclass
class CollectorConfig:
    token: str | None = None
    """Bearer token every RPC must carry (`authorization: Bearer <token>`). None is refused
    when the collector starts listening, unless `insecure` (then on loopback only)."""

    operator_token: str | None = None
    """Token of the operator scope: it also streams telemetry, and only it may run clip
    commands (`python -m collector clip`). None: clip commands are refused
    (PERMISSION_DENIED), except on an insecure collector without tokens, where anyone on
    loopback may."""

    insecure: bool = False
    """Accept RPCs without a token (`--insecure`): only on a loopback address, never with
    `token` (operator_token still guards clip commands if set)."""

    straggler_timeout_s: float = 30.0
    """Once the first rank ended step s, reduce s without the ranks that have not ended it
    within this many seconds; the step is stored incomplete with its missing ranks."""

    flush_interval_s: float = 0.5
    """The writer flushes the store at most this often (acks follow each flush)."""

    flush_every_steps: int = 64
    """... or as soon as this many reduced steps wait for a flush, whichever comes first."""

    max_pending_steps: int = 64
    """Steps of one run waiting for the barrier; a frame that would open one more is
    RESOURCE_EXHAUSTED (the rank is too far ahead of the slowest rank)."""

    max_pending_bytes: int = 1 << 30
    """Bytes of step vectors held by all runs, from the first chunk until the writer has
    handed them to the store; beyond it new vectors are RESOURCE_EXHAUSTED. A step of 6
    million values holds 30 MB (float32 + have flag), so the default admits ~35 such steps in
    flight and, with the writer's one stacked copy per step, keeps the collector under 2 GB."""

    max_chunk_bytes: int = MIB
    """Largest StepChunk.values (the wire contract says 1 MiB); gRPC's receive limit is set
    a little above it, so a larger message never reaches Python."""

    max_runs: int = 1024
    """Runs one collector tracks at once (registry entries)."""

    max_world_size: int = 1 << 16
    """Largest Hello.world_size accepted."""

    max_schemas_per_rank: int = 65_536
    """Schemas one rank may register in one run (wire parts count one each: a client cuts a
    big schema into parts of <= 1 MB of MetricDefs, so 10 M metrics take 200-5,000 parts, and
    older clients' parts of 16,384 metrics 611). The bound that matters for memory is
    max_metrics_per_run (and the byte budget); this one only caps per-schema bookkeeping."""

    max_metrics_per_run: int = 1 << 24
    """Distinct metric names per run (dense ids 0..n-1)."""

    keepalive_s: float = 2.0
    """A rank with frames held but not yet durable (waiting for the barrier) gets its current
    Ack again this often, so its client can tell a waiting collector from a dead stream."""

    max_streams: int = 8192
    """Concurrent RPCs the gRPC server admits (one stream per rank)."""

    stop_grace_s: float = 2.0
    """On stop, streams still open after this many seconds are cancelled."""

    stats_log_interval_s: float = 30.0
    """Counters are logged this often (and once at stop)."""

    detect: bool = True
    """Run the online detectors (analytics/) on every reduced step and store their events."""

    observe_only: bool = False
    """Detect and store events, but never push a clip update of the clip policy (operators'
    commands still apply)."""

    def __post_init__(self) -> None:
        for name in ("token", "operator_token"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} must be a non-empty string or None")
        if self.insecure and self.token is not None:
            raise ValueError("give a token or insecure, not both")
        if self.token is not None and self.token == self.operator_token:
            raise ValueError("the operator token must differ from the token")
        for name in (
            "straggler_timeout_s",
            "flush_interval_s",
            "stop_grace_s",
            "stats_log_interval_s",
            "keepalive_s",
        ):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {v!r}")
        for name in (
            "flush_every_steps",
            "max_pending_steps",
            "max_pending_bytes",
            "max_chunk_bytes",
            "max_runs",
            "max_world_size",
            "max_schemas_per_rank",
            "max_metrics_per_run",
            "max_streams",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.max_chunk_bytes % 4:
            raise ValueError("max_chunk_bytes must be a multiple of 4 (float32 values)")

    @property
    def tick_s(self) -> float:
        """How often the barrier is polled for stragglers: a fraction of the timeout."""
        return min(0.1, self.straggler_timeout_s / 4)

    @property
    def max_message_bytes(self) -> int:
        """gRPC receive limit: one full chunk plus room for its header and framing."""
        return self.max_chunk_bytes + 64 * 1024
