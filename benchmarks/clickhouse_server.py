"""A throwaway ClickHouse server as an ordinary child process, for tests and benchmarks.

No root daemon, no systemd, no Docker: a generated minimal config in a directory of the
caller's, free loopback ports, and `--config-file`. Debian's 18.16 runs as root and as any
other user as long as that user can write the data dir; the dir is created here by whoever
runs us, so both work (newer servers refuse only when the data dir's owner differs from the
process user). tests/conftest.py wraps it in the session fixture `clickhouse_server`;
benchmarks/suite.py starts one for `make bench`.

    server = ClickHouseServer(server_command(), Path(tmp)); server.start(); ...; server.stop()

ClickHouseCluster starts several such servers, one shard each, and gives every one of them the
same remote_servers entry naming all of them (config.d/cluster-NAME.xml, which the servers reload
while running, so each picks its own free ports first): the store's `?cluster=` URL
(store/clickhouse/cluster.py) on loopback. tests/conftest.py wraps it in `clickhouse_cluster`.

    cluster = ClickHouseCluster(server_command(), Path(tmp), shards=2); cluster.start()
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from xml.sax.saxutils import escape as xml_escape

from collector.process import terminate

START_TIMEOUT_S = 60.0
EXTRA_USER, EXTRA_PASSWORD = "stepwatch", "sw 'pa:ss@/"  # URL-hostile on purpose

CONFIG_XML = """<?xml version="1.0"?>
<yandex>
  <logger><level>information</level><log>{d}/server.log</log>
    <errorlog>{d}/server.err.log</errorlog><size>20M</size><count>1</count></logger>
  <listen_host>127.0.0.1</listen_host>
  <tcp_port>{tcp_port}</tcp_port>
  <http_port>{http_port}</http_port>
  <path>{d}/data/</path>
  <tmp_path>{d}/tmp/</tmp_path>
  <user_files_path>{d}/user_files/</user_files_path>
  <format_schema_path>{d}/format_schemas/</format_schema_path>
  <users_config>{d}/users.xml</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <mark_cache_size>268435456</mark_cache_size>
  <uncompressed_cache_size>268435456</uncompressed_cache_size>
  <max_concurrent_queries>50</max_concurrent_queries>
  <mlock_executable>false</mlock_executable>
  <timezone>UTC</timezone>
</yandex>
"""

CLUSTER_XML = """<?xml version="1.0"?>
<yandex><remote_servers><{name}>
{shards}
</{name}></remote_servers></yandex>
"""
SHARD_XML = """  <shard><internal_replication>true</internal_replication>{replicas}</shard>"""
REPLICA_XML = """
    <replica><host>{host}</host><port>{port}</port></replica>"""
KEEPER_XML = """<?xml version="1.0"?>
<yandex><zookeeper><node><host>{host}</host><port>{port}</port></node></zookeeper>
  <interserver_http_host>127.0.0.1</interserver_http_host>
  <interserver_http_port>{interserver}</interserver_http_port>
</yandex>
"""  # replicas fetch each other's parts over the interserver port
CLUSTER_RELOAD_TIMEOUT_S = 30.0  # servers re-read config.d every few seconds

USERS_XML = """<?xml version="1.0"?>
<yandex>
  <profiles><default><max_memory_usage>4000000000</max_memory_usage>
    <max_threads>2</max_threads></default></profiles>
  <users>
    <default><password></password><networks><ip>127.0.0.1</ip><ip>::1</ip></networks>
      <profile>default</profile><quota>default</quota></default>
    <{user}><password>{password}</password><networks><ip>127.0.0.1</ip><ip>::1</ip></networks>
      <profile>default</profile><quota>default</quota></{user}>
  </users>
  <quotas><default><interval><duration>3600</duration><queries>0</queries><errors>0</errors>
    <result_rows>0</result_rows><read_rows>0</read_rows><execution_time>0</execution_time>
  </interval></default></quotas>
