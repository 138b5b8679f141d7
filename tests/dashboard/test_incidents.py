"""The dashboard shows the incidents of a run (headline first, each with its origin) and what
the decision layer made of each event, from the events the collector stored."""

from __future__ import annotations

import json

from dashboard import data
from store import EventRecord, open_store
from tests.dashboard.conftest import check, run_app, table_with, texts


def record(step, kind, site, onset, incident, decision, severity="warning", **detail):
    detail.update(incident=incident, decision=decision)
    return EventRecord(
        step=step,
        kind=kind,
        site=site,
        value=1.0,
        threshold=1.0,
        severity=severity,
        onset_step=onset,
        detail=json.dumps(detail),
    )


EVENTS = [
    record(5, "expert_death", "moe/layer04/expert003", 1, 0, "warn", layer=4, expert=3),
    record(6, "blowup", "moe/layer02/expert001", 3, 1, "clamp", layer=2, expert=1),
    record(7, "grad_spike", "grad/global_norm", 7, 1, "warn"),
    record(7, "blowup_recovered", "moe/layer02/expert001", 6, 1, "info", "info", layer=2),
]


def test_incidents_are_listed_headline_first_with_their_origin(recorded, monkeypatch, tmp_path):
    url = recorded.copy(tmp_path / "store")
    with open_store(url) as s:
        s.write_events("tiny-a", EVENTS)
    with open_store(url) as s:
        inc = data.incidents(data.normalize_events(s.events("tiny-a")))
    # the blow-up moved a clamp: it heads the list although the death began earlier
    assert inc.select("incident", "origin", "began", "clamped", "events").rows() == [
        (1, "blowup at moe/layer02/expert001", 3, True, 2),
        (0, "expert_death at moe/layer04/expert003", 1, False, 1),
    ]
    at = run_app(url, monkeypatch, runs=["tiny-a"])
    check(at)
    assert "Incidents" in texts(at)
    told = [t for t in texts(at) if "incident " in t]
    assert told[0].startswith("incident 1: blowup at moe/layer02/expert001")  # the headline
    assert told[1].startswith("also incident 0: expert_death at moe/layer04/expert003")
    table = table_with(at, "cause")
    assert table["incident"].tolist() == [1, 0]
    assert table["cause"].tolist() == ["activation growth", "expert death"]
    events = table_with(at, "decision")
    assert events["decision"].tolist() == ["warn", "clamp", "info", "warn"]  # (step, kind)
    assert events["incident"].tolist() == [0, 1, 1, 1]


def test_a_run_without_events_has_no_incident_table(recorded, monkeypatch):
    at = run_app(recorded.url, monkeypatch, runs=["tiny-b"])
    assert "Incidents" not in texts(at) and "no events recorded" in texts(at)
    assert data.incidents(data.normalize_events(None)).height == 0
