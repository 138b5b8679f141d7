"""Detection benchmark: recall, delay and growth at detection per fault, false events on clean runs.

    python -m benchmarks.detection [--demo-seeds 0-7] [--tiny-seeds 0-3] [--fault-seeds 0-1]
                                   [--cache runs/detection-cache] [--out FILE]

Every case is a recorded training run (benchmarks/detection_runs.py: model/ with a hooks
Monitor streaming to a real collector, recorded once into the cache, ~1.5 CPU-hours for the
default seeds on 2 cores, then minutes) replayed through the default DetectorSet and its
decision layer, frame by frame as the collector builds them. Per (preset, seed):

  clean            300 steps, no fault: every blow-up event and clamp decision is a false one,
                   every other warning is listed with its step and site
  blowup xR TGT    from step 100, W_up of the target x R per step (R = 1.2, 1.1, 1.05), the
                   target chosen from the token shares of steps 90-99: "fed" (a normally fed
                   expert of the deepest MoE layer), "middle" (of a middle layer), "low" (fed
                   below 0.25 of the uniform share, but fed), "starved" (no token on most of
                   those steps); caught = a clamp decision on the target itself
  ... fed @105     the same at x1.2 / x1.05 from step 105, half a parameter-norm period later
  dead-expert      the "middle" target killed (router offset, weights x0.5 per step)
  lr-spike         the learning rate x30 for 5 steps: caught = an lr_change and no clamp at all
  nan              a NaN inside the "fed" target for one step (site=hidden): caught = the event
                   names that expert (and its rank)

The table: caught/seeds, delay (detection step - fault step), growth of the target's max|h|
at detection (over its median of the 10 fed steps before the fault) and of its parameter norm
(over the last measurement before), the rule that fired; then per preset the false blow-up /
clamp events and all warnings per 1,000 clean steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from analytics.detectors import DetectorSet
from analytics.events import BLOWUP, CLAMP, EXPERT_DEATH, LR_CHANGE, NONFINITE, Event
from benchmarks.detection_runs import FORK, STEPS, Recording

RATES = (1.2, 1.1, 1.05)
BLOWUP_STEPS = 50  # steps recorded after the fault starts
FAULT_STEPS = {"dead-expert": 60, "lr-spike": 50, "nan": 10}
SHARE_WINDOW = 10  # prefix steps whose token shares pick the targets
MID_PERIOD = 5  # a second fault start, between two parameter-norm measurements (K = 10)


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # "clean", "blowup", "dead-expert", "lr-spike", "nan"
    injects: tuple[str, ...]
    stop: int  # last recorded step + 1
    layer: int = -1  # the target (-1: none)
    expert: int = -1
    target: str = ""  # "fed", "middle", "low", "starved"
    rate: float = 0.0
    share: float = float("nan")  # the target's mean token share before the fault
    at: int = FORK  # the step the fault starts


def shares(pre: Recording) -> tuple[list[int], np.ndarray]:
    """(MoE layers, [layer, expert] mean token share over the prefix's last SHARE_WINDOW
    steps, and the fraction of those steps the expert got no token)."""
    index = pre.index()
    ids = index.expert_grid("moe/", "tokens")
    tok = pre.values[-SHARE_WINDOW:][:, ids].astype(np.float64)  # [S, L, E]
    total = tok.sum(axis=2, keepdims=True)
    share = tok * ids.shape[1] / np.where(total > 0, total, np.nan)
    return index.moe_layers, share


def targets(pre: Recording) -> dict[str, tuple[int, int, float]]:
    """name -> (layer, expert, share): a normally fed expert of the deepest layer ("fed") and
    of a middle layer ("middle"), an expert fed below 0.25 of the uniform share but not
    starved ("low"), and one that got no token on most of those steps ("starved"), when the
    seed has one."""
    layers, share = shares(pre)
    mean = np.nanmean(share, axis=0)  # [L, E]
    empty = (share == 0).mean(axis=0)
    out = {}
    for name, row in (("fed", len(layers) - 1), ("middle", len(layers) // 2)):
        ok = (share[:, row] >= 0.5).all(axis=0)
        cand = np.where(ok, np.abs(np.log(mean[row])), np.inf)
        e = int(np.argmin(cand))
        out[name] = (layers[row], e, float(mean[row, e]))
    low = (mean > 0.02) & (mean < 0.25) & (empty <= 0.3)
    if low.any():  # the lowest such share, deepest layer first
        r, e = max(zip(*np.nonzero(low)), key=lambda re: (re[0], -mean[re]))
        out["low"] = (layers[r], int(e), float(mean[r, e]))
    starved = empty >= 0.7
    if starved.any():
        r, e = max(zip(*np.nonzero(starved)), key=lambda re: (re[0], -re[1]))
        out["starved"] = (layers[r], int(e), float(mean[r, e]))
    return out


def cases_for(rec, preset: str, seed: int, clean_only: bool = False) -> list[Case]:
    from benchmarks.detection_runs import prefix

    out = [Case("clean", "clean", (), STEPS)]
    if clean_only:
        return out
    pre, _ = prefix(rec, preset, seed)
    tg = targets(pre)
    for target, (layer, expert, share) in tg.items():
        for rate in RATES:
            spec = f"blowup@{FORK}:layer={layer},expert={expert},factor={rate}"
            out.append(
                Case(
                    f"blowup-x{rate}-{target}",
                    "blowup",
                    (spec,),
                    FORK + BLOWUP_STEPS,
                    layer,
                    expert,
                    target,
                    rate,
                    share,
                )
            )
    # the same fault half a parameter-norm period later: what the measurement phase costs
    layer, expert, share = tg["fed"]
    for rate in (RATES[0], RATES[-1]):
        at = FORK + MID_PERIOD
        out.append(
            Case(
                f"blowup-x{rate}-fed-at{at}",
                "blowup",
                (f"blowup@{at}:layer={layer},expert={expert},factor={rate}",),
                at + BLOWUP_STEPS,
                layer,
                expert,
                "fed, mid-period",
                rate,
                share,
                at,
            )
        )
    layer, expert, share = tg["middle"]
    out.append(
        Case(
            "dead-expert",
            "dead-expert",
            (f"dead-expert@{FORK}:layer={layer},expert={expert}",),
            FORK + FAULT_STEPS["dead-expert"],
            layer,
            expert,
            "middle",
            share=share,
        )
    )
    out.append(Case("lr-spike", "lr-spike", (f"lr-spike@{FORK}",), FORK + FAULT_STEPS["lr-spike"]))
    layer, expert, share = tg["fed"]
    out.append(
        Case(
            "nan-hidden",
            "nan",
            (f"nan@{FORK}:layer={layer},expert={expert},site=hidden",),
            FORK + FAULT_STEPS["nan"],
            layer,
            expert,
            "fed",
            share=share,
        )
    )
    return out


# ---- replay and judge ------------------------------------------------------------------------
def replay(rec: Recording) -> list[Event]:
    """The default DetectorSet (with its decision layer) over a recorded run, step by step."""
    index, det = rec.index(), DetectorSet()
    return [e for f in rec.frames() for e in det.observe(f, index)]


def _median_before(x: np.ndarray, steps: np.ndarray, before: int, n: int = 10) -> float:
    sel = x[(steps < before) & np.isfinite(x) & (x > 0)][-n:]
    return float(np.median(sel)) if sel.size else float("nan")


def judge_fault(case: Case, rec: Recording, events: list[Event]) -> dict:
    """What a faulted run shows: the first clamp decision on the target (or, for the other
    faults, the event that names them) with its delay and the growth it allowed."""
    out: dict = {"caught": False, "delay": None, "growth": None, "weights": None, "note": ""}
    after = [e for e in events if e.step >= case.at]
    if case.kind == "blowup":
        site = f"moe/layer{case.layer:02d}/expert{case.expert:03d}"
        hit = next((e for e in after if e.kind == BLOWUP and e.site == site), None)
        wrong = sorted({e.site for e in after if e.decision == CLAMP and e.site != site})
        if hit is None:
            return {**out, "note": "missed"}
        steps = rec.steps
        x = rec.column(f"{site}/act_maxabs")
        fed = rec.column(f"{site}/tokens") > 0
        x = np.where(fed, x, np.nan)
        base = _median_before(x, steps, case.at)
        now = x[(steps <= hit.step) & np.isfinite(x)]
        p = rec.column(f"params/{site[len('moe/') :]}/fro_norm")
        p_before = p[(steps < case.at) & np.isfinite(p)]
        p_now = p[(steps <= hit.step) & np.isfinite(p)]
        return {
            "caught": hit.decision == CLAMP,
            "delay": hit.step - case.at,
            "growth": float(now[-1] / base) if now.size and base > 0 else None,
            "weights": float(p_now[-1] / p_before[-1]) if p_before.size else None,
            "rule": hit.detail.get("rule"),
            "decision": hit.decision,
            "note": hit.detail.get("reason", "") + (f"; also clamped {wrong}" if wrong else ""),
        }
    kind, site = {
        "dead-expert": (EXPERT_DEATH, f"moe/layer{case.layer:02d}/expert{case.expert:03d}"),
        "lr-spike": (LR_CHANGE, "train/lr"),
        "nan": (NONFINITE, None),
    }[case.kind]
    hit = next((e for e in after if e.kind == kind and (site is None or e.site == site)), None)
    clamps = [e for e in after if e.decision == CLAMP]
    if hit is None:
        return {**out, "note": "missed"}
    named = (hit.layer, hit.expert) == (case.layer, case.expert) if case.kind == "nan" else True
    return {
        **out,
        "caught": named and not clamps,
        "delay": hit.step - case.at,
        "decision": hit.decision,
        "note": f"{hit.site} expert {hit.expert} ranks {hit.detail.get('ranks')}"
        if case.kind == "nan"
        else (f"clamped {[e.site for e in clamps]}" if clamps else "no clamp"),
    }


# ---- the sweep and its table -------------------------------------------------------------------
def _seeds(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi or lo) + 1)) if text else []


def _load(rec_or_none, cache, preset, seed, case) -> Recording:
    from benchmarks.detection_runs import Recorder, cache_path, recording

    path = cache_path(cache, preset, seed, case.name)
    pre = cache_path(cache, preset, seed, "prefix")
    if path.exists() and pre.exists():
        return Recording.load(pre).then(Recording.load(path), f"{preset}-s{seed}-{case.name}")
    if rec_or_none[0] is None:
        rec_or_none[0] = Recorder(cache)
    return recording(rec_or_none[0], preset, seed, case.name, list(case.injects), case.stop)


def _range(xs: list, fmt: str = "{:.0f}") -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    lo, hi = min(xs), max(xs)
    return (
        fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)}-{fmt.format(hi)}"
    )


def sweep(presets: dict[str, tuple[list[int], list[int]]], cache) -> tuple[list[dict], list[dict]]:
    """presets: name -> (clean seeds, fault seeds). Returns (fault rows, clean rows)."""
    recorder = [None]
    faults: dict[tuple, list[dict]] = {}
    cleans = []
    try:
        for preset, (clean_seeds, fault_seeds) in presets.items():
            for seed in sorted(set(clean_seeds) | set(fault_seeds)):
                if recorder[0] is None:
                    from benchmarks.detection_runs import Recorder

                    recorder[0] = Recorder(cache)
                for case in cases_for(
                    recorder[0], preset, seed, clean_only=seed not in fault_seeds
                ):
                    if case.kind == "clean" and seed not in clean_seeds:
                        continue
                    rec = _load(recorder, cache, preset, seed, case)
                    events = replay(rec)
                    if case.kind == "clean":
                        cleans.append(
                            {
                                "preset": preset,
                                "seed": seed,
                                "steps": int(rec.steps.size),
                                "events": events,
                            }
                        )
                        continue
                    key = (preset, case.kind, case.target, case.rate, case.at)
                    faults.setdefault(key, []).append(
                        {
                            **judge_fault(case, rec, events),
                            "seed": seed,
                            "share": case.share,
                            "site": f"layer {case.layer} expert {case.expert}",
                        }
                    )
    finally:
        if recorder[0] is not None:
            recorder[0].close()
    rows = []
    for (preset, kind, target, rate, at), rs in faults.items():
        rows.append(
            {
                "preset": preset,
                "fault": (f"{kind} x{rate}" if kind == "blowup" else kind) + f" @{at}",
                "target": f"{target} (share {_range([r['share'] for r in rs], '{:.2f}')})"
                if target
                else "-",
                "caught": f"{sum(r['caught'] for r in rs)}/{len(rs)}",
                "delay": _range([r["delay"] for r in rs]),
                "growth": _range([r["growth"] for r in rs], "{:.1f}x"),
                "weights": _range([r["weights"] for r in rs], "{:.2f}x"),
                "rule": "/".join(sorted({str(r.get("rule") or r.get("decision")) for r in rs})),
                "notes": "; ".join(sorted({r["note"] for r in rs if r["note"]})),
            }
        )
    clean_rows = []
    for preset in presets:
        runs = [c for c in cleans if c["preset"] == preset]
        if not runs:
            continue
        steps = sum(c["steps"] for c in runs)
        evs = [e for c in runs for e in c["events"]]
        warn = [e for e in evs if e.severity != "info"]
        kinds: dict[str, int] = {}
        for e in warn:
            kinds[e.kind] = kinds.get(e.kind, 0) + 1
        clean_rows.append(
            {
                "preset": preset,
                "runs": f"{len(runs)} seeds x {runs[0]['steps']} steps",
                "blowup": sum(e.kind == BLOWUP for e in evs),
                "clamps": sum(e.decision == CLAMP for e in evs),
                "per_1000": 1000
                * sum(e.kind == BLOWUP or e.decision == CLAMP for e in evs)
                / steps,
                "warnings_per_1000": 1000 * len(warn) / steps,
                "warnings": ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) or "none",
                "where": "; ".join(
                    f"s{c['seed']}: "
                    + ", ".join(
                        f"{e.kind}@{e.step} {e.site}" for e in c["events"] if e.severity != "info"
                    )
                    for c in runs
                    if any(e.severity != "info" for e in c["events"])
                ),
            }
        )
    return rows, clean_rows


def table(rows: list[dict], clean_rows: list[dict]) -> str:
    out = [
        f"Faults start at step {FORK} (@{FORK}, a parameter-norm measurement step: the worst "
        f"phase for the weights rule) or {FORK + MID_PERIOD} of a {STEPS}-step schedule; "
        "delay = detection step - fault step; "
        "growth = the target's max|h| at detection over its median of the 10 fed steps before "
        "the fault; weights = its parameter norm at detection over the last one before.",
        "",
        "| preset | fault | target | caught | delay (steps) | growth of max\\|h\\| at detection "
        "| weight-norm growth | rule | notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['preset']} | {r['fault']} | {r['target']} | {r['caught']} | {r['delay']} | "
            f"{r['growth']} | {r['weights']} | {r['rule']} | {r['notes']} |"
        )
    out += [
        "",
        "| preset | clean runs | blow-up events | clamp decisions | false blow-up/clamp events "
        "per 1,000 clean steps | warnings per 1,000 clean steps | warnings |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in clean_rows:
        out.append(
            f"| {c['preset']} | {c['runs']} | {c['blowup']} | {c['clamps']} | {c['per_1000']:.2f} | "
            f"{c['warnings_per_1000']:.2f} | {c['warnings']} |"
        )
    out += ["", "Warnings on clean runs (kind@step site):", ""]
    out += [f"- {c['preset']}: {c['where'] or 'none'}" for c in clean_rows]
    return "\n".join(out)


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        return ""


def main(argv: list[str] | None = None) -> None:
    import argparse
    import logging
    import platform
    import time

    from benchmarks.detection_runs import CACHE

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo-seeds", default="0-7", help="clean demo runs (300 steps each)")
    ap.add_argument("--tiny-seeds", default="0-3", help="clean tiny runs (300 steps each)")
    ap.add_argument("--fault-seeds", default="0-1", help="seeds of every fault case")
    ap.add_argument("--cache", default=str(CACHE), help="recorded runs (recorded when missing)")
    ap.add_argument("--out", help="also write the table here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("model.train", "collector", "stepwatch", "analytics"):
        logging.getLogger(name).setLevel(logging.ERROR)
    t0 = time.time()
    faults = _seeds(args.fault_seeds)
    rows, clean_rows = sweep(
        {"demo": (_seeds(args.demo_seeds), faults), "tiny": (_seeds(args.tiny_seeds), faults)},
        args.cache,
    )
    text = table(rows, clean_rows)
    head = (
        f"{time.strftime('%Y-%m-%d %H:%M')} on {_cpu() or platform.machine()}, "
        f"{__import__('os').cpu_count()} CPUs, Python {platform.python_version()}; replay of "
        f"the recorded runs took {time.time() - t0:.0f} s"
    )
    print(head + "\n\n" + text)
    if args.out:
        from pathlib import Path

        Path(args.out).write_text(head + "\n\n" + text + "\n")


if __name__ == "__main__":
    main()
