"""Inspect a store from the shell; every command prints CSV on stdout.

    python -m store runs    --store URL
    python -m store metrics --store URL --run NAME
    python -m store series  --store URL --run NAME --metric NAME [--rank R] [--start S --stop S]
    python -m store steps   --store URL --run NAME
    python -m store at-step --store URL --run NAME --step S [--pattern GLOB] [--rank R]
    python -m store events  --store URL --run NAME
    python -m store clips   --store URL --run NAME

An unknown run or metric, or malformed input, prints one line on stderr and exits 2.
"""

from __future__ import annotations

import argparse
import sys

import polars as pl

from store import InvalidInput, NotFound, StoreError, open_store


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m store", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    def cmd(name: str, help: str, run: bool = True) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help)
        c.add_argument("--store", required=True, help='store URL: "memory:" or "parquet:DIR"')
        if run:
            c.add_argument("--run", required=True, help="run name")
        return c

    cmd("runs", "one row per run", run=False)
    cmd("metrics", "the run's metric dictionary")
    cmd("steps", "barrier outcome per step (missing_ranks joined by ';')")
    s = cmd("series", "one metric over steps: step,value (reduced unless --rank)")
    s.add_argument("--metric", required=True)
    s.add_argument("--rank", type=int)
    s.add_argument("--start", type=int, help="first step (inclusive)")
    s.add_argument("--stop", type=int, help="last step (exclusive)")
    a = cmd("at-step", "every metric matching --pattern at one step")
    a.add_argument("--step", type=int, required=True)
    a.add_argument("--pattern", default="*", help="glob over metric names (default *)")
    a.add_argument("--rank", type=int)
    cmd("events", "detector events (detail is JSON text)")
    cmd("clips", "clip-threshold updates and the step they took effect (-1: not yet)")
    return p


def _query(args: argparse.Namespace) -> pl.DataFrame:
    with open_store(args.store) as st:
        if args.command == "runs":
            return st.runs()
        if args.command == "metrics":
            return st.metrics(args.run)
        if args.command == "series":
            return st.series(
                args.run, args.metric, start=args.start, stop=args.stop, rank=args.rank
            )
        if args.command == "at-step":
            return st.at_step(args.run, args.step, args.pattern, rank=args.rank)
        if args.command == "events":
            return st.events(args.run)
        if args.command == "clips":
            return st.clips(args.run)
        df = st.steps(args.run)  # CSV has no lists: "3;7" for ranks 3, 7
        return df.with_columns(pl.col("missing_ranks").cast(pl.List(pl.Utf8)).list.join(";"))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)  # usage errors exit 2 via argparse
    try:
        df = _query(args)
    except (NotFound, InvalidInput) as e:
        msg = e.args[0] if isinstance(e, NotFound) and e.args else e  # KeyError quotes str()
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except StoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(df.write_csv())
    return 0


if __name__ == "__main__":
    sys.exit(main())
