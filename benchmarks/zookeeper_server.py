"""A throwaway ZooKeeper (Debian's `zookeeper` package) as a child process, for the replicated
ClickHouse tests: the keeper that Debian's 18.16 needs for ReplicatedMergeTree (it predates
ClickHouse Keeper). Optional: scripts/system-deps.sh does not install it (it pulls in a JRE), and
without it tests/integration/test_clickhouse_replicated.py skips.

    zk = ZooKeeperServer(zookeeper_command(), Path(tmp)); zk.start(); ... zk.port ...; zk.stop()
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

from benchmarks.clickhouse_server import _die_with_parent, _free_port
from collector.process import terminate

START_TIMEOUT_S = 60.0
ZK_SERVER = "/usr/share/zookeeper/bin/zkServer.sh"

CONFIG = """tickTime=500
dataDir={d}/data
clientPort={port}
clientPortAddress=127.0.0.1
admin.enableServer=false
4lw.commands.whitelist=ruok
"""


def zookeeper_command() -> list[str] | None:
    return [ZK_SERVER, "start-foreground"] if os.access(ZK_SERVER, os.X_OK) else None


def _ruok(port: int) -> bool:
    """ZooKeeper's four-letter health check: "imok" once it serves clients."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"ruok")
            return s.recv(4) == b"imok"
    except OSError:
        return False


class ZooKeeperServer:
    """One standalone ZooKeeper on a free loopback port (`host`, `port`)."""

    def __init__(self, command: list[str], root: Path) -> None:
        self.command, self.root = command, root
        self.host, self.port = "127.0.0.1", 0
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        cfg = self.root / "zoo.cfg"
        cfg.write_text(CONFIG.format(d=self.root, port=self.port))
        env = {**os.environ, "ZOO_LOG_DIR": str(self.root), "JVMFLAGS": "-Xmx256m"}
        with open(self.root / "stdout.log", "ab") as out:
            self.proc = subprocess.Popen(  # zkServer.sh execs java: the pid is the server's
                [*_die_with_parent(), *self.command, str(cfg)],
                cwd=self.root,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _ruok(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                log = (self.root / "stdout.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"ZooKeeper did not start on port {self.port}\n{log}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc)
