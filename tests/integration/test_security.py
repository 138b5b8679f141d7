"""Security defaults, against real processes.

- `python -m collector serve` will not start without a token unless --insecure, and
  --insecure will not listen beyond loopback.
- A live `python -m model.train` streams over TLS with its token from a file named in the
  environment (the trainer had no token option: 0 steps stored against a token collector).
- Clip commands are the operator's: an anonymous `clip set --limit 0.01` is UNAUTHENTICATED, one
  with the ranks' token PERMISSION_DENIED, and neither reaches the trainer; the operator token's
  does, and the trainer acknowledges it.
- No secret is on any command line (/proc/PID/cmdline), the ClickHouse password included.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from collector.process import start_collector, stop_collector, terminate
from store import open_store
from tests.collector.conftest import RawClient, mdef

pytestmark = pytest.mark.timeout(400)
ROOT = Path(__file__).resolve().parents[2]
TOKEN, OPERATOR = "rank-token-1f3a", "operator-token-9c2e"


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any STEPWATCH_/CLICKHOUSE_ secret, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STEPWATCH_", "CLICKHOUSE_"))}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def secret_file(path: Path, value: str) -> str:
    path.write_text(value + "\n")
    path.chmod(0o600)
    return str(path)


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "collector", *args],
        cwd=ROOT,
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ((), "needs a token"),
        (("--insecure", "--host", "0.0.0.0"), "loopback only"),
    ],
)
def test_serve_refuses_an_open_collector(flags, message):
    out = cli("serve", "--store", "memory:", "--port", "0", *flags)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert "listening" not in out.stdout


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """(key, cert) PEM files of a one-day self-signed certificate for localhost."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key)]
        + ["-out", str(cert), "-days", "1", "-subj", "/CN=localhost"]
        + ["-addext", "subjectAltName=DNS:localhost"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return key, cert


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
def test_the_tier_link_runs_over_tls_and_a_plaintext_collector_gets_nothing_through(tmp_path):
    """`coordinate --tls-cert/--tls-key`: a tier collector with --coordinator-tls-ca gets a
    rank's step reduced and acked through it; one without it (plaintext) cannot register,
    retries, and acks nothing."""
    key, cert = self_signed(tmp_path)
    co, co_addr = start_collector(
        f"parquet:{tmp_path / 'co'}",
        "--insecure",
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
        command="coordinate",
        log_path=tmp_path / "co.log",
    )
    link = "localhost:" + co_addr.rsplit(":", 1)[1]  # the certificate's name
    procs = []
    try:
        for name, extra in (("tls", ["--coordinator-tls-ca", str(cert)]), ("plain", [])):
            procs.append(
                start_collector(
                    f"parquet:{tmp_path / name}",
                    "--insecure",
                    "--coordinator",
                    link,
                    "--flush-interval",
                    "0.05",
                    *extra,
                    log_path=tmp_path / f"{name}.log",
                )
            )
        ranks = [RawClient(addr, run, 0, 1) for (_, addr), run in zip(procs, ("over-tls", "plain"))]
        for c in ranks:
            c.expect("welcome")
            c.schema(1, [mdef("train/loss")])
            c.step(0, 1, [3.0], fold=True)
        assert ranks[0].wait_ack().seq == 2  # reduced and stored at the coordinator
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:  # keepalives repeat ack 0; nothing is acked
            try:
                ranks[1].expect("ack", timeout=max(0.01, deadline - time.monotonic()))
            except TimeoutError:
                break
        assert all(a.seq == 0 for a in ranks[1].acks)
        assert "retrying" in (tmp_path / "plain.log").read_text()
        for c in ranks:
            c.cancel()
    finally:
        for p, _ in procs:
            terminate(p)
        stop_collector(co)
    with open_store(f"parquet:{tmp_path / 'co'}") as st:
        assert st.steps("over-tls")["step"].to_list() == [0]
        assert "plain" not in st.runs()["run"].to_list()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
def test_clip_is_the_operators_and_a_live_trainer_streams_over_tls_with_its_token(tmp_path):
    key, cert = self_signed(tmp_path)
    tokens = {
        "STEPWATCH_TOKEN_FILE": secret_file(tmp_path / "token", TOKEN),
        "STEPWATCH_OPERATOR_TOKEN_FILE": secret_file(tmp_path / "operator", OPERATOR),
    }
    rank_env = {"STEPWATCH_TOKEN_FILE": tokens["STEPWATCH_TOKEN_FILE"]}
    operator_env = {"STEPWATCH_TOKEN_FILE": tokens["STEPWATCH_OPERATOR_TOKEN_FILE"]}
    url, steps, run = f"parquet:{tmp_path / 'store'}", 150, "secure"
    proc, address = start_collector(
        url,
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
        "--flush-interval",
        "0.1",
        log_path=tmp_path / "collector.log",
        env={k: None for k in os.environ if k.startswith("STEPWATCH_")} | tokens,
    )
    target = "localhost:" + address.rsplit(":", 1)[1]  # the certificate's name
    trainer = subprocess.Popen(
        [sys.executable, "-m", "model.train", "--preset", "tiny", "--steps", str(steps)]
        + ["--monitor", target, "--run", run, "--tls-ca", str(cert), "--threads", "1"],
        cwd=ROOT,
        env=clean_env(**rank_env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    clip = ("clip", "set", "--target", target, "--run", run, "--layer", "1", "--tls-ca", str(cert))
    try:
        deadline = time.monotonic() + 240
        while _stored_steps(url, run) < 3:  # the trainer is live and streaming
            assert trainer.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        for pid in (proc.pid, trainer.pid):
            assert TOKEN not in cmdline(pid) and OPERATOR not in cmdline(pid)

        anonymous = cli(*clip, "--limit", "0.01")
        assert anonymous.returncode == 2 and "UNAUTHENTICATED" in anonymous.stderr
        ranks_token = cli(*clip, "--limit", "0.01", **rank_env)
        assert ranks_token.returncode == 2 and "PERMISSION_DENIED" in ranks_token.stderr
        listed = cli(*clip[:1], "list", *clip[2:6], "--tls-ca", str(cert), **operator_env)
        assert listed.returncode == 0 and listed.stdout.startswith("# version 0\n")  # untouched

        applied = cli(*clip, "--limit", "5.0", **operator_env)
        assert applied.returncode == 0 and applied.stdout.startswith("# version 1\n")
        assert trainer.poll() is None  # still training: it receives and applies it
        out, _ = trainer.communicate(timeout=300)
        assert trainer.returncode == 0, out[-3000:]
    finally:
        terminate(trainer)
        assert stop_collector(proc) == 0
    with open_store(url) as store:
        assert store.steps(run)["step"].to_list() == list(range(steps))  # every step, once
        clips = store.clips(run)
    assert clips["version"].to_list() == [1] and clips["limit"].to_list() == [5.0]
    assert clips["acked_step"][0] >= 0  # the live trainer applied the operator's update
    assert "0.01" not in out and "Traceback" not in out


def _stored_steps(url: str, run: str) -> int:
    try:
        with open_store(url) as store:
            return store.steps(run).height
    except Exception:  # noqa: BLE001 - not written yet (no run, no file): keep polling
        return 0


def test_the_clickhouse_password_comes_from_a_file_never_argv(clickhouse_server, tmp_path):
    user, password = clickhouse_server.credentials
    db = "t_password_file"
    url = clickhouse_server.url(db, user=user)  # names the user, not the password
    assert password not in url
    env = {"CLICKHOUSE_PASSWORD_FILE": secret_file(tmp_path / "ch", password)}
    proc, address = start_collector(url, "--insecure", "--flush-interval", "0.1", env=env)
    try:
        assert password not in cmdline(proc.pid)
        c = RawClient(address, "pw-run", 0, 1)
        c.schema(1, [mdef("loss")])
        c.step(0, 1, [3.5])
        c.wait_ack()
        c.close()
    finally:
        assert stop_collector(proc) == 0
    with open_store(clickhouse_server.url(db, user=user, password=password)) as store:
        assert store.series("pw-run", "loss")["value"].to_list() == [3.5]
    clickhouse_server.client(f"DROP DATABASE IF EXISTS {db}")
