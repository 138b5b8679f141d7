"""`Monitor`: the object a training loop holds (`NullMonitor`, hooks/null.py: the same calls,
doing nothing).

    mon = Monitor(model, optimizer, target="collector:7070", run="exp42")
    for step in ...:
        mon.step_begin(step)                     # applies staged clip updates, resets stats
        loss = ...; loss.backward()
        mon.before_optimizer(step, grad_norm)    # grads final: grad norms (+ param snapshot)
        optimizer.step()
        mon.step_end(step, loss=loss, mtp_losses=[...], lr=lr, tokens=n)
    mon.close()

    mon.log({"eval/loss": v}, step=s)            # the user's own scalars (hooks/userlog.py)
    with mon.paused(): model.generate(...)       # forwards that are not training

Construction and attach validate everything and raise a clear error (that is the user's code:
a model no shipped adapter fits names the supported families); so does `log` for a bad name
or value. After that, every call point is wrapped: a telemetry failure is logged (a few times)
and counted in `stats()`, never raised into the training loop. Only training forwards count
into a step's statistics: eval-mode, no_grad and paused forwards are left out (hooks/stats.py).
A collector that refuses the client for good (a wrong token, a schema over its bounds) ends
telemetry with one logged error, also in `stats()['fatal_error']`; training goes on.

Secrets never have to be on a command line: `token` defaults to $STEPWATCH_TOKEN, else the file
$STEPWATCH_TOKEN_FILE names (or `token_file=`); TLS is `tls=True` (system roots) or
`tls_ca="ca.pem"` (else $STEPWATCH_TLS_CA), or any grpc `credentials=`.

Monitor and NullMonitor have the call points of the loop's interface (model/monitoring.py
`TrainingMonitor`) structurally: hooks/ never imports model/.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import math
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from hooks import frames
from hooks.adapter import MoEAdapter
from hooks.adapters import select_adapter
from hooks.buffer import StepItem
from hooks.clips import ClipStager
from hooks.config import MonitorConfig
from hooks.gradstats import GradCapture
from hooks.layout import (
    HOST_SLOTS,
    PERIODIC_SCHEMA_ID,
    STEP_SCHEMA_ID,
    ModelShape,
    RegionKey,
    build_layout,
)
from hooks.sender import Sender
from hooks.stats import Capture
from hooks.userlog import UserScalars
from proto import auth

log = logging.getLogger("stepwatch.hooks")
RUN_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
TARGET_RE = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(\d{1,5})$")


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit values, else torch.distributed when initialised, else $RANK/$WORLD_SIZE, else
    0/1."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        auto_rank, auto_ws = dist.get_rank(), dist.get_world_size()
    else:
        try:
            auto_rank = int(os.environ.get("RANK", "0"))
            auto_ws = int(os.environ.get("WORLD_SIZE", "1"))
        except ValueError:
            raise ValueError(
                f"RANK={os.environ.get('RANK')!r} / WORLD_SIZE="
                f"{os.environ.get('WORLD_SIZE')!r} must be integers"
            ) from None
    rank = auto_rank if rank is None else rank
    world_size = auto_ws if world_size is None else world_size
    if not (isinstance(rank, int) and isinstance(world_size, int) and 0 <= rank < world_size):
        raise ValueError(
            f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}"
        )
    return rank, world_size


def _guarded(fn):
    """Call-point wrapper: telemetry errors are logged and counted, never raised."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            self._error(fn.__name__, exc)
            return None

    return wrapper


def check_targets(target: str | list[str] | tuple[str, ...]) -> str:
    """'HOST:PORT' (or 'unix:PATH'), or several: a comma-separated string or a list, the
    collectors of a tier (rank r prefers entry r % len, and fails over to the next).
    Returns them as one comma-separated string; ValueError says which entry is off."""
    parts = target.split(",") if isinstance(target, str) else list(target)
    if not parts or not all(isinstance(t, str) for t in parts):
        raise ValueError(f"target must be 'HOST:PORT' (or 'unix:PATH'), got {target!r}")
    for t in parts:
        m = TARGET_RE.match(t)
        if not (m or t.startswith("unix:")):
            raise ValueError(f"target must be 'HOST:PORT' (or 'unix:PATH'), got {t!r}")
        if m and not 0 < int(m.group(1)) < 65536:
            raise ValueError(f"target port out of range in {t!r}")
    return ",".join(parts)


