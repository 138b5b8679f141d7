"""One timed run of benchmarks/peers.py, in its own process: a tracker logs S steps of M scalars.

    python -m benchmarks.peers_run SYSTEM M S DIR      (started by benchmarks/peers.py)

The workload every tracker benchmark uses: one process logs S steps of M distinct named float
scalars (`moe/layer000/expert000/tokens`, ...), then its own flush/close. SYSTEM is one of
  stepwatch    hooks `Sender` (one rank: the M MetricSpecs registered once as the schema, then
               one float32 vector per step) streaming to a real `python -m collector serve`
               child writing Parquet under DIR/store; close returns once every step is
               acknowledged, i.e. durable
  wandb        WANDB_MODE=offline, `wandb.init` + `run.log({name: value, ...})` per step +
               `run.finish()`, everything under DIR, silent, system-metrics sampler off
  tensorboard  tensorboard's own `EventFileWriter`: one Event per step holding one Summary of M
               `simple_value`s (the efficient form: an Event per scalar is ~7x slower), then close
  np.save      the floor: each step's float32 vector to its own .npy file (no fsync)

Timed: from the first call that takes metric names (Sender construction, which registers the
schema; the first log) until close returns. Not timed ("setup"): starting the collector child
process, `wandb.init`. Every runner imports torch first (a training process has it; the hooks
package imports it anyway), so peak RSS compares the trackers on the same base.
Prints one JSON line: setup_s, log_s, close_s, cpu_s (user + system of this process and its
children over the timed window), rss_ready_mib (this process before the timed window) and,
on failure, error.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import psutil

RUN = "bench-peers"
SYSTEMS = ("stepwatch", "wandb", "tensorboard", "np.save")
EXPERTS_PER_LAYER = 256
# benchmarks/workload.py's per-expert stats and their reductions, not imported from there: that
# pulls in hooks/ and so torch, which the read-back processes (peers_check) do not need
EXPERT_STATS = (
    ("tokens", "sum"),
    ("gate_mass", "sum"),
    ("act_rms", "mean"),
    ("act_maxabs", "max"),
    ("out_norm", "mean"),
)


# ---- the workload -------------------------------------------------------------------------------
def metric_names(m: int) -> list[str]:
    """M distinct names in the project's key convention: per (layer, expert) expert stats."""
    return [f"moe/layer{l:03d}/expert{e:03d}/{stat}" for stat, _, l, e in labels(m)]


def labels(m: int) -> Iterator[tuple[str, str, int, int]]:
    """(stat, reduce, layer, expert) of each name of `metric_names(m)`, in order."""
    n_stats = len(EXPERT_STATS)
    for i in range(m):
        stat, reduce = EXPERT_STATS[i % n_stats]
        yield stat, reduce, i // (EXPERTS_PER_LAYER * n_stats), (i // n_stats) % EXPERTS_PER_LAYER


def base_values(m: int) -> np.ndarray:
    return (0.5 + np.random.default_rng(0).random(m)).astype(np.float32)


def step_values(base: np.ndarray, s: int) -> np.ndarray:
    """Step s's vector: a fresh array (a sender keeps it until acknowledged)."""
    return base * np.float32(1 + 1e-3 * s)


def tree_cpu_s() -> float:
    """User + system CPU seconds of this process and its live descendants."""
    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


class Timer:
    """The timed window: start() at the first named call, logged() after the last step,
    closed() when close returned."""

    def __init__(self) -> None:
        self.t = {"setup0": time.perf_counter()}

    def start(self) -> None:
        self.rss_ready = psutil.Process().memory_info().rss / 2**20
        self.cpu0 = tree_cpu_s()
        self.t["start"] = time.perf_counter()

    def logged(self) -> None:
        self.t["logged"] = time.perf_counter()

    def closed(self) -> dict:
        self.t["closed"] = time.perf_counter()
        t = self.t
        return {
            "setup_s": t["start"] - t["setup0"],
            "log_s": t["logged"] - t["start"],
            "close_s": t["closed"] - t["logged"],
            "cpu_s": tree_cpu_s() - self.cpu0,
            "rss_ready_mib": self.rss_ready,
        }


# ---- stepwatch ----------------------------------------------------------------------------------
class _Ready:
    """Stands in for hooks.stats.HostVector: the values are already on the host."""

    __slots__ = ("_v",)

    def __init__(self, v: np.ndarray) -> None:
        self._v = v

    def materialize(self) -> np.ndarray:
        return self._v


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


