"""The readers against a tier-written ClickHouse cluster: a coordinator and two tier
collectors (`python -m collector coordinate` / `serve --coordinator`) all writing to two
Debian 18.16 shards on loopback (tests/conftest.py's clickhouse_cluster), four real
monitored ranks of the tiny model with a blow-up injected, then, unchanged, the three
readers a user has:

  store CLI   `python -m store runs / series / steps` lists the run and prints, per rank and
              reduced, the very loss values the ranks handed their Monitor, and a user
              scalar each rank logged (distinct per rank);
  report      `python -m analytics report` replays the detectors over the cluster and finds
              the blow-up at the injected site;
  dashboard   `python -m dashboard --store CLUSTER_URL` in Debian's headless Chromium shows
              the run's header, its loss chart, the user scalar's chart, its expert heatmap
              at the last step, the blow-up as an incident and the clip it caused.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import uuid

import numpy as np
import polars as pl
import pytest
import torch

from collector.process import start_collector, terminate
from hooks import Monitor
from model.monitoring import DeferredMonitor
from model.train import TrainConfig, train
from store import open_store
from tests.integration.test_tier import tier_collectors, train_ranks

pytestmark = pytest.mark.timeout(600)
WORLD, RUN = 4, "tiercl"
BLOWUP_AT, SITE = 30, "moe/layer01/expert005"  # test_tier.py's run (seed 0)
BLOWUP = f"blowup@{BLOWUP_AT}:layer=1,expert=5"
STEPS = 44  # test_tier's event comes by step 42


PROBE = "user/probe"  # a user scalar (Monitor.log), distinct per rank: the loss + 10 x rank


class Sent:
    """A Monitor wrapper that keeps what each step handed the Monitor: the loss, and PROBE,
    which it logs itself (the in-thread ranks train the same model on the same data, so
    their losses alone could not tell one rank's row from another's)."""

    def __init__(self, monitor, rank: int) -> None:
        self.monitor = monitor
        self.rank = rank
        self.loss: dict[int, np.float32] = {}
        self.probe: dict[int, np.float32] = {}

    def attach(self, model, optimizer) -> None:
        self.monitor.attach(model, optimizer)

    def step_begin(self, step: int) -> None:
        self.monitor.step_begin(step)

    def before_optimizer(self, step, grad_norm) -> None:
        self.monitor.before_optimizer(step, grad_norm)

    def step_end(self, step, **kw) -> None:
        self.loss[step] = np.float32(kw["loss"].detach().float().item())
        self.probe[step] = np.float32(self.loss[step] + 10 * self.rank)
        self.monitor.log({PROBE: float(self.probe[step])}, step, reduce="max")
        self.monitor.step_end(step, **kw)

    def close(self) -> None:
        self.monitor.close()


@pytest.fixture(scope="module")
def tier_run(clickhouse_cluster, tmp_path_factory):
    """The run on the cluster; returns (store URL, {rank: Sent})."""
    tmp = tmp_path_factory.mktemp("tier-cluster")
    db = f"t_{uuid.uuid4().hex[:12]}"
    url = clickhouse_cluster.url(db)
    with open_store(url):  # migrations on every node, once, before three writers start
        pass
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    co, co_addr = start_collector(url, "--insecure", command="coordinate", log_path=tmp / "co.log")
    addrs: list[str] = []
    sent: dict[int, Sent] = {}
    errors: list[BaseException] = []

    def rank_main(rank: int) -> None:
        def make(model, optimizer):
            mon = Monitor(
                model, optimizer, target=",".join(addrs), run=RUN, rank=rank, world_size=WORLD
            )
            sent[rank] = Sent(mon, rank)
            return sent[rank]

        try:
            cfg = TrainConfig(preset="tiny", steps=STEPS, batch_size=8, seed=0, injects=[BLOWUP])
            assert train(cfg, monitor=DeferredMonitor(make)).monitor_errors == 0
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    try:
        procs, new = tier_collectors(co_addr, tmp, url=url)
    except BaseException:
        terminate(co)
        torch.set_num_threads(threads)
        raise
    addrs += new  # the list rank_main reads
    train_ranks(rank_main, WORLD, errors, co, procs, threads)
    try:
        yield url, sent
    finally:
        for shard in range(len(clickhouse_cluster.servers)):
            clickhouse_cluster.client(shard, f"DROP DATABASE IF EXISTS {db}")


def cli(*args: str) -> str:
    """`python -m ARGS`, its stdout; a non-zero exit fails with its stderr."""
    done = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def csv(text: str) -> pl.DataFrame:
    return pl.read_csv(io.StringIO(text))


def test_the_store_cli_lists_the_run_and_reads_the_values_sent(tier_run):
    url, sent = tier_run
    runs = csv(cli("store", "runs", "--store", url)).filter(pl.col("run") == RUN)
    assert runs["status"].to_list() == ["finished"]
    assert runs["world_size"].to_list() == [WORLD]
    steps = csv(cli("store", "steps", "--store", url, "--run", RUN))
    assert steps["step"].to_list() == list(range(STEPS))
    assert set(steps["n_ranks"].to_list()) == {WORLD}
    assert sorted(sent) == list(range(WORLD))
    for rank, s in sent.items():  # a rank's raw values live on its own shard (by rank)
        for metric, values in (("train/loss", s.loss), (PROBE, s.probe)):
            got = csv(
                cli("store", "series", "--store", url, "--run", RUN, "--metric", metric,
                    "--rank", str(rank))
            )  # fmt: skip
            assert got["step"].to_list() == list(range(STEPS))
            want = np.array([values[i] for i in range(STEPS)], np.float32)
            assert np.array_equal(got["value"].to_numpy().astype(np.float32), want), (
                rank,
                metric,
            )
    top = csv(cli("store", "series", "--store", url, "--run", RUN, "--metric", PROBE))
    want = np.array([max(sent[r].probe[i] for r in range(WORLD)) for i in range(STEPS)])
    assert np.array_equal(top["value"].to_numpy().astype(np.float32), want)  # max: rank 3's
    reduced = csv(cli("store", "series", "--store", url, "--run", RUN, "--metric", "train/loss"))
    assert reduced["step"].to_list() == list(range(STEPS))
    mean = np.array(
        [np.mean([np.float64(sent[r].loss[i]) for r in range(WORLD)]) for i in range(STEPS)]
    )  # the coordinator's mean: float64 sum of the float32 values over the count
    np.testing.assert_allclose(reduced["value"].to_numpy(), mean, rtol=1e-6)


def test_the_offline_report_finds_the_blowup(tier_run, tmp_path):
    url, _ = tier_run
    out = tmp_path / "report.html"
    printed = cli("analytics", "report", "--store", url, "--run", RUN, "--out", str(out))
    assert f"wrote {out}" in printed
    found = json.loads(out.with_suffix(".json").read_text())
    hits = [e for e in found["events"] if e["kind"] == "blowup" and e["site"] == SITE]
    assert hits, [(e["kind"], e["site"], e["step"]) for e in found["events"]]
    assert BLOWUP_AT <= min(e["step"] for e in hits) <= BLOWUP_AT + 12
    assert out.stat().st_size > 10_000  # the HTML itself, charts inlined
    # and the events the coordinator stored online are there for the same site
    stored = csv(cli("store", "events", "--store", url, "--run", RUN))
    assert SITE in stored.filter(pl.col("kind") == "blowup")["site"].to_list()


def what_was_there(url: str, page, app) -> str:
    """For a failure: the incidents the store holds, the page's text, the dashboard's log."""
    from dashboard import data

    with open_store(url) as s:
        told = data.incidents(data.normalize_events(s.events(RUN)))["explanation"].to_list()
    return (
        f"the store's incidents: {told}\n--- page text:\n{page.inner_text('body')[-4000:]}"
        f"\n--- dashboard log:\n{app.log.read_text()[-4000:]}"
    )


def test_the_dashboard_renders_the_run_in_a_browser(tier_run, tmp_path):
    pw = pytest.importorskip("tests.integration.test_dashboard_browser")
    url, _ = tier_run
    if not pw.os.access(pw.CHROMIUM, pw.os.X_OK):
        pytest.skip(f"{pw.CHROMIUM} not installed (scripts/system-deps.sh installs it)")
    app = pw.Dashboard(url, tmp_path / "dashboard.log")
    try:
        with pw.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=pw.CHROMIUM, args=pw.CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1700})
            page.goto(app.address)
            header = page.locator(".st-key-run-header")
            header.get_by_text(RUN).wait_for(timeout=pw.WAIT_MS)
            header.get_by_text(f"last step {STEPS - 1}").wait_for(timeout=pw.WAIT_MS)
            assert "finished" in header.inner_text()
            assert f"world size {WORLD}" in header.inner_text()
            page.wait_for_selector(pw.LOSS, timeout=pw.WAIT_MS)  # the chart elements
            page.wait_for_selector(pw.HEATMAP, timeout=pw.WAIT_MS)
            page.wait_for_selector(f".st-key-chart-user {pw.CHART}", timeout=pw.WAIT_MS)
            page.locator(".st-key-chart-user").get_by_text(PROBE).first.wait_for(
                timeout=pw.WAIT_MS
            )  # the user's own scalar, charted
            assert page.locator(pw.LOSS).bounding_box()["height"] > 100
            page.locator(pw.HEATMAP).get_by_text(f"token share at step {STEPS - 1}").wait_for(
                timeout=pw.WAIT_MS
            )  # the heatmap drew the run's experts at its last step
            # the coordinator's online event, as the incident panel tells it, and its clip: the
            # blow-up's own incident, or the incident it joined (a gradient spike the blow-up
            # caused can be detected first and open the incident, analytics/incidents.py),
            # which then says a clamp answered it; the store holds the clamped blow-up itself
            with open_store(url) as s:
                ev = s.events(RUN).filter((pl.col("kind") == "blowup") & (pl.col("site") == SITE))
            assert ev.height >= 1, what_was_there(url, page, app)
            assert any(json.loads(d)["decision"] == "clamp" for d in ev["detail"].to_list())
            incident = re.compile(rf"incident \d+: (blowup at {SITE} .*|.* a clamp answered it)")
            try:
                page.get_by_text(incident).first.wait_for(timeout=pw.WAIT_MS)
            except pw.playwright_api.TimeoutError:
                pytest.fail(f"no blow-up incident shown; {what_was_there(url, page, app)}")
            page.get_by_text("layer01/routed").first.wait_for(timeout=pw.WAIT_MS)
            pw.save_screenshot(page, tmp_path, "dashboard-tier-cluster.png")
            browser.close()
    finally:
        app.stop()
