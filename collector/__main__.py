"""The collector as a process, and its operator commands.

    python -m collector serve --store URL (--token-file F | $STEPWATCH_TOKEN | --insecure)
        [--operator-token-file F | $STEPWATCH_OPERATOR_TOKEN] [--tls-cert C --tls-key K]
        [--host H] [--port N] [--observe-only] [--no-detect] ...
    python -m collector serve ... --coordinator HOST:PORT [--coordinator-tls-ca PEM]
                                                             (a tier collector, tier.py)
    python -m collector serve ... --workers N                (a tier on this host, workers.py)
    python -m collector coordinate --store URL --port P (--token-file F | --insecure)
        [--tls-cert C --tls-key K]
    python -m collector agent --upstream HOST:PORT --listen unix:PATH|HOST:PORT  (agent.py, agent_cli.py)
    python -m collector clip list     --target HOST:PORT --run NAME
    python -m collector clip set      --target HOST:PORT --run NAME --layer L --site S --limit X
    python -m collector clip clear    --target HOST:PORT --run NAME --layer L --site S
    python -m collector clip freeze   --target HOST:PORT --run NAME --layer L --site S
    python -m collector clip unfreeze --target HOST:PORT --run NAME --layer L --site S

`clip` talks to the running collector over gRPC and prints the run's clip table as CSV
(layer,site,limit,frozen; limit inf = off) after a `# version N` line. set pins the limit
(the clip policy leaves the site alone until clear); clear switches the clamp off and hands
the site back to the policy; freeze/unfreeze only stop/resume the policy on that site.
--layer may repeat. Refused commands exit 2 with the collector's message.

Security: `serve` refuses to start without a token unless --insecure, and --insecure listens
on loopback only. Clip commands need the operator token. Every secret comes from a file or the
environment, never only from argv (where /proc/PID/cmdline shows it to every local user):
--token-file / $STEPWATCH_TOKEN / $STEPWATCH_TOKEN_FILE, --operator-token-file /
$STEPWATCH_OPERATOR_TOKEN / $STEPWATCH_OPERATOR_TOKEN_FILE, the ClickHouse password from
CLICKHOUSE_PASSWORD / CLICKHOUSE_PASSWORD_FILE. `clip` takes --tls / --tls-ca (else
$STEPWATCH_TLS_CA) to reach a TLS collector.
"""

from __future__ import annotations

import argparse
import logging
import sys
from urllib.parse import urlsplit

from collector import agent_cli
from collector.config import CollectorConfig, default_spool_dir
from collector.server import serve
from proto import auth
from store import StoreError