class _Watch:
    """Beside close(): a stream that errors and makes no progress for grace_s is a failure,
    not a reason to wait for close's timeout; then the sender is stopped (close returns) and
    `why` says so."""

    def __init__(self, sender, timeout_s: float, grace_s: float = 5.0) -> None:
        self.why: str | None = None
        self._sender, self._grace_s = sender, grace_s
        self._deadline = time.monotonic() + timeout_s
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        errors_at = None
        while not self._done.wait(0.05):
            st = self._sender.stats()
            if st["buffered_steps"] == 0 and st["unacked_frames"] == 0:
                continue  # all acked: close() is saying goodbye
            n_err = st.get("stream_errors", 0) + st.get("server_errors", 0)
            now = time.monotonic()
            if n_err and errors_at is None:
                errors_at = now
            if errors_at is not None and now - errors_at > self._grace_s:
                self.why = f"{n_err} stream/server error(s), {st['buffered_steps']} step(s) unacked"
            elif now > self._deadline:
                self.why = f"not acknowledged in time: {st['buffered_steps']} step(s)"
            if self.why:
                self._sender._fail("BENCHMARK", self.why)  # close() returns False at once
                return

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def run_stepwatch(names: list[str], base: np.ndarray, steps: int, out: Path, timer: Timer) -> dict:
    from collector.process import start_collector, stop_collector
    from hooks import frames
    from hooks.buffer import StepItem
    from hooks.config import MonitorConfig
    from hooks.layout import STEP_SCHEMA_ID, MetricSpec
    from hooks.sender import Sender

    specs = [
        MetricSpec(n, reduce, stat, layer, expert)
        for n, (stat, reduce, layer, expert) in zip(names, labels(len(names)))
    ]
    warnings = _Warnings()
    client_log = logging.getLogger("stepwatch")  # hooks log as stepwatch.hooks
    client_log.setLevel(logging.WARNING)
    client_log.addHandler(warnings)
    log_path = out / "collector.log"
    proc, address = start_collector(f"parquet:{out / 'store'}", "--insecure", log_path=log_path)
    extra: dict = {}
    try:
        cfg = MonitorConfig(
            full_policy="block",  # never drop a step: the workload is S steps, all stored
            block_timeout_s=600.0,
            net_timeout_s=120.0,  # a loaded 2-core machine may take long to ack a big step
            close_timeout_s=600.0,
        )
        timer.start()
        sender = Sender(
            address, frames.Identity(RUN, 0, 1), [(STEP_SCHEMA_ID, specs)], cfg, run_config={}
        )
        for s in range(steps):
            v = step_values(base, s)
            sender.submit(
                StepItem(s, _Ready(v), [(STEP_SCHEMA_ID, base.size)], wall_time=time.time())
            )
        timer.logged()
        # close() returns once every step is acknowledged (durable) and the stream ended OK;
        # it says goodbye as soon as everything is sent, so the collector flushes at once.
        # The watch ends it early when the stream keeps failing.
        watch = _Watch(sender, cfg.close_timeout_s)
        flushed = sender.close(cfg.close_timeout_s)
        extra = timer.closed()
        watch.stop()
        stats = sender.stats()
        extra["sender"] = {k: v for k, v in stats.items() if isinstance(v, int)}
        if watch.why or not flushed:
            extra["error"] = watch.why or "close: not every step acknowledged"
    finally:
        rc = stop_collector(proc, timeout_s=300)
    client_log.removeHandler(warnings)
    if "error" in extra:  # the client's first warning and the collector's errors say why
        log_errors = [
            ln.strip()
            for ln in log_path.read_text(errors="replace").splitlines()
            if any(k in ln for k in ("WARNING", "ERROR", "rejected"))
        ]
        extra["error"] += ": " + (warnings.messages + log_errors + ["-"])[0].split(" INFO ")[-1]
    extra["collector_exit"] = rc
    return extra


# ---- the peers ----------------------------------------------------------------------------------
def run_wandb(names: list[str], base: np.ndarray, steps: int, out: Path, timer: Timer) -> dict:
    os.environ.update(WANDB_MODE="offline", WANDB_DIR=str(out), WANDB_SILENT="true")
    import wandb

    settings = wandb.Settings(silent=True, console="off", x_disable_stats=True, x_disable_meta=True)
    run = wandb.init(project="stepwatch-peers", dir=str(out), settings=settings)
    timer.start()
    for s in range(steps):
        run.log(dict(zip(names, step_values(base, s).tolist())), step=s)
    timer.logged()
    run.finish()
    return timer.closed()


def run_tensorboard(
    names: list[str], base: np.ndarray, steps: int, out: Path, timer: Timer
) -> dict:
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    writer = EventFileWriter(str(out))
    Value = summary_pb2.Summary.Value
    timer.start()
    for s in range(steps):
        vals = step_values(base, s).tolist()
        summary = summary_pb2.Summary(
            value=[Value(tag=n, simple_value=x) for n, x in zip(names, vals)]
        )
        writer.add_event(event_pb2.Event(wall_time=time.time(), step=s, summary=summary))
    timer.logged()
    writer.close()
    return timer.closed()


def run_floor(names: list[str], base: np.ndarray, steps: int, out: Path, timer: Timer) -> dict:
    timer.start()
    for s in range(steps):
        np.save(out / f"step-{s:06d}.npy", step_values(base, s))
    timer.logged()
    return timer.closed()


RUNNERS: dict[str, Callable[[list[str], np.ndarray, int, Path, Timer], dict]] = {
    "stepwatch": run_stepwatch,
    "wandb": run_wandb,
    "tensorboard": run_tensorboard,
    "np.save": run_floor,
}


def main(argv: list[str]) -> int:
    system, m, steps, out = argv[0], int(argv[1]), int(argv[2]), Path(argv[3])
    import torch  # noqa: F401 - the training process every tracker lives in has torch loaded

    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    names, base = metric_names(m), base_values(m)  # the caller's data: not timed
    timer = Timer()
    try:
        result = RUNNERS[system](names, base, steps, out, timer)
    except Exception as exc:  # noqa: BLE001 - a failed run is a row of the table, not a crash
        result = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
