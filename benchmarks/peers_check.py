"""Read back what one run of benchmarks/peers.py stored, with each system's own reader.

    python -m benchmarks.peers_check SYSTEM M S DIR     (started by benchmarks/peers.py)

Every step must hold exactly the M names of the workload (none missing, none extra) with
exactly the values logged (float32 equality; wandb's JSON and TensorBoard's simple_value
round-trip float32 exactly). Readers:
  stepwatch    the store's read API, `store.open_store("parquet:DIR/store")`: `at_step` of
               rank 0 (the raw vector) and reduced, every step; `steps` says all complete
  wandb        the offline run file (run-*.wandb): W&B's LevelDB-style record log, parsed with
               wandb's own Record protobuf; history items, `_`-keys left out. wandb 0.31 ships
               no Python reader (wandb.sdk.internal.datastore is gone), so the ~30-line
               framing reader is here, checksums included
  tensorboard  tensorboard's `event_file_loader.LegacyEventFileLoader` (checksums verified)
  np.save      np.load of every step file
Bytes on disk: every file the system left in DIR (for wandb, the run directory without its
debug logs), over the M x S values logged. Prints one JSON line: verified ("yes" or what is
wrong), values (stored values read back), bytes.
"""

from __future__ import annotations

import json
import struct
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl

from benchmarks.peers_run import RUN, base_values, metric_names, step_values

# W&B's run file: a 7-byte file header, then 32 KiB blocks of records, each with a 7-byte
# header (crc32 seeded with the type byte, length, type); a record may span blocks.
WANDB_IDENT, WANDB_BLOCK, WANDB_HEADER = b":W&B", 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class Checker:
    def __init__(self, m: int, steps: int) -> None:
        self.m, self.steps, self.base = m, steps, base_values(m)
        self.names = pl.DataFrame({"name": metric_names(m), "idx": np.arange(m)})
        self.values = 0

    def step(self, s: int, names: list[str], values: np.ndarray) -> str | None:
        """None if step s holds exactly the workload's names and values, else what differs."""
        self.values += len(names)
        if len(names) != self.m:
            return f"count mismatch: step {s} has {len(names):,} of {self.m:,} values"
        got = pl.DataFrame({"name": names, "value": np.asarray(values, np.float32)})
        j = self.names.join(got, on="name", how="left")
        if j["value"].null_count():
            return f"count mismatch: step {s} misses {j['value'].null_count():,} names"
        want = step_values(self.base, s)[j["idx"].to_numpy()]
        bad = int((j["value"].to_numpy() != want).sum())
        return f"value mismatch: step {s}, {bad:,} values differ" if bad else None

    def all_steps(self, per_step: dict[int, tuple[list[str], np.ndarray]]) -> str:
        if sorted(per_step) != list(range(self.steps)):
            return (
                f"count mismatch: steps {sorted(per_step)[:8]} stored, 0..{self.steps - 1} logged"
            )
        for s in range(self.steps):
            why = self.step(s, *per_step[s])
            if why:
                return why
        return "yes"


def dir_bytes(root: Path, skip: str | None = None) -> int:
    return sum(
        f.stat().st_size
        for f in root.rglob("*")
        if f.is_file() and not (skip and skip in f.relative_to(root).parts)
    )


# ---- stepwatch ----------------------------------------------------------------------------------
def check_stepwatch(c: Checker, out: Path) -> dict:
    from store import open_store

    with open_store(f"parquet:{out / 'store'}") as st:
        steps = st.steps(RUN)
        raw = {s: st.at_step(RUN, s, rank=0) for s in range(c.steps)}
        red = {s: st.at_step(RUN, s) for s in range(c.steps)}
    verified = c.all_steps(
        {s: (f["name"].to_list(), f["value"].to_numpy()) for s, f in raw.items()}
    )
    n_raw = c.values
    if verified == "yes":
        verified = c.all_steps(
            {s: (f["name"].to_list(), f["value"].to_numpy()) for s, f in red.items()}
        )
    if verified == "yes" and not (steps.height == c.steps and steps["complete"].all()):
        verified = (
            f"count mismatch: {steps.height} barrier rows, complete={steps['complete'].to_list()}"
        )
    return {
        "verified": verified,
        "values": c.values,
        "raw": n_raw,
        "reduced": c.values - n_raw,
        "bytes": dir_bytes(out / "store"),
    }