class Monitor:
    def __init__(
        self,
        model: nn.Module | None = None,
        optimizer: Any = None,
        *,
        target: str | list[str] | tuple[str, ...],
        run: str,
        rank: int | None = None,
        world_size: int | None = None,
        token: str | None = None,
        config: MonitorConfig | None = None,
        adapter: MoEAdapter | None = None,
        run_config: dict | None = None,
        credentials: Any = None,
        token_file: str | os.PathLike | None = None,
        tls: bool = False,
        tls_ca: str | os.PathLike | None = None,
    ) -> None:
        target = check_targets(target)
        if not isinstance(run, str) or not RUN_RE.match(run):
            raise ValueError(f"run name {run!r} must match {RUN_RE.pattern}")
        if token is not None:
            auth.check_token(token)
        token = auth.read_secret(token, token_file)  # else $STEPWATCH_TOKEN(_FILE)
        if credentials is None:
            credentials = auth.client_credentials(tls, tls_ca)  # else $STEPWATCH_TLS_CA
        if config is not None and not isinstance(config, MonitorConfig):
            raise TypeError(f"config must be a MonitorConfig, got {type(config).__name__}")
        self.target, self.run, self.token = target, run, token
        self.rank, self.world_size = resolve_rank(rank, world_size)
        self.config = config or MonitorConfig()
        self.run_config = dict(run_config or {})
        self._adapter_arg, self._credentials = adapter, credentials
        self.model: nn.Module | None = None
        self.optimizer = optimizer
        self._counters: collections.Counter = collections.Counter()
        self._lock = threading.Lock()
        self.clips: ClipStager | None = None
        self._step: int | None = None
        self._t0: float | None = None
        self._periodic = False
        self.sender: Sender | None = None
        self._closed = False
        self.user: UserScalars | None = None
        if model is not None:
            self._attach(model, optimizer)  # bad models fail here, loudly

    # ------------------------------------------------------------------ attach
    def attach(self, model: nn.Module, optimizer: Any = None) -> None:
        """Idempotent: the loop may call it on a Monitor that attached at construction. Raises
        for a model no shipped adapter fits (naming the supported families) or a second model:
        before step 0 that is configuration, not telemetry."""
        self._attach(model, optimizer)

    def _attach(self, model: nn.Module, optimizer: Any) -> None:
        if optimizer is not None:
            self.optimizer = optimizer
        if self.model is not None:
            if model is not self.model:
                raise ValueError(
                    "Monitor is already attached to another model; create one Monitor per model"
                )
            return
        adapter = self._adapter_arg or select_adapter(model)
        n_mtp = self.config.n_mtp_losses
        shape = ModelShape(
            n_layers=len(adapter.residual_blocks()),
            moe=[(s.layer, s.n_experts) for s in adapter.moe_sites()],
            shared=[s.layer for s in adapter.moe_sites() if s.shared_probe is not None],
            attn=[(s.layer, s.n_heads) for s in adapter.attention_sites()],
            has_output_head=adapter.output_head() is not None,
            n_mtp=adapter.n_mtp() if n_mtp is None else n_mtp,
            biased=[s.layer for s in adapter.moe_sites() if s.expert_bias is not None],
        )
        self.layout = build_layout(shape, self.config.groups)
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        self.capture = Capture(adapter, self.layout, device, on_error=self._error)
        self.grads = GradCapture(model, adapter, self.capture)
        self.adapter, self.model = adapter, model
        self.capture.install()
        host = self.layout.region(RegionKey.TRAIN_HOST)
        self._host_idx = (
            np.arange(host.start, host.stop) if host is not None else np.zeros(0, np.int64)
        )
        schemas = [
            (sid, specs)
            for sid, specs in (
                (STEP_SCHEMA_ID, self.layout.step_specs),
                (PERIODIC_SCHEMA_ID, self.layout.periodic_specs),
            )
            if specs
        ]
        hello_config = {
            **self.run_config,
            "model": adapter.describe(),
            "monitor": {
                "param_norm_every": self.config.param_norm_every,
                "groups": sorted(self.config.groups),
                "n_step_metrics": self.layout.n_step,
                "n_periodic_metrics": self.layout.n_periodic,
            },
        }
        self.clips = ClipStager(adapter, self._send_clip_ack, self._error)
        reserved = {spec.name for spec in self.layout.step_specs + self.layout.periodic_specs}
        self.user = UserScalars(reserved, self._add_schema, self._bump, self._warn_once)
        self.sender = Sender(
            self.target,
            frames.Identity(self.run, self.rank, self.world_size),
            schemas,
            self.config,
            token=self.token,
            run_config=hello_config,
            on_clip=self.clips.stage,
            credentials=self._credentials,
        )

    def _send_clip_ack(self, step: int, version: int) -> None:
        assert self.sender is not None  # clip updates arrive through the sender
        self.sender.submit_clip_ack(step, version)

    def _add_schema(self, schema_id: int, specs: list) -> None:
        assert self.sender is not None  # attached
        self.sender.add_schema(schema_id, specs)

    # ------------------------------------------------------------------ loop call points
    @_guarded
    def step_begin(self, step: int) -> None:
        if self.model is None:
            raise RuntimeError("step_begin before attach(model)")
        assert self.clips is not None  # attached
        self.clips.apply(step)  # staged updates take effect for this step
        self.capture.reset()
        self._step, self._t0 = step, time.perf_counter()
        self._periodic = "params" in self.config.groups and step % self.config.param_norm_every == 0
        self.capture.capturing = True

    @_guarded
    def before_optimizer(self, step: int, grad_norm: torch.Tensor | float | None = None) -> None:
        if self.model is None:
            return
        self._check_step(step)
        self.grads.before_optimizer(grad_norm, self._periodic)

    @_guarded
    def step_end(
        self,
        step: int,
        loss: torch.Tensor | float | None = None,
        mtp_losses: Iterable[torch.Tensor | float] | None = None,
        lr: float | None = None,
        tokens: int | None = None,
    ) -> None:
        if self.model is None:
            return
        self.capture.capturing = False
        t0, self._t0 = self._t0, None
        if t0 is None:  # no step_begin: the buffer holds the previous step
            self._bump("step_end_without_begin")
            log.warning("stepwatch: step_end(%s) without step_begin; step not sent", step)
            return
        self._check_step(step)
        step_time = time.perf_counter() - t0
        periodic = self._periodic and self._step == step
        self.grads.after_step(periodic)
        self.capture.finalize()
        mtp = list(mtp_losses or ())
        mtp_slots = self.layout.region(RegionKey.TRAIN_MTP)
        n_mtp = mtp_slots.size if mtp_slots is not None else 0
        if len(mtp) > n_mtp:
            self._bump("mtp_losses_ignored", len(mtp) - n_mtp)
        elif len(mtp) < n_mtp and not self._counters.get("mtp_losses_missing"):
            self._bump("mtp_losses_missing")
            log.info(
                "stepwatch: step_end got %d MTP loss(es) for the model's %d; "
                "train/mtp_loss/%d.. are sent as NaN (not given, no finding). Pass them in "
                "mtp_losses=, or MonitorConfig(n_mtp_losses=%d) to leave the slots out",
                len(mtp),
                n_mtp,
                len(mtp) + 1,
                len(mtp),
            )
        self.capture.write_loop_values(loss, mtp)
        n = self.layout.n_step + (self.layout.n_periodic if periodic else 0)
        vector = self.capture.to_host(n)
        if lr is None and self.optimizer is not None:
            lr = self.optimizer.param_groups[0].get("lr")
        lr = math.nan if lr is None else float(lr)
        if tokens is None and self.capture.tokens_seen:  # counted by the first MoE router
            tokens = self.capture.tokens_seen
        tok = math.nan if tokens is None else float(tokens)
        assert self.sender is not None  # attached
        host = {
            "lr": lr,
            "step_time": step_time,
            "tokens": tok,
            "tokens_per_s": tok / step_time if step_time > 0 else math.nan,
            "dropped_steps": float(self.sender.buffer.counters["dropped_steps"]),
        }
        schemas = [(STEP_SCHEMA_ID, self.layout.n_step)] if self.layout.n_step else []
        if periodic and self.layout.n_periodic:
            schemas.append((PERIODIC_SCHEMA_ID, self.layout.n_periodic))
        assert self.user is not None  # attached
        user = self.user.for_step(step, self.sender.submit)
        if user is not None:
            schemas += user[0]
        self.sender.submit(
            StepItem(
                step=step,
                vector=vector,
                schemas=schemas,
                wall_time=time.time(),
                patch_idx=self._host_idx,
                patch_vals=np.array(
                    [host[k] for k in HOST_SLOTS][: len(self._host_idx)], dtype=np.float32
                ),
                user=None if user is None else user[1],
            )
        )
        self._bump("steps")

    # ------------------------------------------------------------------ the user's own
    def log(
        self,
        metrics: Mapping[str, Any],
        step: int | None = None,
        reduce: str | Mapping[str, str] = "mean",
    ) -> None:
        """The user's scalars (numbers or 1-element tensors) at `step`: the open step when
        None, between steps the next one. `reduce` (one op or one per name, default mean) is
        how ranks combine; a name keeps the op of its first use. They travel with that step
        and are stored and shown like any metric (hooks/userlog.py). Raises ValueError /
        TypeError for a bad name, value or op."""
        if self.user is None:
            raise RuntimeError("log() before attach(model)")
        self.user.log(metrics, step, reduce, self._step if self._t0 is not None else None)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Forwards inside are not training (evaluation, generation, probing); nests."""
        capture = getattr(self, "capture", None)
        before = capture.paused if capture is not None else False
        if capture is not None:
            capture.paused = True
        try:
            yield
        finally:
            if capture is not None:
                capture.paused = before

    def _warn_once(self, message: str) -> None:
        key = f"warned:{message[:48]}"
        self._bump(key)
        if self._counters[key] == 1:
            log.warning("stepwatch: %s", message)

    def _check_step(self, step: int) -> None:
        if step != self._step:
            self._bump("step_mismatch")
            if self._counters["step_mismatch"] == 1:
                log.warning("stepwatch: step %s does not match step_begin(%s)", step, self._step)

    @_guarded
    def close(self, timeout: float | None = None) -> None:
        """Remove the hooks and flush buffered steps for up to `timeout` seconds (default
        config.close_timeout_s). Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self.model is not None:
            self.capture.remove()
            self.grads.release()
            if self.user is not None and self.sender is not None:
                self.user.flush(self.sender.submit)  # logged for steps that never ran
            release = getattr(self.adapter, "release", None)
            if callable(release):
                release()  # the adapter restores what it changed in the model
        if self.sender is not None:
            self.sender.close(self.config.close_timeout_s if timeout is None else timeout)

    def stats(self) -> dict:
        """Counters: the sender's (steps sent, drops, reconnects...), errors per call point,
        clip updates applied, device-to-host copies."""
        with self._lock:
            out = dict(self._counters)
        if self.sender is not None:
            out.update(self.sender.stats())
        if self.model is not None:
            out["host_copies"] = self.capture.host_copies
            assert self.clips is not None  # attached
            out.update(self.clips.stats())
        return out

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ errors
    def _bump(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counters[key] += n

    def _error(self, where: str, exc: BaseException) -> None:
        with self._lock:
            self._counters[f"errors_{where}"] += 1
            self._counters["errors"] += 1
            count = self._counters[f"errors_{where}"]
        if count <= self.config.max_logged_errors:
            log.error(
                "stepwatch: telemetry error in %s (training continues)",
                where,
                exc_info=(type(exc), exc, exc.__traceback__),
            )
