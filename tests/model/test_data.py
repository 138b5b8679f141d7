"""Byte corpus from the stdlib: deterministic split, shifted targets, disjoint rank slices."""

import sysconfig
from pathlib import Path

import pytest
import torch

from model.data import get_batch, is_val_file, load_corpus, val_batches


def test_split_is_deterministic_and_nonempty():
    corpus = load_corpus()
    assert corpus.n_train_files > 5 * corpus.n_val_files > 0
    assert len(corpus.train) > 1_000_000 and len(corpus.val) > 10_000
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    val = [f for f in files if is_val_file(f.name)]
    assert len(val) == corpus.n_val_files and len(files) - len(val) == corpus.n_train_files
    # every file lands in exactly one split (bytes + 2 separator bytes each)
    assert len(corpus.val) == sum(f.stat().st_size + 2 for f in val)
    assert len(corpus.train) + len(corpus.val) == sum(f.stat().st_size + 2 for f in files)
    assert corpus.train.dtype == torch.uint8


def test_batches_are_pure_functions_of_seed_and_step():
    data = load_corpus().train
    x1, y1 = get_batch(data, 4, 32, seed=0, step=5)
    x2, y2 = get_batch(data, 4, 32, seed=0, step=5)
    x3, _ = get_batch(data, 4, 32, seed=0, step=6)
    x4, _ = get_batch(data, 4, 32, seed=1, step=5)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3) and not torch.equal(x1, x4)
    assert torch.equal(x1[:, 1:], y1[:, :-1]) and x1.dtype == torch.long


def test_ranks_take_disjoint_slices_of_the_global_batch():
    data = load_corpus().train
    full, _ = get_batch(data, 6, 16, seed=0, step=2)
    parts = [get_batch(data, 6, 16, seed=0, step=2, rank=r, world_size=2)[0] for r in range(2)]
    assert torch.equal(torch.cat(parts), full)


def test_validation_windows_are_fixed():
    corpus = load_corpus()
    a, b = val_batches(corpus, 2, 2, 16, seed=0), val_batches(corpus, 2, 2, 16, seed=0)
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(a, b))


def test_bad_batch_arguments():
    data = load_corpus().train
    with pytest.raises(ValueError, match="divisible"):
        get_batch(data, 5, 16, seed=0, step=0, world_size=2)
    with pytest.raises(ValueError, match="too short"):
        get_batch(data[:10], 1, 16, seed=0, step=0)
