"""`MonitorConfig`: every knob of the client, one documented field each, validated on creation.

A bad value is the user's code, not the training loop, so it raises a clear `ValueError` here,
before the first step, rather than being logged and ignored later.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

STAT_GROUPS: tuple[str, ...] = (
    "moe",
    "router",
    "attn",
    "resid",
    "output",
    "grad",
    "params",
    "train",
)
"""Stat groups that can be switched off one by one (`MonitorConfig.groups`):
moe     per-expert and shared-expert activation stats (tokens, gate mass, act rms/maxabs, out norm)
router  per-MoE-layer router confidence, logit max/std, z-loss, load imbalance, bias max
attn    per-head max attention logit
resid   per-layer residual stream rms / maxabs
output  max of the output-head logits
grad    global, per-layer and per-expert gradient norms
params  every `param_norm_every` steps: per-expert parameter norms and the update ratio
train   loss, MTP losses, lr, step time, tokens, tokens/s (host values, no device work)"""

FULL_POLICIES = ("block", "drop_oldest")
MAX_CHUNK_VALUES = 262_144  # 1 MiB of float32: the wire contract's per-chunk ceiling


@dataclass(frozen=True)
class MonitorConfig:
    param_norm_every: int = 10
    """K: per-expert parameter norms and the update ratio (a second schema) are measured on
    steps with step % K == 0. The update ratio keeps one snapshot of the parameters on the
    device during those steps, so a larger K costs nothing more in memory, only resolution."""

    buffer_steps: int = 1024
    """Capacity of the client buffer, in steps: steps waiting to be sent plus steps sent but not
    yet acknowledged by the collector. Bounds client memory during a collector outage; with
    buffer_bytes, how long an outage loses nothing: min(buffer_steps, buffer_bytes / step
    bytes) steps (README, "When the collector is away")."""

    buffer_bytes: int = 256 << 20
    """Capacity of the client buffer in bytes of step values (float32), whichever of the two
    bounds is hit first: a rank of a million metrics (4 MB a step) buffers 64 steps."""

    full_policy: str = "drop_oldest"
    """What `step_end` does when the buffer is full. "drop_oldest": discard the oldest step not
    yet sent (the new one if every buffered step is already in flight, so seqs never skip).
    "block": wait up to `block_timeout_s` for the collector to acknowledge something, then drop
    the new step. Either way a drop is never silent: it is counted
    (`Monitor.stats()['dropped_steps']`), logged as a warning with counts (at most every
    `drop_log_interval_s`), sent in every later step as the metric telemetry/dropped_steps,
    and reported to the collector as a hole (StepsDropped) that the store keeps as an event of
    kind "steps_dropped"."""

    drop_log_interval_s: float = 10.0
    """Dropped steps are logged at once, then at most this often, with the counts since."""

    block_timeout_s: float = 1.0
    """Longest time the training thread waits for buffer space under the "block" policy."""

    chunk_values: int = MAX_CHUNK_VALUES
    """Float32 values per StepChunk; a step's vector larger than this is split. At most
    262144 (1 MiB), well under gRPC's 4 MiB default message limit."""

    backoff_initial_s: float = 0.2
    """First wait before reconnecting after a stream error; doubles on each failed attempt.
    Every wait is drawn uniformly from [1/2, 1] of its nominal value (jitter, so that thousands
    of ranks cut off together do not reconnect together), and new steps never cut it short."""

    backoff_max_s: float = 15.0
    """Ceiling of the nominal reconnect backoff: a long outage costs each rank one connect
    attempt every 7.5-15 s (4,096 ranks: ~370 attempts/s at the collector's address), and a
    collector that comes back is found within backoff_max_s."""

    net_timeout_s: float = 10.0
    """Bound on any single network wait: opening the stream and receiving Welcome, and the
    longest silence tolerated while frames are unacknowledged before the stream is declared
    dead and reopened. The training thread itself never waits on the network."""

    close_timeout_s: float = 10.0
    """Default bound for `Monitor.close()` to flush buffered steps and wait for their acks."""

    groups: frozenset[str] = field(default_factory=lambda: frozenset(STAT_GROUPS))
    """Enabled stat groups (see `STAT_GROUPS`); a disabled group installs no hook and sends no
    metric. Any iterable of names is accepted and normalised to a frozenset."""

    n_mtp_losses: int | None = None
    """Slots for train/mtp_loss/1..N. None: ask the adapter (StepFlashAdapter reads
    model.config.mtp_depth). Extra losses given to step_end are counted and ignored."""

    max_logged_errors: int = 10
    """Telemetry errors are logged with a traceback this many times per call point, then only
    counted, so a persistent fault never floods the training log."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "groups", frozenset(self.groups))
        unknown = self.groups - set(STAT_GROUPS)
        if unknown:
            raise ValueError(
                f"MonitorConfig.groups: unknown stat group(s) {sorted(unknown)}; "
                f"choose from {list(STAT_GROUPS)}"
            )
        for name in ("param_norm_every", "buffer_steps", "buffer_bytes", "chunk_values"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MonitorConfig.{name} must be an int >= 1, got {value!r}")
        if self.chunk_values > MAX_CHUNK_VALUES:
            raise ValueError(
                f"MonitorConfig.chunk_values must be <= {MAX_CHUNK_VALUES} "
                f"(1 MiB of float32 per chunk), got {self.chunk_values}"
            )
        if self.full_policy not in FULL_POLICIES:
            raise ValueError(
                f"MonitorConfig.full_policy must be one of {FULL_POLICIES}, "
                f"got {self.full_policy!r}"
            )
        for name in (
            "block_timeout_s",
            "drop_log_interval_s",
            "backoff_initial_s",
            "backoff_max_s",
            "net_timeout_s",
            "close_timeout_s",
        ):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"MonitorConfig.{name} must be a finite number > 0, got {value!r}")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError(
                f"MonitorConfig.backoff_max_s ({self.backoff_max_s}) must be >= "
                f"backoff_initial_s ({self.backoff_initial_s})"
            )
        if self.n_mtp_losses is not None and (
            not isinstance(self.n_mtp_losses, int) or not 0 <= self.n_mtp_losses <= 16
        ):
            raise ValueError(
                f"MonitorConfig.n_mtp_losses must be None or an int in 0..16, "
                f"got {self.n_mtp_losses!r}"
            )
        if not isinstance(self.max_logged_errors, int) or self.max_logged_errors < 0:
            raise ValueError(
                f"MonitorConfig.max_logged_errors must be an int >= 0, "
                f"got {self.max_logged_errors!r}"
            )
