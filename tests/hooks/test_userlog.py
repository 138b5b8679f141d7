"""hooks/userlog.py: monitor.log's scalars. A training loop logs the same keys every step, so a
repeated key set costs a cached lookup, not per-key checks and a rebuilt layout; the values of
every step still travel exactly, and a bad key is still refused once the set changes."""

from __future__ import annotations

import pytest
import torch

from hooks.userlog import FIRST_USER_SCHEMA_ID, UserScalars

KEYS = [f"eval/k{i:02d}" for i in range(20)]


def scalars() -> tuple[UserScalars, list, list]:
    added: list = []
    warned: list = []
    u = UserScalars(
        {"train/loss"},
        lambda sid, specs: added.append((sid, specs)),
        lambda k, n: None,
        warned.append,
    )
    return u, added, warned


def test_repeated_key_sets_are_checked_and_laid_out_once(monkeypatch):
    u, added, _ = scalars()
    checked: list[str] = []
    real = u._check_name
    monkeypatch.setattr(
        u, "_check_name", lambda name, reduce: (checked.append(name), real(name, reduce))
    )
    layouts = []
    for step in range(100):
        u.log({k: float(step * 100 + i) for i, k in enumerate(KEYS)}, step, "mean", None)
        schemas, values = u.for_step(step, lambda item: None)
        layouts.append(schemas)
        assert values.array().tolist() == [float(step * 100 + i) for i in range(20)]  # sorted keys
    assert checked == KEYS  # the first step only
    assert all(s is layouts[0] for s in layouts)  # one layout object, looked up
    assert layouts[0] == [(FIRST_USER_SCHEMA_ID + i, 1) for i in range(20)]
    assert [sid for sid, _ in added] == [FIRST_USER_SCHEMA_ID + i for i in range(20)]


def test_a_changed_key_set_is_checked_again_and_bad_keys_still_raise():
    u, _, _ = scalars()
    u.log({"eval/a": 1.0, "eval/b": torch.tensor(2.0)}, 0, "mean", None)
    u.log({"eval/a": 1.0, "eval/b": 2.0}, 1, "mean", None)
    with pytest.raises(ValueError, match="stepwatch's own"):
        u.log({"eval/a": 1.0, "train/loss": 2.0}, 2, "mean", None)
    with pytest.raises(ValueError, match="first logged with reduce='mean'"):
        u.log({"eval/a": 1.0, "eval/b": 2.0}, 2, "max", None)
    with pytest.raises(TypeError, match="number"):  # values are checked every time
        u.log({"eval/a": "x", "eval/b": 2.0}, 2, "mean", None)
    schemas, values = u.for_step(1, lambda item: None)
    assert schemas == [(FIRST_USER_SCHEMA_ID, 1), (FIRST_USER_SCHEMA_ID + 1, 1)]
    assert values.array().tolist() == [1.0, 2.0]
