"""`python -m collector serve` as a process: ready line, a run over loopback, SIGTERM exits 0
with everything flushed into a Parquet store; TLS."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import grpc
import pytest

from collector import Collector, CollectorConfig
from collector.process import start_collector as spawn_collector
from proto.v1 import telemetry_pb2 as pb
from store import open_store

from .conftest import WAIT_S, RawClient, mdef


def test_serve_process_ready_line_run_and_sigterm_flush(tmp_path):
    data = tmp_path / "store"
    proc, address = spawn_collector(
        f"parquet:{data}",
        "--token",
        "tok",
        "--straggler-timeout",
        "60",
        log_path=tmp_path / "collector.log",
    )
    try:
        assert address.startswith("127.0.0.1:") and not address.endswith(":0")
        c = RawClient(address, "cli-run", 0, 2, token="tok")
        c1 = RawClient(address, "cli-run", 1, 2, token="tok")
        c.schema(1, [mdef("loss", pb.REDUCE_MEAN)])
        c1.schema(1, [mdef("loss", pb.REDUCE_MEAN)])
        c.step(0, 1, [2.0])
        c1.step(0, 1, [4.0])
        c.wait_ack()
        c.step(1, 1, [8.0])  # still pending at SIGTERM (rank 1 never ends it)
        n_acks = len(c.acks)
        c.send(c.sent[0])  # an acked frame again: acked again, which proves
        while len(c.acks) == n_acks:  # the server has read everything before it
            c.expect("ack")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=WAIT_S) == 0
        end = c.wait_end()  # flushed, acked, then told to go elsewhere
        assert end.code == grpc.StatusCode.UNAVAILABLE and "shutting down" in end.details
        assert c.acks[-1].seq == c.seq and c.acks[-1].step == 1
        c.channel.close()
        c1.channel.close()
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "collector.log").read_text()
    assert "stopping" in log and "Traceback" not in log

    store = open_store(f"parquet:{data}")
    try:
        assert store.series("cli-run", "loss")["value"].to_list() == [3.0, 8.0]
        steps = store.steps("cli-run")
        assert steps["complete"].to_list() == [True, False]  # flushed as incomplete at stop
        assert store.runs().row(0, named=True)["status"] == "finished"
    finally:
        store.close()


def test_serve_rejects_a_bad_store_url():
    out = subprocess.run(
        [sys.executable, "-m", "collector", "serve", "--store", "nowhere:x", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "unsupported store URL" in out.stderr


def test_a_taken_port_is_an_error_not_shared(start_collector):
    _, addr, _ = start_collector()
    other = Collector(open_store("memory:"), CollectorConfig(insecure=True))
    with pytest.raises(OSError, match="could not listen"):
        other.start("127.0.0.1", int(addr.rsplit(":", 1)[1]))


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
def test_tls(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    store = open_store("memory:")
    collector = Collector(store, CollectorConfig(flush_interval_s=0.05, insecure=True))
    port = collector.start("127.0.0.1", 0, tls=(cert.read_bytes(), key.read_bytes()))
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        c = RawClient(f"localhost:{port}", "tls-run", 0, 1, credentials=creds)
        c.schema(1, [mdef("x")])
        c.step(0, 1, [1.0])
        c.wait_ack()
        assert c.close().code == grpc.StatusCode.OK
        plain = RawClient(f"127.0.0.1:{port}", "tls-run", 0, 1)  # no TLS: refused
        assert plain.wait_end().code == grpc.StatusCode.UNAVAILABLE
        plain.channel.close()
    finally:
        collector.stop()
    assert store.series("tls-run", "x")["value"].to_list() == [1.0]


def _parsed_config(monkeypatch, argv, **env):
    """collector.__main__.main(argv) up to serve(): the config it would serve with."""
    import collector.__main__ as cli

    for k in list(os.environ):
        if k.startswith("STEPWATCH_"):
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    seen = {}

    def fake_serve(store_url, *, host, port, config, **_kw):
        seen.update(host=host, config=config)
        return 0

    monkeypatch.setattr(cli, "serve", fake_serve)
    rc = cli.main(["serve", "--store", "memory:", *argv])
    return rc, seen.get("config")


def test_serve_reads_its_secrets_from_files_or_the_environment(monkeypatch, tmp_path, caplog):
    (tmp_path / "t").write_text("file-token\n")
    (tmp_path / "o").write_text("op-token\n")
    rc, cfg = _parsed_config(
        monkeypatch,
        ["--token-file", str(tmp_path / "t"), "--operator-token-file", str(tmp_path / "o")],
    )
    assert rc == 0 and (cfg.token, cfg.operator_token, cfg.insecure) == (
        "file-token",
        "op-token",
        False,
    )
    rc, cfg = _parsed_config(
        monkeypatch, [], STEPWATCH_TOKEN="env-token", STEPWATCH_OPERATOR_TOKEN="env-op"
    )
    assert (cfg.token, cfg.operator_token) == ("env-token", "env-op")
    # --insecure ignores a $STEPWATCH_TOKEN meant for the shell's clients
    rc, cfg = _parsed_config(monkeypatch, ["--insecure"], STEPWATCH_TOKEN="env-token")
    assert rc == 0 and cfg.token is None and cfg.insecure
    rc, cfg = _parsed_config(monkeypatch, ["--insecure", "--token-file", str(tmp_path / "t")])
    assert rc == 2 and cfg is None
    with caplog.at_level("WARNING", "collector"):  # argv still works, and says what it costs
        rc, cfg = _parsed_config(monkeypatch, ["--token", "argv-token"])
    assert rc == 0 and cfg.token == "argv-token"
    assert any("/proc/PID/cmdline" in m for m in caplog.messages)


def test_a_password_in_the_store_url_is_warned_about(monkeypatch, caplog):
    import collector.__main__ as cli

    monkeypatch.setattr(cli, "serve", lambda *a, **k: 0)
    with caplog.at_level("WARNING", "collector"):
        cli.main(["serve", "--insecure", "--store", "clickhouse://u:pw@h:9000/db"])
    assert any("store password" in m and "CLICKHOUSE_PASSWORD" in m for m in caplog.messages)
