"""What a training run is asked to do (TrainConfig) and what it reports back (TrainResult).

Kept apart from the loop in model/train.py so the settings read as one documented list: each
field carries its docstring, validation happens in __post_init__ (bad fault specs fail here,
before any training), and the LR schedule is a pure function of the step — which is what makes
checkpoints resume bit-identically without a scheduler state.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from model.config import PRESETS, ModelConfig, get_preset
from model.faults import parse_fault
from model.transformer import MoETransformer


@dataclass
class TrainConfig:
    preset: str = "tiny"
    """Model preset name (model.config.PRESETS)."""
    model_overrides: dict = field(default_factory=dict)
    """ModelConfig fields to override on top of the preset."""
    steps: int = 100
    """Total optimizer steps of the run; the LR schedule spans exactly these."""
    stop_at: int | None = None
    """End this invocation before step `stop_at` (e.g. to test resumption); None = `steps`."""
    seed: int = 0
    """Seeds model init and the data stream."""
    batch_size: int = 8
    """Global batch (sequences per step, all ranks together); must divide by the world size."""
    seq_len: int | None = None
    """Tokens per sequence; None = the preset's max_seq_len."""
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio."""
    warmup_steps: int = 10
    """Linear warmup from lr / warmup_steps to lr."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices (norm gains are not decayed)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 = never clip."""
    eval_every: int = 0
    """Validate every N steps (and after the last step); 0 = only after the last step."""
    eval_batches: int = 4
    """Validation batches (fixed windows of the validation files)."""
    injects: list[str] = field(default_factory=list)
    """Fault specs, KIND@STEP[:key=value,...] (see model.faults)."""
    checkpoint: str | None = None
    """Write a checkpoint here at the end of this invocation (and every checkpoint_every)."""
    checkpoint_every: int = 0
    """Also checkpoint every N steps; 0 = only at the end."""
    resume: str | None = None
    """Continue from this checkpoint."""
    out_dir: str | None = None
    """Write metrics.jsonl (one line per step) and summary.json here (rank 0)."""
    log_every: int = 0
    """Log progress every N steps; 0 = quiet."""

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("TrainConfig.steps and batch_size must be >= 1")
        if self.stop_at is not None and not 0 <= self.stop_at <= self.steps:
            raise ValueError(f"TrainConfig.stop_at must be in [0, steps], got {self.stop_at}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1 or self.warmup_steps < 0:
            raise ValueError("TrainConfig: need lr > 0, 0 <= min_lr_ratio <= 1, warmup >= 0")
        if self.grad_clip < 0 or self.eval_every < 0 or self.eval_batches < 1:
            raise ValueError("TrainConfig: need grad_clip >= 0, eval_every >= 0, eval_batches >= 1")
        self.faults = [parse_fault(spec) for spec in self.injects]  # fail before training

    def model_config(self) -> ModelConfig:
        return get_preset(self.preset, **self.model_overrides)

    def lr_at(self, step: int) -> float:
        """Warmup + cosine schedule (without fault multipliers)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine)

    def trajectory(self) -> dict:
        """Settings a resumed run must share with the checkpoint."""
        keep = (
            "seed",
            "steps",
            "batch_size",
            "seq_len",
            "lr",
            "min_lr_ratio",
            "warmup_steps",
            "weight_decay",
            "betas",
            "grad_clip",
            "injects",
        )
        return {
            k: (list(v) if isinstance(v, tuple) else v)
            for k, v in asdict(self).items()
            if k in keep
        }


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # main loss per step run here
    mtp_losses: list[list[float]] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)  # (after step, loss)
    skipped_steps: list[int] = field(default_factory=list)  # non-finite gradient norm
    start_step: int = 0
    rank: int = 0
    world_size: int = 1
    tokens: int = 0  # tokens this rank processed
    monitor_errors: int = 0
    model: MoETransformer | None = None
