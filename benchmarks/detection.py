"""Detection benchmark: recall, delay and growth at detection per fault, false events on clean runs.

    python -m benchmarks.detection [--demo-seeds 0-7] [--tiny-seeds 0-3] [--fault-seeds 0-1]

CASES
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
    after = [e for e in events if e.step >= FORK]
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
        base = _median_before(x, steps, FORK)
        now = x[(steps <= hit.step) & np.isfinite(x)]
        p = rec.column(f"params/{site[len('moe/') :]}/fro_norm")
        p_before = p[(steps < FORK) & np.isfinite(p)]
        p_now = p[(steps <= hit.step) & np.isfinite(p)]
        return {
            "caught": hit.decision == CLAMP,
            "delay": hit.step - FORK,
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
        "delay": hit.step - FORK,
        "decision": hit.decision,
        "note": f"{hit.site} expert {hit.expert} ranks {hit.detail.get('ranks')}"
        if case.kind == "nan"
        else (f"clamped {[e.site for e in clamps]}" if clamps else "no clamp"),
    }
