"""`python -m collector serve --store URL --port N ...`: the collector as a process."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from collector.config import CollectorConfig
from collector.server import serve
from store import StoreError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m collector",
                                 description="stepwatch collector: gRPC telemetry server")
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="listen for rank streams and write to a store")
    s.add_argument("--store", required=True,
                   help='"memory:", "parquet:DIR" or "clickhouse://user:pass@host:port/db"')
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=50051, help="0 picks a free port")
    s.add_argument("--token", default=os.environ.get("STEPWATCH_TOKEN") or None,
                   help="bearer token every RPC must carry (default: $STEPWATCH_TOKEN)")
    s.add_argument("--straggler-timeout", type=float, default=CollectorConfig.straggler_timeout_s,
                   metavar="SECONDS", help="reduce a step without ranks this late")
    s.add_argument("--flush-interval", type=float, default=CollectorConfig.flush_interval_s,
                   metavar="SECONDS", help="flush the store (and ack) at most this often")
    s.add_argument("--tls-cert", help="PEM certificate chain (with --tls-key)")
    s.add_argument("--tls-key", help="PEM private key (with --tls-cert)")
    s.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)

    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = CollectorConfig(token=args.token, straggler_timeout_s=args.straggler_timeout,
                                 flush_interval_s=args.flush_interval)
        return serve(args.store, host=args.host, port=args.port, config=config,
                     tls_cert=args.tls_cert, tls_key=args.tls_key)
    except (ValueError, OSError, StoreError) as exc:  # bad flags/store URL, port taken, store down
        print(f"collector: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
