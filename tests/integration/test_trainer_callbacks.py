"""The trainer integrations with real trainers: a Hugging Face `Trainer` and a pytorch-lightning
`Trainer` train a tiny Mixtral for a few steps with one callback each (one line to attach),
through a real collector process; the stored run holds every step with its loss, per-expert
statistics and what the framework logged."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from collector.process import start_collector, stop_collector  # noqa: E402
from store import open_store  # noqa: E402
from tests.integration.hf_models import VOCAB, build  # noqa: E402

STEPS, B, T = 4, 2, 16


@pytest.fixture(scope="module")
def collector(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("callbacks")
    url = f"parquet:{tmp / 'store'}"
    proc, address = start_collector(
        url, "--insecure", "--flush-interval", "0.05", log_path=tmp / "c.log"
    )
    yield address, url
    stop_collector(proc)


def samples(n: int) -> list[dict]:
    gen = torch.Generator().manual_seed(3)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (T,), generator=gen)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def assert_stored_run(url: str, run: str, losses: list[float] | None) -> set[str]:
    with open_store(url) as st:
        assert st.runs().filter(run=run)["status"].to_list() == ["finished"]
        train_steps = st.series(run, "train/loss")
        assert train_steps["step"].to_list() == list(range(STEPS))
        if losses is not None:  # the loss of each step, as the trainer computed it
            np.testing.assert_allclose(train_steps["value"].to_numpy(), losses, rtol=1e-6)
        for step in range(STEPS):
            tokens = st.at_step(run, step, "moe/*/expert*/tokens")
            assert tokens.height == 3 * 8 and tokens["value"].sum() == 3 * B * T * 2
            rms = st.at_step(run, step, "moe/*/expert*/act_rms")["value"].to_numpy()
            assert np.isfinite(rms).all() and (rms > 0).any()
        assert st.events(run).height == 0
        return set(st.metrics(run)["name"].to_list())


@pytest.fixture(scope="module")
def hf_run(collector, tmp_path_factory) -> tuple[str, list[float]]:
    """A Trainer run with the callback: (store url, the Trainer's logged losses)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from hooks.integrations.hf import StepwatchCallback

    address, url = collector
    tmp_path = tmp_path_factory.mktemp("hf-trainer")
    losses: list[float] = []

    class KeepLoss(TrainerCallback):  # the Trainer's own per-step loss, for comparison
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=STEPS,
        per_device_train_batch_size=B,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=build("mixtral"),
        args=args,
        train_dataset=samples(B * STEPS),
        callbacks=[StepwatchCallback(target=address, run="hf-trainer"), KeepLoss()],
    )
    trainer.train()
    return url, losses


def test_hf_trainer_callback_streams_the_run(hf_run):
    url, losses = hf_run
    names = assert_stored_run(url, "hf-trainer", None)
    assert len(losses) == STEPS
    with open_store(url) as st:  # what the Trainer logged after step s is stored at s + 1
        logged = st.series("hf-trainer", "hf/loss")
        np.testing.assert_allclose(logged["value"].to_numpy(), losses, rtol=1e-6)
        assert logged["step"].to_list() == list(range(1, STEPS + 1))
        train_loss = st.series("hf-trainer", "train/loss")["value"].to_numpy()
    # the Trainer logs its loss rounded to 4 digits; ours is the step's own float32 loss
    np.testing.assert_allclose(train_loss, losses, atol=6e-5)
    assert "hf/grad_norm" in names and "hf/learning_rate" in names


def test_lightning_callback_streams_the_run(collector):
    import pytorch_lightning as pl

    from hooks.integrations.lightning import StepwatchLightningCallback

    address, url = collector
    losses: list[float] = []

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = build("mixtral")

        def training_step(self, batch, batch_idx):
            loss = self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
            losses.append(float(loss))
            return loss

        def validation_step(self, batch, batch_idx):
            loss = self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
            self.log("val_loss", loss)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    data = samples(B * STEPS)
    loader = torch.utils.data.DataLoader(data, batch_size=B)
    trainer = pl.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        val_check_interval=2,
        limit_val_batches=2,
        callbacks=[StepwatchLightningCallback(target=address, run="lightning")],
    )
    trainer.fit(Module(), loader, torch.utils.data.DataLoader(data[:4], batch_size=B))
    assert_stored_run(url, "lightning", losses)
    with open_store(url) as st:  # validation after steps 2 and 4, stored at the next step
        val = st.series("lightning", "pl/val_loss")
        assert val["step"].to_list() == [2, 4]
        assert np.isfinite(val["value"].to_numpy()).all()


def test_dashboard_and_report_show_the_logged_scalars(hf_run, monkeypatch, tmp_path):
    """What the run logged with monitor.log (the callback forwards the Trainer's logs) is
    charted by the dashboard's replay view and by the offline report."""
    from analytics.report import write_report
    from tests.dashboard.conftest import charts, run_app

    url, losses = hf_run
    at = run_app(url, monkeypatch, runs=["hf-trainer"])
    user = charts(at)["user"].layer(0)
    with open_store(url) as st:
        want = st.series("hf-trainer", "hf/loss")
        html = tmp_path / "report.html"
        write_report(st, "hf-trainer", html)
    drawn = user.filter(series="hf/loss").select("step", "value")
    assert drawn.equals(want.filter(want["step"] <= drawn["step"].max()))
    assert drawn.height >= STEPS - 1  # the replay step is the last training step
    text = html.read_text()
    assert "logged with monitor.log" in text and "hf/loss" in text