# ---- wandb --------------------------------------------------------------------------------------
def wandb_records(path: Path) -> Iterator[bytes]:
    data = path.read_bytes()
    if data[:4] != WANDB_IDENT:
        raise ValueError(f"{path.name}: not a W&B run file (header {data[:7]!r})")
    pos, parts = WANDB_HEADER, b""
    while pos + WANDB_HEADER <= len(data):
        left = WANDB_BLOCK - pos % WANDB_BLOCK
        if left < WANDB_HEADER:  # block trailer: zero padding
            pos += left
            continue
        crc, n, kind = struct.unpack_from("<IHB", data, pos)
        if kind == 0 and n == 0:  # zero-filled rest of the last block
            break
        chunk = data[pos + WANDB_HEADER : pos + WANDB_HEADER + n]
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc:
            raise ValueError(f"{path.name}: bad record checksum at byte {pos}")
        pos += WANDB_HEADER + n
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            parts = chunk
        elif kind == MIDDLE:
            parts += chunk
        elif kind == LAST:
            yield parts + chunk
        else:
            raise ValueError(f"{path.name}: record type {kind} at byte {pos}")


def check_wandb(c: Checker, out: Path) -> dict:
    from wandb.proto import wandb_internal_pb2 as wpb

    (path,) = out.glob("wandb/offline-run-*/run-*.wandb")
    per_step: dict[int, tuple[list[str], np.ndarray]] = {}
    for raw in wandb_records(path):
        rec = wpb.Record.FromString(raw)
        if rec.WhichOneof("record_type") != "history":
            continue
        names, values, step = [], [], None
        for it in rec.history.item:
            key = it.key or "/".join(it.nested_key)
            if key == "_step":
                step = int(json.loads(it.value_json))
            elif not key.startswith("_"):
                names.append(key)
                values.append(json.loads(it.value_json))
        if step is None:
            raise ValueError("a history record without _step")
        per_step[step] = (names, np.array(values, np.float32))
    return {
        "verified": c.all_steps(per_step),
        "values": c.values,
        "bytes": dir_bytes(path.parent, skip="logs"),
    }


# ---- tensorboard, np.save -----------------------------------------------------------------------
def check_tensorboard(c: Checker, out: Path) -> dict:
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    per_step: dict[int, tuple[list[str], np.ndarray]] = {}
    (path,) = out.glob("events.out.tfevents.*")
    for event in LegacyEventFileLoader(str(path)).Load():
        if event.HasField("summary"):
            vals = event.summary.value
            per_step[event.step] = (
                [v.tag for v in vals],
                np.array([v.simple_value for v in vals], np.float32),
            )
    return {"verified": c.all_steps(per_step), "values": c.values, "bytes": dir_bytes(out)}


def check_floor(c: Checker, out: Path) -> dict:
    names = c.names["name"].to_list()
    per_step = {
        int(f.stem.split("-")[1]): (names, np.load(f)) for f in sorted(out.glob("step-*.npy"))
    }
    return {"verified": c.all_steps(per_step), "values": c.values, "bytes": dir_bytes(out)}


CHECKS = {
    "stepwatch": check_stepwatch,
    "wandb": check_wandb,
    "tensorboard": check_tensorboard,
    "np.save": check_floor,
}


def main(argv: list[str]) -> int:
    system, m, steps, out = argv[0], int(argv[1]), int(argv[2]), Path(argv[3])
    try:
        result = CHECKS[system](Checker(m, steps), out)
    except Exception as exc:  # noqa: BLE001 - an unreadable store is a finding, not a crash
        result = {"verified": f"failed: {type(exc).__name__}: {exc}"[:300]}
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
