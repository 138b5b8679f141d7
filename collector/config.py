"""CollectorConfig: every bound and timing of the collector, validated once, documented here."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

MIB = 1 << 20
# Welcome.send_interval_ms (CollectorConfig.send_interval_ms): shorter intervals are not worth
# the batching (a run of a few hundred ranks sends at once); longer ones would hold a step
# back for longer than the straggler and ack cadences a client expects
MIN_SEND_INTERVAL_MS = 50
MAX_SEND_INTERVAL_MS = 5000


def default_spool_dir(store_url: str) -> str | None:
    """Where `serve` spools when not told: $STEPWATCH_SPOOL; beside a Parquet store
    (DIR.spool: the spool must outlive the collector, like the store); for ClickHouse
    ~/.local/state/stepwatch/spool-HOST-PORT-DB; none for the memory store."""
    env = os.environ.get("STEPWATCH_SPOOL")
    if env:
        return env
    scheme, _, rest = store_url.partition(":")
    if scheme == "parquet" and rest:
        return os.path.abspath(rest[2:] if rest.startswith("///") else rest).rstrip("/") + ".spool"
    if scheme in ("clickhouse", "clickhouses"):
        where = re.sub(r"^//([^@/]*@)?", "", rest).split("?")[0]  # no credentials in paths
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", where).strip("-") or "default"
        state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
        return os.path.join(state, "stepwatch", f"spool-{name}")
    return None


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

    max_dictionary_bytes: int = 5 << 30
    """Bytes of metric dictionaries held by all runs (each name costs registry.name_bytes,
    measured: the registry, the store's and the detectors' dictionaries); a schema whose new
    names would pass it is RESOURCE_EXHAUSTED. Released when a run is evicted. ~11 M names
    of ~40 characters fit the default (a 10 M-metric rank); with max_pending_bytes it bounds
    the collector's memory."""

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

    max_stream_messages_per_s: float = 4000.0
    """Pacing: a run's streams together should send about this many gRPC messages a second at
    most (about what grpc.aio serves on one core; 4,096 ranks: one message per rank per
    1.0 s; 1,000 a second paced them 4.1 s apart, and that latency cost more than the
    messages it saved: 1.29-1.46 against 1.54-1.80 steps/s at 4,096 x 1,460, README). Each
    rank's Welcome carries send_interval_ms = world_size / this (0 below MIN_SEND_INTERVAL_MS,
    capped at MAX_SEND_INTERVAL_MS): a rank sends at most one message per interval, and the
    frames that come sooner leave together in one FrameBatch. The
    collector's cost at thousands of streams is per message (gRPC, asyncio), not per byte; a
    step that comes after a quiet interval (a step slower than the interval) goes at once, so
    only ranks stepping faster than the interval are batched, and wait at most that long."""

    max_streams: int = 8192
    """Concurrent RPCs the gRPC server admits (one stream per rank)."""

    stop_grace_s: float = 2.0
    """On stop, streams still open after this many seconds are cancelled."""

    stats_log_interval_s: float = 30.0
    """Counters are logged this often (and once at stop)."""

    spool_dir: str | None = None
    """Directory of the on-disk spool (spool.py): while the store is away its writes go
    there, and frames are acknowledged once the spool has fsynced them; the spool drains into
    the store, oldest first, when the store answers again, and survives a kill -9 (replayed
    at the next start). None: no spool: while the store is away frames stay unacknowledged
    and new ones are refused (UNAVAILABLE). `python -m collector serve` picks a directory
    beside the store unless told otherwise (collector/__main__.py)."""

    spool_max_bytes: int = 2 << 30
    """Bound of the spool on disk. At it (or when its disk is full) the collector stops
    acknowledging: new frames are refused with UNAVAILABLE until the store takes some."""

    spool_segment_bytes: int = 64 * MIB
    """The spool is cut into files of about this size; drained ones are deleted."""

    store_retry_max_s: float = 5.0
    """While the store is away it is retried with exponential backoff and jitter, from
    0.2 s doubling up to this."""

    run_idle_s: float = 300.0
    """A run none of whose ranks has had an open stream for this long is evicted from
    memory; if it had not finished (every rank said goodbye) it is first abandoned: its
    pending steps are reduced as incomplete and its status stored as "abandoned". Its data
    stays readable, and a rank that comes back later resumes it. A run that never sent a
    data frame is forgotten as soon as its last stream closes (nothing of it is stored), and
    at max_runs the run idle longest goes early."""

    max_step_ahead: int = 100_000
    """A frame whose step lies more than this many steps beyond the run's latest step is
    refused (INVALID_ARGUMENT): one wild step would make every later step "late"."""

    stop_timeout_s: float = 30.0
    """stop() (SIGTERM) returns within about this long: the store gets what it can take in
    half of it, the spool the rest; what neither took was never acknowledged."""

    lock_timeout_s: float = 60.0
    """At start, wait this long for a collector still holding the spool directory (or the
    Parquet store) to exit, then refuse to start with an error naming it."""

    reject_log_interval_s: float = 10.0
    """Rejected frames are logged at most once per this interval (then a count of the rest)."""

    detect: bool = True
    """Run the online detectors (analytics/) on every reduced step and store their events."""

    observe_only: bool = False
    """Detect and store events, but never push a clip update of the clip policy (operators'
    commands still apply)."""

    coordinator: str | None = None
    """Tier mode (tier.py): HOST:PORT of the coordinator (coordinator.py). This collector then
    stores its ranks' raw vectors and sends per-step partials there; the coordinator reduces,
    detects and stores the reduced steps (detect is off here)."""

    coordinator_tls_ca: str | None = None
    """Tier mode: TLS to the coordinator, trusting the roots in this PEM file (a coordinator
    started with --tls-cert / --tls-key); None: plaintext (a private network only)."""

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
            "store_retry_max_s",
            "run_idle_s",
            "stop_timeout_s",
            "reject_log_interval_s",
        ):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {v!r}")
        for name in (
            "flush_every_steps",
            "max_pending_steps",
            "max_pending_bytes",
            "max_dictionary_bytes",
            "max_chunk_bytes",
            "max_runs",
            "max_world_size",
            "max_schemas_per_rank",
            "max_metrics_per_run",
            "max_streams",
            "spool_max_bytes",
            "spool_segment_bytes",
            "max_step_ahead",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        rate = self.max_stream_messages_per_s
        if not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate <= 0:
            raise ValueError(
                f"max_stream_messages_per_s must be a positive number of messages a second, "
                f"got {rate!r}"
            )
        if not isinstance(self.lock_timeout_s, (int, float)) or not self.lock_timeout_s >= 0:
            raise ValueError(f"lock_timeout_s must be >= 0 seconds, got {self.lock_timeout_s!r}")
        if self.spool_dir is not None and (
            not isinstance(self.spool_dir, str) or not self.spool_dir
        ):
            raise ValueError("spool_dir must be a directory path or None")
        if self.max_chunk_bytes % 4:
            raise ValueError("max_chunk_bytes must be a multiple of 4 (float32 values)")

    def send_interval_ms(self, world_size: int) -> int:
        """Welcome.send_interval_ms for a rank of a run of `world_size` ranks."""
        ms = 1000.0 * world_size / self.max_stream_messages_per_s
        return 0 if ms < MIN_SEND_INTERVAL_MS else int(min(ms, MAX_SEND_INTERVAL_MS))

    @property
    def tick_s(self) -> float:
        """How often the barrier is polled for stragglers: a fraction of the timeout."""
        return min(0.1, self.straggler_timeout_s / 4)

    @property
    def max_message_bytes(self) -> int:
        """gRPC receive limit: one full chunk plus room for its header and framing."""
        return self.max_chunk_bytes + 64 * 1024
