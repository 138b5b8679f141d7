"""Byte-level language-modelling data from the Python standard library's own source.

Every machine with Python has this corpus, so nothing is downloaded. The top-level modules of
`sysconfig.get_paths()["stdlib"]` (sorted *.py, ~170 files, ~4.7 MB) are read as bytes and
split by file into train / validation with a hash of the file name, so the split never depends
on directory order or on the machine.

Batches are a pure function of (seed, split, step): each step draws its window starts from a
generator seeded with that triple. That makes the data position trivially checkpointable (it is
the step number) and identical on every rank; under DDP each rank takes its own disjoint slice
of the global batch rows.
"""

from __future__ import annotations

import functools
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

VAL_EVERY = 10  # one file in ~10 goes to validation
_STREAMS = {"train": 0, "val": 1}


@dataclass(frozen=True)
class ByteCorpus:
    train: torch.Tensor  # uint8 [N_train]
    val: torch.Tensor  # uint8 [N_val]
    n_train_files: int
    n_val_files: int


def is_val_file(name: str) -> bool:
    """Deterministic split: crc32 of the file name (not the path, not the contents)."""
    return zlib.crc32(name.encode()) % VAL_EVERY == 0


@functools.lru_cache(maxsize=4)
def load_corpus(root: str | None = None) -> ByteCorpus:
    """Read and split the corpus once per process (cached)."""
    root_path = Path(root or sysconfig.get_paths()["stdlib"])
    files = sorted(root_path.glob("*.py"))
    if not files:
        raise FileNotFoundError(f"no *.py files under {root_path}: cannot build the byte corpus")
    parts: dict[str, list[bytes]] = {"train": [], "val": []}
    for path in files:
        parts["val" if is_val_file(path.name) else "train"].append(path.read_bytes() + b"\n\n")
    if not parts["train"] or not parts["val"]:
        raise ValueError(f"corpus under {root_path} too small to split into train and val")

    def to_tensor(chunks: list[bytes]) -> torch.Tensor:
        return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)

    return ByteCorpus(
        to_tensor(parts["train"]), to_tensor(parts["val"]), len(parts["train"]), len(parts["val"])
    )


def _generator(seed: int, split: str, step: int) -> torch.Generator:
    # SeedSequence mixes the triple into a well-spread 64-bit seed (no (seed, step) collisions).
    state = np.random.SeedSequence([seed, _STREAMS[split], step]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def get_batch(
    data: torch.Tensor,
    batch_size: int,
    seq_len: int,
    *,
    seed: int,
    step: int,
    split: str = "train",
    rank: int = 0,
    world_size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [rank*b, (rank+1)*b) of the global batch for `step`, b = batch_size / world_size.

    Returns (idx_BT, targets_BT) as long tensors; targets are the inputs shifted by one byte.
    """
    if batch_size % world_size:
        raise ValueError(f"global batch_size={batch_size} not divisible by world_size={world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    if len(data) < seq_len + 2:
        raise ValueError(f"data of {len(data)} bytes too short for seq_len={seq_len}")
    starts_B = torch.randint(
        0, len(data) - seq_len - 1, (batch_size,), generator=_generator(seed, split, step)
    )
    per_rank = batch_size // world_size
    starts_b = starts_B[rank * per_rank : (rank + 1) * per_rank]
    window_bT = data[starts_b[:, None] + torch.arange(seq_len + 1)].long()
    return window_bT[:, :-1].contiguous(), window_bT[:, 1:].contiguous()


def val_batches(
    corpus: ByteCorpus, n_batches: int, batch_size: int, seq_len: int, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed validation set: the same windows for every evaluation of a run."""
    return [
        get_batch(corpus.val, batch_size, seq_len, seed=seed, step=i, split="val")
        for i in range(n_batches)
    ]
