"""Helpers for tests that run monitored training against a real collector process: a tiny
model trained in a thread with a real Monitor, a fixed loopback port a restarted collector can
take again, and the (rank, step) accounting of what a store holds."""

from __future__ import annotations

import collections
import logging
import socket
import threading
import time
from dataclasses import dataclass, field

import torch

from hooks import Monitor, MonitorConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Trainer:
    """One rank of the tiny model trained for `steps` steps in a thread, with a Monitor on
    `target`. `pause_at`: step_end of that step waits for `go` (the test changes the world
    there); `done` is set after close()."""

    target: str
    run: str
    steps: int
    config: MonitorConfig = field(default_factory=MonitorConfig)
    pause_at: int | None = None
    monitor_kwargs: dict = field(default_factory=dict)
    rank: int = 0
    world_size: int = 1
    step_sleep_s: float = 0.0  # paces a run so that a test can change the world mid-run
    progress: int = -1  # last step ended
    paused: threading.Event = field(default_factory=threading.Event)
    go: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    losses: list[float] = field(default_factory=list)
    monitor: Monitor | None = None
    error: BaseException | None = None

    def start(self) -> Trainer:
        threading.Thread(target=self._main, daemon=True, name=f"trainer-{self.run}").start()
        return self

    def _main(self) -> None:
        try:
            self._train()
        except BaseException as exc:  # noqa: BLE001 - kept in self.error, asserted by the test
            self.error = exc
        finally:
            self.paused.set()
            self.done.set()

    def _train(self) -> None:
        from model.config import get_preset
        from model.transformer import MoETransformer

        torch.manual_seed(self.rank)
        model = MoETransformer(get_preset("tiny"))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        mon = self.monitor = Monitor(
            model,
            opt,
            target=self.target,
            run=self.run,
            rank=self.rank,
            world_size=self.world_size,
            config=self.config,
            **self.monitor_kwargs,
        )
        gen = torch.Generator().manual_seed(100 + self.rank)
        for step in range(self.steps):
            mon.step_begin(step)
            x = torch.randint(0, 256, (2, 33), generator=gen)
            out = model(x[:, :-1], x[:, 1:])
            out.loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            mon.before_optimizer(step, gnorm)
            opt.step()
            opt.zero_grad()
            loss = out.main_loss.detach()
            self.losses.append(float(loss))
            mon.step_end(step, loss=loss, mtp_losses=[], lr=1e-3, tokens=x.numel())
            self.progress = step
            if self.step_sleep_s:
                time.sleep(self.step_sleep_s)
            if step == self.pause_at:
                self.paused.set()
                self.go.wait(120)
        mon.close()

    def stats(self) -> dict:
        return self.monitor.stats() if self.monitor is not None else {}


class Records(logging.Handler):
    """Every record of a logger while attached (a module-scoped caplog)."""

    def __init__(self, name: str) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._logger = logging.getLogger(name)

    def __enter__(self) -> Records:
        self._logger.addHandler(self)
        self._old_level = self._logger.level
        self._logger.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc) -> None:
        self._logger.removeHandler(self)
        self._logger.setLevel(self._old_level)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self, level: int, contains: str = "") -> list[str]:
        return [
            r.getMessage()
            for r in self.records
            if r.levelno == level and contains in r.getMessage()
        ]


def step_counts(store, run: str, rank: int = 0, metric: str = "train/loss") -> collections.Counter:
    """How many raw rows of `rank` the store holds for each step (a duplicate would be 2)."""
    return collections.Counter(store.series(run, metric, rank=rank)["step"].to_list())
