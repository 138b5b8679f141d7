"""Start `python -m collector serve` as a child process and wait until it listens.

One helper for everything that runs the collector beside something else: the demo, the
integration tests, the benchmarks; and `terminate` for the other children they start. The child prints `collector listening on HOST:PORT store=URL`
when ready; that line is the only handshake.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

READY_RE = re.compile(r"(?:collector|coordinator) listening on (\S+:\d+)")
AGENT_READY_RE = re.compile(r"agent listening on (\S+) upstream=")
ROOT = Path(__file__).resolve().parents[1]


class CollectorStartError(RuntimeError):
    pass


def start_collector(
    store_url: str,
    *extra_args: str,
    host: str = "127.0.0.1",
    log_path: str | Path | None = None,
    timeout_s: float = 60.0,
    env: dict | None = None,
    command: str = "serve",
) -> tuple[subprocess.Popen, str]:
    """Returns (process, "HOST:PORT"). The process's output after the ready line goes to
    log_path (or is discarded); stop it with `stop_collector`. `env` is laid over this
    process's environment (a None value removes the variable): that is where a token goes
    (STEPWATCH_TOKEN or STEPWATCH_TOKEN_FILE), never onto the command line. Without one,
    pass "--insecure" (loopback only)."""
    cmd = [
        sys.executable,
        "-m",
        "collector",
        command,  # or "coordinate": the coordinator of a tier (coordinator.py)
        "--store",
        store_url,
        "--host",
        host,
        "--port",
        "0",
        *extra_args,
    ]
    return _spawn(cmd, READY_RE, "collector", log_path, timeout_s, env)


def start_agent(
    upstream: str,
    listen: str,
    *extra_args: str,
    log_path: str | Path | None = None,
    timeout_s: float = 60.0,
    env: dict | None = None,
) -> tuple[subprocess.Popen, str]:
    """`python -m collector agent --upstream HOST:PORT --listen unix:PATH|HOST:PORT`, a node
    agent (agent.py); returns (process, the address ranks connect to). Stop it with
    `stop_collector` (SIGTERM) or kill it; tokens go in `env` as for start_collector."""
    cmd = [
        sys.executable,
        "-m",
        "collector",
        "agent",
        "--upstream",
        upstream,
        "--listen",
        listen,
        *extra_args,
    ]
    return _spawn(cmd, AGENT_READY_RE, "agent", log_path, timeout_s, env)


def _spawn(
    cmd: list[str],
    ready_re: re.Pattern,
    what: str,
    log_path: str | Path | None,
    timeout_s: float,
    env: dict | None,
) -> tuple[subprocess.Popen, str]:
    """Start `cmd`, keep reading its output (to log_path), return once a line matches."""
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={
            k: v
            for k, v in {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}.items()
            if v is not None
        },
    )
    stdout = proc.stdout
    assert stdout is not None  # stdout=PIPE always opens it
    lines: list[str] = []
    found: list[str] = []

    def pump() -> None:  # keep reading so the child never blocks on a full pipe
        sink = open(log_path, "a") if log_path else None
        try:
            for line in stdout:
                if not found:
                    lines.append(line)
                    m = ready_re.search(line)
                    if m:
                        found.append(m.group(1))
                if sink:
                    sink.write(line)
                    sink.flush()
        finally:
            if sink:
                sink.close()

    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    threading.Thread(target=pump, daemon=True, name=f"{what}-log").start()
    deadline = time.monotonic() + timeout_s
    while not found:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise CollectorStartError(
                f"{what} did not become ready (exit={proc.poll()}): {''.join(lines)[-2000:]}"
            )
        time.sleep(0.05)
    return proc, found[0]


def stop_collector(proc: subprocess.Popen, timeout_s: float = 60.0) -> int:
    """SIGTERM (the collector flushes the store and finishes its runs), then wait; returns the
    exit status (0 = clean). A process that already exited is only reaped."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=timeout_s)


def terminate(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """Stop any child that needs no clean-shutdown check (a ClickHouse server, a dashboard):
    SIGTERM, then SIGKILL if it is still running after grace_s; reaped either way."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