</yandex>
"""


def server_command() -> list[str] | None:
    for name in ("clickhouse-server",):
        for found in (shutil.which(name), f"/usr/sbin/{name}", f"/usr/bin/{name}"):
            if found and os.access(found, os.X_OK):
                return [found]
    single = shutil.which("clickhouse")  # the upstream single binary
    return [single, "server"] if single else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> list[str]:
    """A command prefix: the server gets SIGTERM if pytest dies without tearing down
    (PR_SET_PDEATHSIG through util-linux's setpriv). Not a preexec_fn: Python code between fork
    and exec can abort the child while gRPC threads of the parent hold their fork handlers."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--"] if setpriv else []


class ClickHouseServer:
    """One running server; `url(db)` for the store, `client(sql)` for an independent check."""

    def __init__(self, command: list[str], root: Path) -> None:
        self.command, self.root = command, root
        self.host = "127.0.0.1"
        self.credentials = (EXTRA_USER, EXTRA_PASSWORD)  # a second user with a password
        self.proc: subprocess.Popen | None = None
        self.tcp_port = self.http_port = 0
        self.version = ""

    def url(self, database: str, *, user: str = "default", password: str = "") -> str:
        from urllib.parse import quote

        cred = user + (":" + quote(password, safe="") if password else "")
        return f"clickhouse://{cred}@{self.host}:{self.tcp_port}/{database}"

    def client(self, sql: str, *, user: str = "default", password: str = "") -> str:
        """Runs `clickhouse-client --query` (a second, independent client) and returns stdout."""
        cmd = [
            shutil.which("clickhouse-client") or "clickhouse-client",
            "--host",
            self.host,
            "--port",
            str(self.tcp_port),
            "--user",
            user,
            "--query",
            sql,
        ]
        if password:
            cmd[-2:-2] = ["--password", password]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise AssertionError(f"clickhouse-client failed ({out.returncode}): {out.stderr}")
        return out.stdout

    def log_tail(self, lines: int = 40) -> str:
        chunks = []
        for name in ("stdout.log", "server.err.log", "server.log"):
            p = self.root / name
            if p.exists():
                tail = p.read_text(errors="replace").splitlines()[-lines:]
                chunks.append(f"--- {name}\n" + "\n".join(tail))
        return "\n".join(chunks) or "(no server log written)"

    def start(self) -> None:
        last_error = ""
        for _attempt in range(3):  # a picked port may be taken meanwhile
            self.tcp_port, self.http_port = _free_port(), _free_port()
            last_error = self._launch()
            if not last_error:
                return
            self.stop()
            if "Address already in use" not in self.log_tail(200):
                break
        raise RuntimeError(f"ClickHouse server did not start: {last_error}\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL: the server crashes (data on disk stays); `start_again` brings it back."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def start_again(self) -> None:
        """Start on the same ports and data directory, so clients' URLs stay valid."""
        last_error = ""
        for _attempt in range(20):  # the old listener's port may take a moment to free
            last_error = self._launch()
            if not last_error:
                return
            self.stop()
            time.sleep(0.5)
        raise RuntimeError(f"ClickHouse server did not restart: {last_error}\n{self.log_tail()}")

    def _launch(self) -> str:
        """Write the config for the current ports, start the process, wait until it answers;
        '' or why not."""
        for sub in ("data", "tmp", "user_files", "format_schemas"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "config.xml").write_text(
            CONFIG_XML.format(d=self.root, tcp_port=self.tcp_port, http_port=self.http_port)
        )
        (self.root / "users.xml").write_text(
            USERS_XML.format(user=EXTRA_USER, password=xml_escape(EXTRA_PASSWORD))
        )
        with open(self.root / "stdout.log", "ab") as out:
            self.proc = subprocess.Popen(
                [
                    *_die_with_parent(),
                    *self.command,
                    f"--config-file={self.root / 'config.xml'}",
                ],
                cwd=self.root,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        return self._wait_ready()

    def _wait_ready(self) -> str:
        """'' once `SELECT 1` answers; else why not (exited, or still silent at the deadline)."""
        from clickhouse_driver import Client

        deadline = time.monotonic() + START_TIMEOUT_S
        error = "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return f"exited with code {self.proc.returncode}"
            client = Client(
                self.host, port=self.tcp_port, connect_timeout=1, send_receive_timeout=5
            )
            try:
                self.version = client.execute("SELECT version()")[0][0]
                return ""
            except Exception as e:  # noqa: BLE001 - not listening yet: any error means retry
                error = f"{type(e).__name__}: {e}"
            finally:
                client.disconnect()
            time.sleep(0.1)
        return f"no answer to SELECT 1 within {START_TIMEOUT_S:.0f} s ({error})"

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc)


class ClickHouseCluster:
    """`shards` x `replicas` servers that know each other as cluster `name`; with `keeper`
    (host, port of a ZooKeeper, benchmarks/zookeeper_server.py) every server uses it, which is
    what ReplicatedMergeTree, and so more than one replica per shard, needs."""

    def __init__(
        self,
        command: list[str],
        root: Path,
        *,
        shards: int = 2,
        replicas: int = 1,
        name: str = "sw",
        keeper: tuple[str, int] | None = None,
    ) -> None:
        self.name, self.shards, self.replicas, self.keeper = name, shards, replicas, keeper
        self.servers = [  # shard-major: servers[s * replicas + r]
            ClickHouseServer(
                command, root / (f"shard{s + 1}" + (f"-replica{r + 1}" if replicas > 1 else ""))
            )
            for s in range(shards)
            for r in range(replicas)
        ]

    @property
    def entry(self) -> ClickHouseServer:
        """The server store URLs name (any would do: all know the cluster)."""
        return self.servers[0]

    def url(self, database: str, *, user: str = "default", password: str = "") -> str:
        return self.entry.url(database, user=user, password=password) + f"?cluster={self.name}"

    def start(self) -> None:
        try:
            for server in self.servers:
                (server.root / "config.d").mkdir(parents=True, exist_ok=True)
                if self.keeper:  # read at startup only
                    (server.root / "config.d" / "keeper.xml").write_text(
                        KEEPER_XML.format(
                            host=self.keeper[0], port=self.keeper[1], interserver=_free_port()
                        )
                    )
                server.start()
            self.define(
                self.name,
                [
                    list(range(i * self.replicas, (i + 1) * self.replicas))
                    for i in range(self.shards)
                ],
            )
        except BaseException:
            self.stop()
            raise

    def define(self, name: str, shards: list[list[int]]) -> None:
        """Give every server a remote_servers entry `name` (config.d/cluster-NAME.xml): one shard
        per list, its replicas the servers at those indices; returns once all have loaded it."""
        body = "\n".join(
            SHARD_XML.format(
                replicas="".join(
                    REPLICA_XML.format(host=self.servers[i].host, port=self.servers[i].tcp_port)
                    for i in replicas
                )
            )
            for replicas in shards
        )
        for server in self.servers:
            (server.root / "config.d" / f"cluster-{name}.xml").write_text(
                CLUSTER_XML.format(name=name, shards=body)
            )
        self._wait_known(name, sum(len(r) for r in shards))

    def _wait_known(self, name: str, rows: int) -> None:
        """Until every server's system.clusters has `rows` rows (replicas) of cluster `name`."""
        from clickhouse_driver import Client

        deadline = time.monotonic() + CLUSTER_RELOAD_TIMEOUT_S
        waiting = list(self.servers)
        while waiting:
            server = waiting[0]
            client = Client(server.host, port=server.tcp_port, connect_timeout=5)
            try:
                n = client.execute(
                    "SELECT count() FROM system.clusters WHERE cluster = %(c)s", {"c": name}
                )[0][0]
            finally:
                client.disconnect()
            if n == rows:
                waiting.pop(0)
            elif time.monotonic() > deadline:
                raise RuntimeError(
                    f"{server.root}: cluster {name} not loaded within "
                    f"{CLUSTER_RELOAD_TIMEOUT_S:.0f} s\n{server.log_tail()}"
                )
            else:
                time.sleep(0.2)

    def client(self, node: int, sql: str) -> str:
        """clickhouse-client on one server (0-based, shard-major), e.g. to read its local
        tables."""
        return self.servers[node].client(sql)

    def stop(self) -> None:
        """All at once: an 18.16 server takes seconds to shut down."""
        import threading

        threads = [threading.Thread(target=s.stop) for s in self.servers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
