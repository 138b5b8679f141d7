"""One load-generator process: a group of simulated ranks, each with its own sender.

    python -m benchmarks.loadgen ARGS_JSON        (started by benchmarks/ingest.py)

Every rank gets the real client sender protocol (hooks/sender/core.py: its own bidirectional
stream, bounded buffer, seq, resend, acks), what `Monitor` builds for a training process; only
the device capture is replaced by `workload.Values`. To fit thousands of ranks on two cores, the
senders are `ChannelSender`s (benchmarks/channel_sender.py): one asyncio loop, one gRPC channel
per `ranks_per_channel` ranks (each channel its own TCP connection), no thread per rank; each
rank still has its own stream.
The values of all ranks of a step come from one `Values.steps` matrix (a row per rank).

Protocol with the parent, one JSON line each on stdout: {"ready": ...} once every rank is
connected (schemas registered), then it waits for one line on stdin ("go"), plays the steps,
closes every sender (waits for the acks) and prints {"result": ...}.

Flow control: a step is submitted once every rank here has fewer than `depth` steps
unacknowledged (the pipeline's backpressure, timed apart as waiting), so `submit` never blocks.
Measured here, per process, in CPU seconds: value generation (the stand-in for the model, not
telemetry), the time inside `ChannelSender.submit`, serialization (`frames.step_frames`,
wrapped) and this process's CPU time (every thread, gRPC's included) minus generation: the
whole client-side telemetry cost, which a real rank spends on its background thread.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import sys
import time

import grpc
import numpy as np

from benchmarks.channel_sender import ChannelSender
from benchmarks.workload import Values, Workload
from collector import gcpolicy
from hooks import frames
from hooks.buffer import StepItem
from hooks.config import MonitorConfig

CONNECT_BATCH = 256  # ranks that open their streams together
_serialize_s = [0.0]  # every sender runs on this process's one event-loop thread
_step_frames = frames.step_frames


def _timed_step_frames(*args, **kw):
    t0 = time.thread_time()
    try:
        return _step_frames(*args, **kw)
    finally:
        _serialize_s[0] += time.thread_time() - t0


frames.step_frames = _timed_step_frames  # the sender calls frames.step_frames(...)


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


def channels(target: str, n: int) -> list[grpc.aio.Channel]:
    """n channels, each its own connection (a private subchannel pool: grpc would otherwise
    share one connection between channels with the same target and options)."""
    options = [("grpc.max_send_message_length", 8 << 20), ("grpc.use_local_subchannel_pool", 1)]
    return [grpc.aio.insecure_channel(target, options=options) for _ in range(n)]


async def play(a: dict) -> int:
    w = Workload(
        a["world"],
        a["metrics_per_rank"],
        a["n_layers"],
        a["n_experts"],
        spike_step=a["spike_step"],
        death_step=a["death_step"],
    )
    values = Values(w)
    ranks = range(a["rank_lo"], a["rank_hi"])
    cfg = MonitorConfig(
        buffer_steps=a["depth"] + 1,
        full_policy="block",
        block_timeout_s=600.0,
        net_timeout_s=120.0,
        close_timeout_s=600.0,
    )
    per_channel = a.get("ranks_per_channel", 512)
    agents = a.get("agent_targets")  # node agents: rank r streams to agents[r // per_agent]
    if agents:
        per_agent = a["ranks_per_agent"]
        used = sorted({r // per_agent for r in ranks})
        by_agent = dict(zip(used, (channels(agents[i], 1)[0] for i in used)))
        target_of = lambda r: agents[r // per_agent]
        chan_of = lambda i, r: by_agent[r // per_agent]
    else:
        chans = channels(a["target"], -(-len(ranks) // per_channel))
        target_of = lambda r: a["target"]
        chan_of = lambda i, r: chans[i // per_channel]
    clips: list[tuple[float, int, int]] = []  # (arrival wall time, current step, rank)
    current = [-1]

    def on_clip(rank: int):
        return lambda update: clips.append((time.time(), current[0], rank))

    senders: list[ChannelSender] = []
    schemas_by_group: dict[int, list] = {}
    deadline = time.monotonic() + a["connect_timeout_s"]
    for i, r in enumerate(ranks):
        g = w.group(r)
        if g not in schemas_by_group:  # one list per EP group
            schemas_by_group[g] = w.schemas(w.specs(r))
        senders.append(
            ChannelSender(
                target_of(r),
                frames.Identity(a["run"], r, w.world),
                schemas_by_group[g],
                cfg,
                run_config={"bench": "ingest"},
                on_clip=on_clip(r),
                channel=chan_of(i, r),
            )
        )
        if a.get("collectors"):  # a tier's share: contiguous rank ranges here, not rank % N,
            senders[-1]._hello.hello.collectors = a["collectors"]  # so not from the target list
        if len(senders) % CONNECT_BATCH == 0 or len(senders) == len(ranks):
            # a few hundred streams opening at once is fine; thousands get INTERNAL errors
            while not all(s.stats()["connected"] for s in senders[-CONNECT_BATCH:]):
                if time.monotonic() > deadline:
                    emit({"error": f"ranks not connected after {a['connect_timeout_s']} s"})
                    return 1
                await asyncio.sleep(0.02)
    layout = [[(sid, len(sp)) for sid, sp in schemas_by_group[w.group(r)]] for r in ranks]
    # thousands of ranks' senders share this process's heap and its cyclic collector: space
    # its passes as the collector does (collector/gcpolicy.py), or a rank's share of telemetry
    # CPU here would be mostly this process's garbage collection, not what a rank pays
    gcpolicy.tune()
    emit({"ready": len(senders)})
    go = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    if go.strip() != "go":
        return 1

    gen_s = submit_s = wait_s = 0.0
    submitted_at: list[float] = []
    cpu0, t_start = time.process_time(), time.time()
    for s in range(a["steps"]):
        current[0] = s
        t0 = time.perf_counter()  # flow control: at most `depth` steps unacknowledged,
        for sender in senders:  # so submit never blocks and measures only its own cost
            await sender.wait_space(a["depth"])
        wait_s += time.perf_counter() - t0
        submitted_at.append(time.time())
        t0 = time.thread_time()  # CPU: the other processes share the cores
        block = values.steps(ranks, s)
        t1 = time.thread_time()
        now = time.time()
        for i, sender in enumerate(senders):
            sender.submit(StepItem(s, _Ready(block[i]), layout[i], wall_time=now))
        gen_s += t1 - t0
        submit_s += time.thread_time() - t1
        await asyncio.sleep(0)  # let the senders' tasks send while the next step waits
    current[0] = a["steps"]
    flushed = all(await asyncio.gather(*(s.aclose(cfg.close_timeout_s) for s in senders)))
    t_end = time.time()
    cpu = time.process_time() - cpu0
    for c in {id(c): c for c in (chan_of(i, r) for i, r in enumerate(ranks))}.values():
        await c.close()
    stats = collections.Counter()
    for s in senders:
        stats.update(
            {k: v for k, v in s.stats().items() if isinstance(v, int) and not isinstance(v, bool)}
        )
    emit(
        {
            "result": {
                "ranks": len(senders),
                "steps": a["steps"],
                "flushed": flushed,
                "t_start": t_start,
                "t_end": t_end,
                "submitted_at": submitted_at,
                "gen_s": gen_s,
                "submit_s": submit_s,
                "wait_s": wait_s,
                "serialize_s": _serialize_s[0],
                "cpu_s": cpu,
                "clips": clips,
                "dropped_steps": stats["dropped_steps"],
                "frames_resent": stats["frames_resent"],
                "stream_errors": stats["stream_errors"],
            }
        }
    )
    return 0


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    return asyncio.run(play(json.loads(argv[0])))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
