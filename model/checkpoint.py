"""Checkpoints that resume bit-identically.

A checkpoint holds everything the next step depends on: model parameters and persistent
buffers (expert selection bias, clamp limits, fault offsets), the AdamW state, the data
position and learning-rate schedule position (both are the step number: batches and LR are pure
functions of it), the RNG states (nothing in the loop draws from them today; saved so that a
future dropout or sampling cannot silently break resumption), and the model / run
configuration, so resuming with a different run is refused with a clear error.

Files are written to a temporary name and renamed, so a crash mid-write never leaves a
truncated checkpoint under the real name.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

FORMAT_VERSION = 1


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    next_step: int,
    model_config: dict,
    trajectory: dict,
) -> None:
    """Write the state needed to run step `next_step` next. `trajectory` holds the run settings
    that must match on resume (seed, batch, schedule, faults...)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": FORMAT_VERSION,
        "next_step": next_step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "model_config": model_config,
        "trajectory": trajectory,
        "rng": {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "numpy": np.random.get_state(),
        },
    }
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    model_config: dict,
    trajectory: dict,
) -> int:
    """Restore model, optimizer and RNG states in place; return the step to run next.

    Raises ValueError when the checkpoint belongs to a different model or run settings.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("format") != FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {path}: format {state.get('format')!r}, expected {FORMAT_VERSION}"
        )
    _require_equal(path, "model config", state["model_config"], model_config)
    _require_equal(path, "run settings", state["trajectory"], trajectory)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    return int(state["next_step"])


def _require_equal(path: Path, what: str, saved: dict, current: dict) -> None:
    diffs = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
    if diffs:
        detail = ", ".join(
            f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}" for k in diffs
        )
        raise ValueError(f"checkpoint {path} was written with different {what}: {detail}")
