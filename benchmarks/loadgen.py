"""One load-generator process: a group of simulated ranks, each with its own hooks Sender.

    python -m benchmarks.loadgen ARGS_JSON        (started by benchmarks/ingest.py)

Every rank gets the real client sender (hooks.sender.Sender: its own gRPC channel and
bidirectional stream, bounded buffer, resend, acks), exactly what `Monitor` builds for a
training process; only the device capture is replaced by `workload.Values`. Ranks share this
process to fit thousands of them on two cores, never a stream.

Protocol with the parent, one JSON line each on stdout: {"ready": ...} once every rank is
connected (schemas registered), then it waits for one line on stdin ("go"), plays the steps,
closes every sender (waits for the acks) and prints {"result": ...}.

Flow control: a step is submitted once every rank here has fewer than `depth` steps
unacknowledged (the pipeline's backpressure, timed apart as waiting), so `submit` never blocks.
Measured here, per process, in CPU seconds: value generation (the stand-in for the model, not
telemetry), the training thread's time inside `Sender.submit` per rank-step, serialization
(`frames.step_frames`, wrapped) and this process's CPU time minus generation: the whole
client-side telemetry cost, which a real rank spends on its background thread.
"""
from __future__ import annotations

import collections
import json
import logging
import sys
import threading
import time

import numpy as np

from benchmarks.workload import Values, Workload
from hooks import frames
from hooks.buffer import StepItem
from hooks.config import MonitorConfig
from hooks.sender import Sender

_serialize_s: dict[int, float] = collections.defaultdict(float)   # per sender thread
_step_frames = frames.step_frames


def _timed_step_frames(*args, **kw):
    t0 = time.perf_counter()
    try:
        return _step_frames(*args, **kw)
    finally:
        _serialize_s[threading.get_ident()] += time.perf_counter() - t0


frames.step_frames = _timed_step_frames     # the sender calls frames.step_frames(...)


class _Ready:
    """Stands in for hooks.stats.HostVector: the values are already on the host."""
    __slots__ = ("_v",)

    def __init__(self, v: np.ndarray) -> None:
        self._v = v

    def materialize(self) -> np.ndarray:
        return self._v


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main(argv: list[str]) -> int:
    a = json.loads(argv[0])
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    w = Workload(a["world"], a["metrics_per_rank"], a["n_layers"], a["n_experts"],
                 spike_step=a["spike_step"], death_step=a["death_step"])
    values = Values(w)
    ranks = range(a["rank_lo"], a["rank_hi"])
    cfg = MonitorConfig(buffer_steps=a["depth"] + 1, full_policy="block", block_timeout_s=600.0,
                        net_timeout_s=120.0, close_timeout_s=600.0)
    clips: list[tuple[float, int, int]] = []          # (arrival wall time, current step, rank)
    current = [-1]

    def on_clip(rank: int):
        return lambda update: clips.append((time.time(), current[0], rank))

    senders: list[Sender] = []
    specs_by_group: dict[int, list] = {}
    for r in ranks:
        specs = specs_by_group.setdefault(w.group(r), w.specs(r))   # one list per EP group
        ident = frames.Identity(a["run"], r, w.world)
        senders.append(Sender(a["target"], ident, w.schemas(specs), cfg,
                              run_config={"bench": "ingest"}, on_clip=on_clip(r)))
    layout = {r: [(sid, len(sp)) for sid, sp in w.schemas(specs_by_group[w.group(r)])]
              for r in ranks}
    deadline = time.monotonic() + a["connect_timeout_s"]
    while not all(s.stats()["connected"] for s in senders):
        if time.monotonic() > deadline:
            emit({"error": f"ranks not connected after {a['connect_timeout_s']} s"})
            return 1
        time.sleep(0.05)
    emit({"ready": len(senders)})
    if sys.stdin.readline().strip() != "go":
        return 1

    gen_s = submit_s = wait_s = 0.0
    submitted_at: list[float] = []
    cpu0, t_start = time.process_time(), time.time()
    for s in range(a["steps"]):
        current[0] = s
        t0 = time.perf_counter()        # flow control: at most `depth` steps unacknowledged,
        for sender in senders:          # so submit never blocks and measures only its own cost
            with sender.buffer.cond:
                sender.buffer.cond.wait_for(lambda b=sender.buffer: b.buffered() < a["depth"])
        wait_s += time.perf_counter() - t0
        submitted_at.append(time.time())
        for r, sender in zip(ranks, senders):
            t0 = time.thread_time()     # CPU: the other processes share the cores
            v = values.step(r, s)
            t1 = time.thread_time()
            sender.submit(StepItem(s, _Ready(v), layout[r], wall_time=time.time()))
            gen_s += t1 - t0
            submit_s += time.thread_time() - t1
    current[0] = a["steps"]
    flushed = all([s.close(cfg.close_timeout_s) for s in senders])
    t_end = time.time()
    cpu = time.process_time() - cpu0
    stats = collections.Counter()
    for s in senders:
        stats.update({k: v for k, v in s.stats().items() if isinstance(v, int)
                      and not isinstance(v, bool)})
    emit({"result": {
        "ranks": len(senders), "steps": a["steps"], "flushed": flushed,
        "t_start": t_start, "t_end": t_end, "submitted_at": submitted_at,
        "gen_s": gen_s, "submit_s": submit_s, "wait_s": wait_s, "serialize_s": sum(_serialize_s.values()),
        "cpu_s": cpu, "clips": clips,
        "dropped_steps": stats["dropped_steps"], "frames_resent": stats["frames_resent"],
        "stream_errors": stats["stream_errors"]}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
