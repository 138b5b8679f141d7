"""`make demo`: a collector with the Parquet store + the monitored demo training, then a summary.

Runs the real pieces as separate processes, the way a user deploys them: `python -m collector
serve` on a free loopback port (online detectors and clip policy on), `python -m model.train
--monitor HOST:PORT` against it (optionally with injected faults), then reads the stored run back
through store/'s read API and writes the offline anomaly report with `python -m analytics report`.

The collector runs as it should anywhere: with a token (and an operator token for clip
commands), both generated here into files next to the store (mode 0600) and handed to every
process through STEPWATCH_TOKEN_FILE / STEPWATCH_OPERATOR_TOKEN_FILE, never on a command line.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from collector.process import start_collector, stop_collector  # noqa: E402
from store import open_store  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--run", default="demo")
    ap.add_argument("--store-dir", default=str(ROOT / "runs" / "demo-store"))
    ap.add_argument(
        "--inject",
        action="append",
        default=[],
        metavar="KIND@STEP[:k=v,...]",
        help="fault for model.train, e.g. blowup@150:layer=8,expert=3",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for training; 1 leaves the other core to the collector",
    )
    args = ap.parse_args()

    store_dir = Path(args.store_dir)
    shutil.rmtree(store_dir, ignore_errors=True)  # the demo starts from an empty store
    store_url = f"parquet:{store_dir}"

    # ---------------------------------------------------------------- tokens
    token_file = store_dir.parent / f"{args.run}-token"
    operator_file = store_dir.parent / f"{args.run}-operator-token"
    for path in (token_file, operator_file):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(16) + "\n")
    env: dict = {k: v for k, v in os.environ.items() if not k.startswith("STEPWATCH_")}
    env.update(PYTHONUNBUFFERED="1", STEPWATCH_TOKEN_FILE=str(token_file))
    unset = {k: None for k in os.environ if k.startswith("STEPWATCH_")}  # ours, not the shell's

    # ---------------------------------------------------------------- collector
    collector, address = start_collector(
        store_url,
        log_path=store_dir.parent / "collector.log",
        env={**unset, **env, "STEPWATCH_OPERATOR_TOKEN_FILE": str(operator_file)},
    )
    print(f"[demo] collector listening on {address}, store {store_url}", flush=True)
    print(
        f"[demo] its token is in {token_file}, the operator token (clip commands) in "
        f"{operator_file}",
        flush=True,
    )

    # ---------------------------------------------------------------- monitored training
    t0 = time.time()
    try:
        rc = subprocess.call(
            [
                sys.executable,
                "-m",
                "model.train",
                "--preset",
                args.preset,
                "--steps",
                str(args.steps),
                "--monitor",
                address,
                "--run",
                args.run,
                "--threads",
                str(args.threads),
                "--log-every",
                "25",
            ]
            + [f"--inject={fault}" for fault in args.inject],
            cwd=ROOT,
            env=env,
        )
    finally:
        stop_collector(collector)  # flushes the store, finishes the run
    if rc != 0:
        print(f"[demo] training exited with status {rc}", file=sys.stderr)
        return rc

    # ---------------------------------------------------------------- what was stored
    with open_store(store_url) as store:
        metrics = store.metrics(args.run)
        steps = store.steps(args.run)
        loss = store.series(args.run, "train/loss")
        events = store.events(args.run)
        clips = store.clips(args.run)
    periodic = int(metrics["name"].str.starts_with("params/").sum())  # every K steps
    every_step = metrics.height - periodic
    print(f"[demo] trained {args.steps} steps in {time.time() - t0:.0f} s")
    print(f"[demo] data: {store_dir}")
    print(
        f"[demo] {every_step} metrics stored per step (+{periodic} parameter norms every few "
        f"steps), {steps.height} steps, for run '{args.run}'"
    )
    print(f"[demo] stored loss: first {loss['value'][0]:.3f} -> last {loss['value'][-1]:.3f}")
    print(f"[demo] {events.height} detector events, {clips.height} clip updates")
    for row in events.head(8).iter_rows(named=True):
        print(
            f"[demo]   event step {row['step']:>4} {row['kind']:<20} {row['site']:<32} "
            f"value {row['value']:.3g} (threshold {row['threshold']:.3g}, {row['severity']})"
        )
    for row in clips.head(4).iter_rows(named=True):
        print(
            f"[demo]   clip v{row['version']} layer {row['layer']} {row['site']} limit "
            f"{row['limit']:.3g} from step {row['acked_step']} ({row['reason']})"
        )

    # ---------------------------------------------------------------- offline report
    report = store_dir.parent / f"{args.run}-report.html"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "analytics",
            "report",
            "--store",
            store_url,
            "--run",
            args.run,
            "--out",
            str(report),
        ],
        cwd=ROOT,
        check=True,
    )
    print(f"[demo] anomaly report: {report} (+ {report.with_suffix('.json').name})")
    print(
        f"[demo] inspect: .venv/bin/python -m store series --store {store_url} "
        f"--run {args.run} --metric train/loss"
    )
    print(f"[demo] dashboard: make dashboard STORE={store_url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