log = logging.getLogger("collector")
ARGV_SECRET = (
    "a {what} on the command line is visible to every local user (/proc/PID/cmdline); "
    "prefer {instead}"
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m collector", description="stepwatch collector: gRPC telemetry server"
    )
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="listen for rank streams and write to a store")
    s.add_argument(
        "--store",
        required=True,
        help='"memory:", "parquet:DIR" or "clickhouse://user:pass@host:port/db"',
    )
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=50051, help="0 picks a free port")
    s.add_argument(
        "--token-file",
        metavar="FILE",
        help="file holding the bearer token every RPC must carry "
        "(default: $STEPWATCH_TOKEN, else the file $STEPWATCH_TOKEN_FILE names)",
    )
    s.add_argument("--token", help=argparse.SUPPRESS)  # argv-visible: kept for old scripts
    s.add_argument(
        "--operator-token-file",
        metavar="FILE",
        help="file holding the operator token, the only one clip commands accept "
        "(default: $STEPWATCH_OPERATOR_TOKEN, else $STEPWATCH_OPERATOR_TOKEN_FILE)",
    )
    s.add_argument(
        "--insecure",
        action="store_true",
        help="accept RPCs without a token; listens on loopback only",
    )
    s.add_argument(
        "--straggler-timeout",
        type=float,
        default=CollectorConfig.straggler_timeout_s,
        metavar="SECONDS",
        help="reduce a step without ranks this late",
    )
    s.add_argument(
        "--max-stream-messages",
        type=float,
        default=CollectorConfig.max_stream_messages_per_s,
        metavar="PER_S",
        help="pacing: a run's ranks send at most one message per world_size / PER_S seconds "
        "each (frames that come sooner go together as one batch)",
    )
    s.add_argument(
        "--flush-interval",
        type=float,
        default=CollectorConfig.flush_interval_s,
        metavar="SECONDS",
        help="flush the store (and ack) at most this often",
    )
    s.add_argument("--tls-cert", help="PEM certificate chain (with --tls-key)")
    s.add_argument("--tls-key", help="PEM private key (with --tls-cert)")
    s.add_argument(
        "--observe-only",
        action="store_true",
        help="run the detectors and store events, never push the clip policy's updates",
    )
    s.add_argument("--no-detect", action="store_true", help="no online detectors at all")
    s.add_argument(
        "--spool",
        metavar="DIR",
        help="on-disk spool for store writes while the store is away (default: "
        "$STEPWATCH_SPOOL, else beside a Parquet store (DIR.spool), else "
        "~/.local/state/stepwatch/spool-HOST-PORT-DB for ClickHouse)",
    )
    s.add_argument("--no-spool", action="store_true", help="refuse frames while the store is away")
    s.add_argument(
        "--spool-max-mb",
        type=int,
        default=CollectorConfig.spool_max_bytes >> 20,
        help="bound of the spool on disk; at it new frames are refused UNAVAILABLE",
    )
    s.add_argument(
        "--max-dictionary-mb",
        type=int,
        default=CollectorConfig.max_dictionary_bytes >> 20,
        help="bound of all runs' metric dictionaries; beyond it schemas are RESOURCE_EXHAUSTED",
    )
    s.add_argument(
        "--run-idle",
        type=float,
        default=CollectorConfig.run_idle_s,
        metavar="SECONDS",
        help="evict (and mark abandoned) a run none of whose ranks has had a stream this long",
    )
    s.add_argument(
        "--stop-timeout",
        type=float,
        default=CollectorConfig.stop_timeout_s,
        metavar="SECONDS",
        help="SIGTERM: make what is held durable (store, else spool) and exit within this",
    )
    s.add_argument(
        "--lock-timeout",
        type=float,
        default=CollectorConfig.lock_timeout_s,
        metavar="SECONDS",
        help="wait this long for another collector on the same store or spool to exit",
    )
    s.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="tier mode: store this collector's ranks' raw vectors, send per-step partials "
        "to this coordinator (python -m collector coordinate), forward its clip updates",
    )
    s.add_argument(
        "--coordinator-tls-ca",
        metavar="PEM",
        help="tier mode: TLS to the coordinator, trusting these roots (it runs with "
        "--tls-cert / --tls-key); without it the tier link is plaintext",
    )
    s.add_argument(
        "--workers",
        type=int,
        default=0,
        metavar="N",
        help="run a tier on this host: N collector processes on ports PORT..PORT+N-1 (ranks "
        "get the list; rank r prefers PORT + r %% N) and the coordinator in this process, "
        "which writes --store; each worker writes --worker-store",
    )
    s.add_argument(
        "--worker-store",
        metavar="URL",
        help="with --workers: worker i's store, '{worker}' replaced by i (default: the "
        "ClickHouse --store itself, or parquet:DIR/workers/{worker} for parquet:DIR)",
    )
    s.add_argument("--log-level", default="INFO")
    co = sub.add_parser("coordinate", help="the coordinator of a collector tier")
    co.add_argument("--store", required=True, help="where reduced rows, events, clips go")
    co.add_argument("--host", default="127.0.0.1")
    co.add_argument("--port", type=int, default=50050, help="0 picks a free port")
    co.add_argument("--token-file", metavar="FILE", help="as for serve")
    co.add_argument("--insecure", action="store_true", help="as for serve (loopback only)")
    co.add_argument(
        "--straggler-timeout",
        type=float,
        default=CollectorConfig.straggler_timeout_s,
        metavar="SECONDS",
        help="reduce a step without the ranks no partial covers this long after its first",
    )
    co.add_argument("--tls-cert", help="PEM certificate chain: TLS for the collectors' link")
    co.add_argument("--tls-key", help="PEM private key (with --tls-cert)")
    co.add_argument("--observe-only", action="store_true")
    co.add_argument("--no-detect", action="store_true")
    co.add_argument("--log-level", default="INFO")
    c = sub.add_parser("clip", help="show or change a running collector's clip thresholds")
    c.add_argument("op", choices=("list", "set", "clear", "freeze", "unfreeze"))
    c.add_argument("--target", default="127.0.0.1:50051", help="the collector, HOST:PORT")
    c.add_argument("--run", required=True)
    c.add_argument("--layer", type=int, action="append", default=[])
    c.add_argument("--site", choices=("routed", "shared"), default="routed")
    c.add_argument("--limit", type=float, help="L for set (> 0)")
    c.add_argument(
        "--token-file",
        metavar="FILE",
        help="file holding the operator token (default: $STEPWATCH_TOKEN, else the file "
        "$STEPWATCH_TOKEN_FILE names)",
    )
    c.add_argument("--token", help=argparse.SUPPRESS)  # argv-visible: kept for old scripts
    c.add_argument("--tls", action="store_true", help="TLS with the system's root certificates")
    c.add_argument(
        "--tls-ca", metavar="PEM", help="TLS, trusting these roots (default: $STEPWATCH_TLS_CA)"
    )
    c.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS")
    agent_cli.add_parser(sub)
    args = ap.parse_args(argv)
    if args.command == "clip":
        return _clip(ap, args)
    if args.command == "coordinate":
        return _coordinate(args)
    if args.command == "agent":
        return agent_cli.main(args)

    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.token is not None:
            log.warning(
                ARGV_SECRET.format(what="token", instead="--token-file or $STEPWATCH_TOKEN")
            )
        if urlsplit(args.store).password:
            log.warning(
                ARGV_SECRET.format(
                    what="store password", instead="CLICKHOUSE_PASSWORD(_FILE) in the environment"
                )
            )
        if args.insecure and (args.token or args.token_file):
            raise ValueError("--insecure with --token-file: choose one")
        # --insecure ignores a $STEPWATCH_TOKEN meant for the clients of the same shell
        token = None if args.insecure else auth.read_secret(args.token, args.token_file)
        operator_token = auth.read_secret(
            None, args.operator_token_file, env=auth.OPERATOR_TOKEN_ENV, what="operator token"
        )
        config = CollectorConfig(
            token=token,
            operator_token=operator_token,
            insecure=args.insecure,
            straggler_timeout_s=args.straggler_timeout,
            flush_interval_s=args.flush_interval,
            max_stream_messages_per_s=args.max_stream_messages,
            detect=not args.no_detect,
            observe_only=args.observe_only,
            spool_dir=None if args.no_spool else (args.spool or default_spool_dir(args.store)),
            spool_max_bytes=args.spool_max_mb << 20,
            run_idle_s=args.run_idle,
            max_dictionary_bytes=args.max_dictionary_mb << 20,
            stop_timeout_s=args.stop_timeout,
            lock_timeout_s=args.lock_timeout,
            coordinator=args.coordinator,
            coordinator_tls_ca=args.coordinator_tls_ca,
        )
        if args.workers:
            from collector.workers import serve_workers

            return serve_workers(args, config)
        return serve(
            args.store,
            host=args.host,
            port=args.port,
            config=config,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
        )
    except (ValueError, OSError, StoreError) as exc:  # bad flags/store URL, port taken, store down
        print(f"collector: {exc}", file=sys.stderr)
        return 2


