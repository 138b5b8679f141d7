"""Trainer integrations: one line attaches a Monitor to a framework's training loop.

    from hooks.integrations.hf import StepwatchCallback                  # transformers.Trainer
    trainer = Trainer(..., callbacks=[StepwatchCallback(target="collector:7070", run="exp")])

    from hooks.integrations.lightning import StepwatchLightningCallback  # pytorch-lightning
    trainer = pl.Trainer(..., callbacks=[StepwatchLightningCallback(target=..., run=...)])

Each module imports its framework at import time (they are extras: `stepwatch[hf]`,
`stepwatch[lightning]`); nothing here is imported by `hooks` itself.
"""
