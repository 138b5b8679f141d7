"""`python -m collector agent`: the node agent's command line and its process (agent.py).

    python -m collector agent --upstream HOST:PORT --listen unix:/run/stepwatch.sock
        [--token-file F | $STEPWATCH_TOKEN] [--local-token-file F] [--insecure]
        [--tls | --tls-ca C] [--tls-cert C --tls-key K] [--max-queued-mb N]

Prints `agent listening on ADDRESS upstream=HOST:PORT` (flushed) once ready (the handshake
collector/process.py's start_agent waits for); SIGTERM/SIGINT stop it; a stats line every
STATS_LOG_S.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from collector.agent import AgentConfig, NodeAgent
from proto import auth

log = logging.getLogger("collector.agent")
STATS_LOG_S = 60.0


# ---- the command line --------------------------------------------------------------------------
def add_parser(sub) -> None:
    """`python -m collector agent ...` (collector/__main__.py)."""
    a = sub.add_parser("agent", help="node agent: this host's ranks, one stream upstream")
    a.add_argument("--upstream", required=True, help="the collector, HOST:PORT")
    a.add_argument(
        "--listen",
        default="127.0.0.1:50052",
        help="where the ranks connect: unix:/PATH or HOST:PORT (port 0 picks a free one)",
    )
    a.add_argument(
        "--token-file",
        metavar="FILE",
        help="the collector's token, sent upstream (default: $STEPWATCH_TOKEN, else the file "
        "$STEPWATCH_TOKEN_FILE names); also required of the ranks unless --local-token-file",
    )
    a.add_argument("--local-token-file", metavar="FILE", help="the token the local ranks must send")
    a.add_argument(
        "--insecure",
        action="store_true",
        help="accept local ranks without a token; a unix socket or loopback only",
    )
    a.add_argument("--tls-cert", metavar="PEM", help="TLS on the local listener: certificate")
    a.add_argument("--tls-key", metavar="PEM", help="TLS on the local listener: private key")
    a.add_argument("--tls", action="store_true", help="TLS upstream, the system's roots")
    a.add_argument("--tls-ca", metavar="PEM", help="TLS upstream, trusting these roots")
    a.add_argument(
        "--max-queued-mb",
        type=int,
        default=AgentConfig.max_queued_bytes >> 20,
        metavar="MB",
        help="frames waiting to go upstream; beyond it the ranks' streams wait",
    )
    a.add_argument("--log-level", default="INFO")


def main(args) -> int:
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        token = auth.read_secret(None, args.token_file)
        local = None
        if not args.insecure:
            local = auth.read_secret(None, args.local_token_file, environ={}) or token
        tls = auth.server_tls(args.tls_cert, args.tls_key, "TLS on the listener")
        config = AgentConfig(
            upstream=args.upstream,
            token=token,
            local_token=local,
            insecure=args.insecure,
            credentials=auth.client_credentials(args.tls, args.tls_ca),
            max_queued_bytes=args.max_queued_mb << 20,
            tls=tls,
        )
        return serve_agent(config, args.listen)
    except (ValueError, OSError) as exc:
        print(f"collector agent: {exc}", file=sys.stderr)
        return 2


async def _log_stats(agent: NodeAgent, period_s: float = STATS_LOG_S) -> None:
    while True:
        await asyncio.sleep(period_s)
        ranks = len(agent.up.locals) if agent.up is not None else 0
        values = " ".join(f"{k}={v}" for k, v in agent.counters.snapshot().items() if v)
        log.info("node agent stats ranks=%d %s", ranks, values)


# ---- serve -------------------------------------------------------------------------------------
def serve_agent(config: AgentConfig, listen: str) -> int:
    """Run until SIGTERM/SIGINT; prints `agent listening on ADDRESS upstream=HOST:PORT`
    (flushed) once ready."""
    import signal

    from collector import gcpolicy

    async def main() -> None:
        agent = NodeAgent(config)
        address = await agent.start(listen)
        gcpolicy.tune()
        print(f"agent listening on {address} upstream={config.upstream}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.create_task(_log_stats(agent))
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await agent.stop()
        log.info("node agent stopped: %s", agent.counters.snapshot())

    asyncio.run(main())
    return 0
