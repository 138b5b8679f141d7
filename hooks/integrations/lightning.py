"""`StepwatchLightningCallback`: a pytorch-lightning `Callback` that streams the run.

    trainer = pl.Trainer(..., callbacks=[StepwatchLightningCallback(target="collector:7070",
                                                                    run="exp42")])

The Monitor attaches at `on_fit_start` to the LightningModule (the adapter is found inside it:
a transformers or torchtitan MoE held as an attribute, or model/'s MoETransformer) and the
first optimizer. Step s is Lightning's optimizer step s (`trainer.global_step` before the
update): the first micro-batch of a step opens it, `on_before_optimizer_step` takes the
gradient statistics, and the batch end after which `global_step` moved on sends it with the
mean of the micro-batches' `loss` (training_step's return value). Validation runs in eval mode
under no_grad, so it leaves the training statistics alone; the logged metrics (`self.log(...)`,
i.e. `trainer.callback_metrics`) go to `monitor.log` as `pl/<name>` at `trainer.global_step` at
the end of each validation, the step that comes next.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl

from hooks.integrations._loop import LossTap, grad_norm_of, numeric_items
from hooks.monitor import Monitor


class StepwatchLightningCallback(pl.Callback):
    def __init__(self, monitor: Monitor | None = None, **monitor_kwargs: Any) -> None:
        if monitor is None and "target" not in monitor_kwargs:
            raise TypeError("StepwatchLightningCallback needs monitor= or target= and run=")
        self.monitor, self._kwargs = monitor, monitor_kwargs
        self._loss = LossTap()
        self._step: int | None = None

    @property
    def mon(self) -> Monitor:
        if self.monitor is None:
            raise RuntimeError("the Monitor is created at the start of training")
        return self.monitor

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        if self.monitor is None:
            self.monitor = Monitor(pl_module, optimizer, **self._kwargs)
        else:
            self.monitor.attach(pl_module, optimizer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._step is None:
            self._step = trainer.global_step
            self.mon.step_begin(self._step)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self._step is not None:
            self.mon.before_optimizer(self._step, grad_norm_of(pl_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._loss.add(outputs.get("loss") if isinstance(outputs, dict) else outputs)
        if self._step is None or trainer.global_step == self._step:
            return  # accumulating: the optimizer has not stepped yet
        step, self._step = self._step, None
        lr = None
        if trainer.optimizers:
            lr = trainer.optimizers[0].param_groups[0].get("lr")
        self.mon.step_end(step, loss=self._loss.take(), lr=lr)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.monitor is not None and not trainer.sanity_checking:
            values = numeric_items(dict(trainer.callback_metrics), "pl")
            if values:
                self.monitor.log(values, step=trainer.global_step)

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.monitor is not None:
            self.monitor.close()
