"""Detection left in charge, end to end (a real collector process, the tiny model monitored in
lockstep): a clamp whose cause went away relaxes, and stays off; an expert the router starves
while its up-projection grows is caught by its weights; a clean 300-step run is never clamped;
`make demo`'s script reports the injected blow-up as the origin of its incident.

The long sweep (8 demo and 4 tiny seeds x 300 clean steps, every fault at three rates) is
`python -m benchmarks.detection`; these are its representative cases.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from analytics.events import BLOWUP, BLOWUP_RECOVERED, CLAMP, from_frame  # noqa: E402
from collector.process import start_collector, stop_collector  # noqa: E402
from store import open_store  # noqa: E402
from tests.integration.test_closed_loop import run_training  # noqa: E402

SITE = "moe/layer01/expert005"  # fed at step 30 (seed 0, one thread): test_closed_loop's target


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def acting_run(tmp_path, run, injects, steps, **kw):
    url = f"parquet:{tmp_path / run}"
    proc, address = start_collector(url, "--insecure", "--flush-interval", "0.05")
    try:
        run_training(address, run, injects, steps, **kw)
    finally:
        assert stop_collector(proc) == 0
    return url


def test_a_clamp_relaxes_once_its_cause_went_away(tmp_path):
    """15 steps of x1.2 on W_up, then W_up is scaled back (model/faults.py blowup steps=15).
    The clamp binds from the step after its event; once the expert is calm (recovered, its
    weights no longer growing) for ClipPolicy.relax_after = 100 steps, it is switched off."""
    url = acting_run(tmp_path, "relax", ["blowup@30:layer=1,expert=5,factor=1.2,steps=15"], 175)
    with open_store(url) as st:
        events = from_frame(st.events("relax"), "relax")
        clips = st.clips("relax").rows(named=True)
        x = st.series("relax", f"{SITE}/act_maxabs")
    trigger = next(e for e in events if e.decision == CLAMP)
    assert (trigger.kind, trigger.site) == (BLOWUP, SITE) and trigger.step <= 30 + 12
    on, off = clips[0], clips[-1]
    # in effect from the step after (test_closed_loop checks that exactly; here a step later
    # is tolerated: the point is what happens 100 steps on)
    assert trigger.step + 1 <= on["acked_step"] <= trigger.step + 2
    assert math.isfinite(on["limit"])
    steps, vals = x["step"].to_numpy(), x["value"].to_numpy()
    held = vals[(steps >= on["acked_step"]) & (steps < off["acked_step"])]
    assert held.max() <= on["limit"] ** 2 * (1 + 1e-5)  # bounded while in force
    rec = next(e for e in events if e.kind == BLOWUP_RECOVERED and e.site == SITE)
    assert rec.step >= 45 + 10  # calm only after the cause went away at step 45
    assert len(clips) == 2 and off["limit"] == math.inf and off["reason"].startswith("relax:")
    assert off["step"] >= rec.step + 100  # relax_after steps of calm, none earlier
    assert not [e for e in events if e.decision == CLAMP and e.step > trigger.step]


def test_a_starved_expert_whose_weights_grow_is_caught(tmp_path):
    """The default target of `--inject blowup@30` on the tiny preset (deepest MoE layer, expert
    0): the router stops feeding it once it grows, so from then on its activations say
    nothing; its weights do (main raised nothing in 60 steps here). How many tokens it gets
    from the event's step on depends on the CPU's float rounding (the growth is chaotic): 186,
    84 then none on one machine, 1, 56, 135, 3, 0 on another (torch 2.13, seed 0); what holds on
    both is that it was fed before the event and starved (a handful of tokens at most) within
    five steps of it."""
    url = acting_run(tmp_path, "starved", ["blowup@30"], 60, lockstep=False)
    with open_store(url) as st:
        events = from_frame(st.events("starved"), "starved")
        tokens = st.series("starved", "moe/layer04/expert000/tokens")["value"].to_numpy()
    print("\n" + "\n".join(e.brief() + f" {e.decision}" for e in events))
    ev = next(e for e in events if e.kind == BLOWUP)
    before, after = tokens[ev.step - 10 : ev.step], tokens[ev.step : ev.step + 5]
    print(f"tokens from step {ev.step - 10}: {tokens[ev.step - 10 : ev.step + 5].tolist()}")
    assert before.min() > 100 and after.min() <= 5  # fed, then starved as it grew
    assert (ev.site, ev.layer, ev.expert) == ("moe/layer04/expert000", 4, 0)
    assert ev.detail["rule"] == "weights" and ev.decision == CLAMP and ev.step <= 30 + 12


def test_a_clean_tiny_run_is_never_clamped(tmp_path):
    url = acting_run(tmp_path, "clean", [], 300, seed=1, lockstep=False)
    with open_store(url) as st:
        events = from_frame(st.events("clean"), "clean")
        assert st.clips("clean").height == 0
    assert [e.brief() for e in events if e.kind == BLOWUP or e.decision == CLAMP] == []


def test_the_demo_report_names_the_injected_blowup_as_the_origin(tmp_path):
    """scripts/demo.py (`make demo`), shortened to the tiny preset: the report's "where it
    started" is the injected expert, in the incident that moved the clamp."""
    out = subprocess.run(
        [sys.executable, "scripts/demo.py", "--preset", "tiny", "--steps", "70"]
        + ["--store-dir", str(tmp_path / "store"), "--inject", "blowup@30:layer=1,expert=5"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads((tmp_path / "demo-report.json").read_text())
    origin, head = found["origin"], found["incidents"][0]
    assert (origin["site"], origin["kind"], origin["expert"]) == (SITE, "blowup", 5)
    assert 29 <= origin["step"] <= 42 and head["clamped"] and head["cause"] == "activation growth"
    assert f"origin: incident {head['id']}: blowup at {SITE}" in out.stdout
    page = (tmp_path / "demo-report.html").read_text()
    assert 'id="incidents"' in page and f"blowup at {SITE}" in page
