"""One agent-host process: K real node agents (collector/agent.py) on one event loop.

    python -m benchmarks.agents ARGS_JSON        (started by benchmarks/ingest.py --agents)

Each agent is a whole `NodeAgent`: its own gRPC server on its own unix socket, its own
upstream channel (a private subchannel pool, so its own TCP connection) and its own
multiplexed stream to the collector, exactly what `python -m collector agent` runs on a host;
only the process is shared, so 64 "hosts" fit on two cores. ARGS_JSON: upstream, dir, count.

Protocol with the parent, one JSON line each on stdout: {"ready": [unix targets]} once every
agent streams upstream; then one line on stdin (anything, or EOF) stops them and it prints
{"result": {counter: total over its agents}, "cpu_s": CPU seconds of this process}.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import sys
import time

from collector.agent import AgentConfig, NodeAgent


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def host(a: dict) -> int:
    agents = [
        NodeAgent(AgentConfig(upstream=a["upstream"], insecure=True)) for _ in range(a["count"])
    ]
    targets = [
        await ag.start(f"unix:{a['dir']}/agent{a['first'] + i}.sock") for i, ag in enumerate(agents)
    ]
    deadline = time.monotonic() + 120
    while not all(ag.up is not None for ag in agents):
        if time.monotonic() > deadline:
            emit({"error": "agents not connected upstream after 120 s"})
            return 1
        await asyncio.sleep(0.05)
    emit({"ready": targets})
    cpu0 = time.process_time()
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    cpu = time.process_time() - cpu0
    total: collections.Counter = collections.Counter()
    for ag in agents:
        total.update(ag.counters.snapshot())
    await asyncio.gather(*(ag.stop(0.5) for ag in agents))
    emit({"result": dict(total), "cpu_s": cpu})
    return 0


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    return asyncio.run(host(json.loads(argv[0])))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
