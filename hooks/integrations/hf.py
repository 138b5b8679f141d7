"""`StepwatchCallback`: a Hugging Face `TrainerCallback` that streams the run to a collector.

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[StepwatchCallback(target="collector:7070", run="exp42")])

The Monitor is created at `on_train_begin` from the Trainer's model and optimizer (the adapter
is picked by `Monitor`: the Transformers MoE layout for a transformers MoE). Step s of the
monitor is the Trainer's optimizer step s, counted from 0 (`state.global_step` before the
update): `on_step_begin` opens it, `on_pre_optimizer_step` takes the gradient statistics,
`on_step_end` sends it with the mean loss of its micro-batches (read from the model output's
`loss` by a forward hook) and the scheduler's learning rate. Everything the Trainer logs
(`on_log`: loss, grad_norm, eval_loss, ...) goes to `monitor.log` as `hf/<key>` at step
`state.global_step`, i.e. the step that comes next: the Trainer logs after the step that
produced the values has ended. Evaluation runs in eval mode under no_grad, so it does not touch
the training statistics.

The Trainer clips gradients before any callback sees them, so with `max_grad_norm > 0` the
monitor's gradient norms are those after clipping; the Trainer's own pre-clip `grad_norm`
arrives as `hf/grad_norm` through on_log.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from hooks.integrations._loop import LossTap, grad_norm_of, numeric_items
from hooks.monitor import Monitor


class StepwatchCallback(TrainerCallback):
    def __init__(self, monitor: Monitor | None = None, **monitor_kwargs: Any) -> None:
        """Either an unattached `monitor`, or the keyword arguments of `Monitor(...)`
        (target=, run=, config=, token=, ...)."""
        if monitor is None and "target" not in monitor_kwargs:
            raise TypeError("StepwatchCallback needs monitor= or Monitor's target= and run=")
        self.monitor, self._kwargs = monitor, monitor_kwargs
        self._loss = LossTap()
        self._step: int | None = None
        self._optimizer: Any = None
        self._scheduler: Any = None

    @property
    def mon(self) -> Monitor:
        if self.monitor is None:
            raise RuntimeError("the Monitor is created at the start of training")
        return self.monitor

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.monitor is None:
            self.monitor = Monitor(model, optimizer, **self._kwargs)
        else:
            self.monitor.attach(model, optimizer)
        self._optimizer, self._scheduler = optimizer, kwargs.get("lr_scheduler")
        self._loss = LossTap(model)
        self._model = model

    def on_step_begin(self, args, state, control, **kwargs):
        self._step = state.global_step
        self._loss.take()  # nothing from before this step
        self.mon.step_begin(self._step)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._step is not None:
            self.mon.before_optimizer(self._step, grad_norm_of(self._model))

    def on_step_end(self, args, state, control, **kwargs):
        if self._step is None:
            return
        step, self._step = self._step, None
        lr = None
        if self._scheduler is not None:
            lr = float(self._scheduler.get_last_lr()[0])
        self.mon.step_end(step, loss=self._loss.take(), lr=lr)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.monitor is not None and logs:
            values = numeric_items(logs, "hf")
            if values:
                self.monitor.log(values, step=state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self._loss.remove()
        if self.monitor is not None:
            self.monitor.close()
