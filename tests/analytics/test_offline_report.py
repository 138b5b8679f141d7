"""Offline replay over a real store equals the detectors fed directly; per-rank values name
the rank of a NaN; the report is one self-contained HTML page with a matching JSON twin."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from analytics.detectors import DetectorSet
from analytics.events import to_records
from analytics.offline import detect_offline
from analytics.report import write_report
from store import ClipRecord, MetricDict, RunInfo, StepStatus, ValueBatch, open_store
from tests.analytics.synthetic import SyntheticRun, blowup, catalogue, death

STEPS = 90


def faulty() -> SyntheticRun:
    syn = SyntheticRun(seed=2, run="faulty")
    syn.faults += [blowup(2, 3, start=50), death(1, 6, start=30)]
    syn.nan_at[70] = ["resid/layer02/rms", "train/loss", "grad/global_norm"]
    return syn


def store_run(store, syn: SyntheticRun, steps: int, world: int = 2) -> None:
    rows = catalogue()
    store.open_run(RunInfo(syn.run, world, "{}", 1.0))
    store.write_metrics(
        syn.run,
        MetricDict(
            np.arange(len(rows), dtype=np.int32),
            [r[0] for r in rows],
            np.array([r[1] for r in rows], np.int32),
            np.array([r[2] for r in rows], np.int32),
            np.array([r[3] for r in rows], np.int32),
            [r[4] for r in rows],
            [""] * len(rows),
            ["mean"] * len(rows),
        ),
    )
    for s in range(steps):
        v = syn.values(s)
        ids = np.array([syn.index.find(n) for n in v], np.int32)
        vals = np.array(list(v.values()), np.float32)
        store.write_reduced(
            syn.run, ValueBatch(np.full(ids.size, s), ids, vals, n_ranks=np.full(ids.size, world))
        )
        for r in range(world):  # rank 1 carries the NaNs, rank 0 stays finite
            rv = np.where(np.isnan(vals) & (r == 0), 1.0, vals).astype(np.float32)
            store.write_raw(
                syn.run,
                ValueBatch(np.full(ids.size, s), ids, rv, rank=np.full(ids.size, r, np.int32)),
            )
        store.write_steps(syn.run, [StepStatus(s, world)])
    store.flush()


@pytest.fixture
def stored(tmp_path):
    url = f"parquet:{tmp_path / 'st'}"
    with open_store(url) as st:
        store_run(st, faulty(), STEPS)
    with open_store(url) as st:
        yield st


def test_offline_equals_direct_and_names_the_nan_rank(stored):
    offline = detect_offline(stored, "faulty")
    syn, det = faulty(), DetectorSet()
    direct = [e for s in range(STEPS) for e in det.observe(syn.frame(s), syn.index)]
    kinds = {e.kind for e in offline}
    assert {"maxabs_spike", "expert_death", "nonfinite"} <= kinds
    nan = next(e for e in offline if e.kind == "nonfinite")
    assert nan.site == "resid/layer02" and nan.step == 70 and nan.detail["ranks"] == [1]
    strip = [e for e in offline if e.kind != "nonfinite"]
    assert strip == sorted(
        (e for e in direct if e.kind != "nonfinite"), key=lambda e: (e.step, e.kind, e.site)
    )


def test_report_is_self_contained_with_a_json_twin(stored, tmp_path):
    events = detect_offline(stored, "faulty")
    blow = next(e for e in events if e.kind == "maxabs_spike")
    # what the collector would have stored: the events and a clip that took effect
    stored.write_events("faulty", to_records(events))
    stored.write_clips(
        "faulty",
        [
            ClipRecord(
                1,
                blow.step,
                2,
                "routed",
                3.0,
                f"{blow.kind}@{blow.step} {blow.site}",
                blow.step + 1,
            )
        ],
    )
    stored.flush()
    out = tmp_path / "r" / "report.html"
    found = write_report(stored, "faulty", out)
    page = out.read_text()
    twin = json.loads(out.with_suffix(".json").read_text())
    assert twin == json.loads(json.dumps(found))
    embedded = re.search(
        r'<script type="application/json" id="findings">(.*?)</script>', page, re.S
    ).group(1)
    assert json.loads(embedded.replace("<\\/", "</")) == twin
    # nothing is fetched: no external src/href, no stylesheet or script links
    assert not re.search(r'(src|href)="(https?:)?//', page)
    assert "<link" not in page and "<script src" not in page
    assert page.count('class="chart"') >= 3 and page.count('class="heatmap"') == 2
    assert page.count("data:image/png;base64,") == 2
    s = found["summary"]
    assert s["offline_matches_online"] is True and s["nonfinite_loss_steps"] == [70]
    (dead,) = found["dead_experts"]
    assert (dead["site"], dead["onset_step"]) == ("moe/layer01/expert006", 30)
    b = next(b for b in found["blowups"] if b["site"] == blow.site)
    assert (
        b["clips"][0]["bound_maxabs"] == 9.0 and b["effect"]["clip_in_effect_from"] == blow.step + 1
    )
    assert b["effect"]["bounded"] is False  # synthetic data ignores the clamp: said so
    # two incidents: the blow-up of layer 2 (and the NaN that followed it in that layer), which
    # moved a clamp, is the headline; the death in layer 1 since step 30 stays apart
    o = found["origin"]
    assert (o["site"], o["kind"]) == (blow.site, "blowup") and 50 <= o["step"] <= blow.step
    by_origin = {i["origin"]["site"]: i for i in found["incidents"]}
    assert set(by_origin) == {blow.site, dead["site"]}
    assert by_origin[dead["site"]]["origin"]["onset_step"] == 30
    assert by_origin[blow.site]["kinds"] == ["blowup", "maxabs_spike", "nonfinite"]
    assert by_origin[blow.site]["clamped"] and not by_origin[dead["site"]]["clamped"]


def test_report_cli_and_unknown_run(stored, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    url = f"parquet:{tmp_path / 'st'}"
    stored.close()
    out = tmp_path / "cli.html"
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "analytics",
            "report",
            "--store",
            url,
            "--run",
            "faulty",
            "--out",
            str(out),
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert out.exists() and out.with_suffix(".json").exists() and "origin" in ok.stdout
    ev = subprocess.run(
        [sys.executable, "-m", "analytics", "events", "--store", url, "--run", "faulty"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ev.returncode == 0, ev.stderr
    lines = ev.stdout.splitlines()
    assert lines[0] == (
        "step,kind,site,value,threshold,severity,onset_step,confidence,decision,incident,detail"
    )
    with open_store(url) as st:
        events = detect_offline(st, "faulty")
    assert len(lines) - 1 == len(events)
    assert {line.split(",")[8] for line in lines[1:]} == {e.decision for e in events}
    inc = subprocess.run(
        [sys.executable, "-m", "analytics", "events", "--store", url, "--run", "faulty"]
        + ["--incidents"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert inc.returncode == 0, inc.stderr
    rows = inc.stdout.splitlines()
    assert rows[0].startswith("incident,origin_kind,origin_site,layer,expert,began,detected")
    # headline first: the blow-up of layer 2 (with the NaN that followed), then the death
    assert rows[1].split(",")[1:3] == ["blowup", "moe/layer02/expert003"]
    assert rows[2].split(",")[1:3] == ["expert_death", "moe/layer01/expert006"]
    assert len(rows) == 3
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "analytics",
            "report",
            "--store",
            url,
            "--run",
            "nope",
            "--out",
            str(out),
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "nope" in bad.stderr