def _coordinate(args: argparse.Namespace) -> int:
    from collector.tierwire import serve_coordinator

    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        token = None if args.insecure else auth.read_secret(None, args.token_file)
        return serve_coordinator(
            args.store,
            host=args.host,
            port=args.port,
            token=token,
            straggler_timeout_s=args.straggler_timeout,
            detect=not args.no_detect,
            observe_only=args.observe_only,
            insecure=args.insecure,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
        )
    except (ValueError, OSError, StoreError) as exc:
        print(f"collector coordinate: {exc}", file=sys.stderr)
        return 2


def _clip(ap: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from collector.operator import OperatorError, operate

    if args.op != "list" and not args.layer:
        ap.error(f"clip {args.op} needs --layer")
    if args.op == "set" and args.limit is None:
        ap.error("clip set needs --limit")
    items = [
        [layer, args.site, args.limit] if args.op == "set" else [layer, args.site]
        for layer in args.layer
    ]
    try:
        token = auth.read_secret(args.token, args.token_file)
        credentials = auth.client_credentials(args.tls, args.tls_ca)
    except ValueError as exc:
        print(f"collector clip: {exc}", file=sys.stderr)
        return 2
    try:
        table = operate(
            args.target,
            args.run,
            args.op,
            items,
            token=token,
            timeout_s=args.timeout,
            credentials=credentials,
        )
    except OperatorError as exc:
        print(f"collector clip: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(
        f"# version {table.version}{' (observe-only collector)' if table.observe_only else ''}\n"
    )
    sys.stdout.write(table.csv())
    return 0


if __name__ == "__main__":
    sys.exit(main())
