"""`python -m collector serve --workers N`: a collector tier on one host.

    this process       the coordinator (coordinator.py) on a loopback port of its own,
                       writing --store (reduced rows, events, clips, the dictionary, runs)
    N child processes  `serve --coordinator 127.0.0.1:C --port PORT+i`, worker i writing
                       --worker-store with {worker} = i (raw vectors); spool DIR-worker{i}

Rank-sharded ports, not one shared port: a rank's Monitor gets the list
"HOST:PORT,HOST:PORT+1,..." and prefers entry rank % N (hooks/sender/threaded.py), so each
worker's barrier holds whole ranks and the load splits evenly; when its worker is away the
rank moves to the next entry. Once every worker listens this process prints
`collector listening on HOST:PORT store=URL` (the first worker: process.py's handshake) and
`collector tier addresses A,B,...` (the list for the ranks). SIGTERM stops the workers first
(each drains its ranks' steps through the coordinator), then the coordinator.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from collector.config import CollectorConfig, default_spool_dir
from collector.coordinator import Coordinator
from collector.process import start_collector, stop_collector, terminate
from collector.tierwire import CoordinatorServer

log = logging.getLogger("collector.workers")


def worker_store(store: str, template: str | None, i: int) -> str:
    """Worker i's store URL: the template with {worker}, else a folder per worker under a
    Parquet store, else (ClickHouse, memory) the --store itself."""
    if template:
        return template.replace("{worker}", str(i))
    if store.startswith("parquet:"):
        return f"{store.rstrip('/')}/workers/{i}"
    if store.startswith("memory:"):
        return "memory:"
    return store


def serve_workers(args: argparse.Namespace, config: CollectorConfig) -> int:
    from store import open_store

    n = args.workers
    if n < 1 or args.port <= 0:
        raise ValueError("--workers N needs N >= 1 and a fixed --port (ports PORT..PORT+N-1)")
    if args.coordinator:
        raise ValueError("--workers runs its own coordinator; drop --coordinator")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    store = open_store(args.store)
    procs = []
    try:
        store.lock_writer(config.lock_timeout_s)
        co = Coordinator(
            store,
            straggler_timeout_s=config.straggler_timeout_s,
            run_idle_s=config.run_idle_s,
            detect=config.detect,
            observe_only=config.observe_only,
        )
        server = CoordinatorServer(co, config.token)
        cport = server.start("127.0.0.1", 0)
        addresses = []
        for i in range(n):
            url = worker_store(args.store, args.worker_store, i)
            extra = [
                "--coordinator",
                f"127.0.0.1:{cport}",
                "--port",
                str(args.port + i),
                "--straggler-timeout",
                str(config.straggler_timeout_s),
                "--flush-interval",
                str(config.flush_interval_s),
            ]
            extra += ["--insecure"] if config.insecure else []
            spool = config.spool_dir or default_spool_dir(url)
            extra += ["--no-spool"] if not spool else ["--spool", f"{spool}-worker{i}"]
            # the token reaches a worker through its environment, never its argv
            env = {"STEPWATCH_TOKEN": config.token, "STEPWATCH_TOKEN_FILE": None}
            proc, address = start_collector(
                url, *extra, host=args.host, env=env if config.token else None
            )
            procs.append(proc)
            addresses.append(address)
        print(f"collector listening on {addresses[0]} store={args.store}", flush=True)
        print(f"collector tier addresses {','.join(addresses)}", flush=True)
        gone: set[int] = set()
        while not stop.wait(0.5):
            for i, p in enumerate(procs):
                if p.poll() is not None and i not in gone:
                    gone.add(i)
                    log.error(
                        "worker %d exited with %s; its ranks use the next address", i, p.returncode
                    )
        clean = all(stop_collector(p) == 0 for p in procs)
        server.stop()
        return 0 if clean else 1
    finally:
        for p in procs:
            terminate(p)
        store.close()
