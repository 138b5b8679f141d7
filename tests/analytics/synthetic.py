"""A synthetic run for detector tests: healthy values with seeded noise, plus injectable
faults, as dense per-step frames over a metric dictionary shaped like the hooks' catalogue."""

from __future__ import annotations

import numpy as np

from analytics.catalog import MetricIndex
from analytics.frame import StepFrame

LAYERS = (1, 2)
EXPERTS = 8
HEADS = 2
PARAM_EVERY = 10


def catalogue() -> list[tuple[str, int, int, int, str]]:
    """(name, layer, expert, head, stat) in the order the hooks register them."""
    rows = []
    for stat in ("tokens", "act_rms", "act_maxabs", "out_norm"):
        rows += [
            (f"moe/layer{l:02d}/expert{e:03d}/{stat}", l, e, -1, stat)
            for l in LAYERS
            for e in range(EXPERTS)
        ]
    rows += [(f"moe/layer{l:02d}/shared/act_maxabs", l, -1, -1, "act_maxabs") for l in LAYERS]
    rows += [
        (f"attn/layer{l:02d}/head{h:02d}/max_logit", l, -1, h, "max_logit")
        for l in (0, *LAYERS)
        for h in range(HEADS)
    ]
    rows += [(f"resid/layer{l:02d}/rms", l, -1, -1, "rms") for l in (0, *LAYERS)]
    rows += [("train/loss", -1, -1, -1, "loss"), ("grad/global_norm", -1, -1, -1, "norm")]
    rows += [(f"grad/layer{l:02d}/norm", l, -1, -1, "norm") for l in (0, *LAYERS)]
    rows += [
        (f"params/layer{l:02d}/expert{e:03d}/fro_norm", l, e, -1, "fro_norm")
        for l in LAYERS
        for e in range(EXPERTS)
    ]
    return rows


def make_index() -> MetricIndex:
    rows = catalogue()
    return MetricIndex.from_columns(
        range(len(rows)),
        [r[0] for r in rows],
        [r[1] for r in rows],
        [r[2] for r in rows],
        [r[3] for r in rows],
        [r[4] for r in rows],
    )


class SyntheticRun:
    """values(step) -> dense vector; faults are callables (step, dict name->value) -> None."""

    def __init__(self, seed: int = 0, run: str = "syn") -> None:
        self.rng = np.random.default_rng(seed)
        self.run = run
        self.index = make_index()
        self.faults: list = []
        self.nan_at: dict[int, list[str]] = {}

    def healthy(self, step: int) -> dict[str, float]:
        r = self.rng
        v: dict[str, float] = {}
        for l in LAYERS:
            tok = r.multinomial(4096, np.full(EXPERTS, 1 / EXPERTS))
            for e in range(EXPERTS):
                base = 0.5 + 0.05 * e
                v[f"moe/layer{l:02d}/expert{e:03d}/tokens"] = tok[e]
                v[f"moe/layer{l:02d}/expert{e:03d}/act_rms"] = base * r.lognormal(0, 0.1)
                v[f"moe/layer{l:02d}/expert{e:03d}/act_maxabs"] = 4 * base * r.lognormal(0, 0.2)
                v[f"moe/layer{l:02d}/expert{e:03d}/out_norm"] = base * r.lognormal(0, 0.1)
                if step % PARAM_EVERY == 0:
                    v[f"params/layer{l:02d}/expert{e:03d}/fro_norm"] = 3.0 * r.lognormal(0, 0.01)
            v[f"moe/layer{l:02d}/shared/act_maxabs"] = 3.0 * r.lognormal(0, 0.2)
        for l in (0, *LAYERS):
            for h in range(HEADS):
                v[f"attn/layer{l:02d}/head{h:02d}/max_logit"] = 8 + r.normal(0, 1)
            v[f"resid/layer{l:02d}/rms"] = 1 + r.normal(0, 0.01)
            v[f"grad/layer{l:02d}/norm"] = 0.3 * r.lognormal(0, 0.1)
        v["train/loss"] = 3.0 - 0.002 * step + r.normal(0, 0.03)
        v["grad/global_norm"] = r.lognormal(0, 0.15)
        return v

    def values(self, step: int) -> dict[str, float]:
        v = self.healthy(step)
        for fault in self.faults:
            fault(step, v)
        for name in self.nan_at.get(step, ()):
            v[name] = float("nan")
        return v

    def frame(self, step: int, rank_values: dict[int, dict[str, float]] | None = None) -> StepFrame:
        v = self.values(step)
        return self.frame_of(step, v, rank_values)

    def frame_of(
        self, step: int, v: dict[str, float], rank_values: dict[int, dict[str, float]] | None = None
    ) -> StepFrame:
        ix = self.index
        ids = np.array([ix.find(n) for n in v], np.int64)
        vals = np.array(list(v.values()), np.float32)
        loader = None
        if rank_values is not None:

            def loader():
                out = {}
                for rank, rv in rank_values.items():
                    vec = np.full(ix.size, np.nan)
                    for n, x in rv.items():
                        vec[ix.find(n)] = x
                    out[rank] = vec
                return out

        return StepFrame.from_rows(
            self.run, step, ids, vals, ix.size, tuple(rank_values or (0,)), loader
        )


# ---- faults -------------------------------------------------------------------------------
def blowup(layer: int, expert: int, start: int, rate: float = 1.25, weights: bool = True):
    """The up-projection grows x rate per step from `start`: activations by g = rate^k, the
    parameter norm of [W_gate; W_up; W_down] (equal shares) by sqrt((2 + g^2) / 3), as in
    model/faults.py's blowup. weights=False: activations only (a growth the weights miss)."""

    def f(step, v):
        if step >= start:
            g = rate ** (step - start + 1)
            for stat in ("act_rms", "act_maxabs", "out_norm"):
                v[f"moe/layer{layer:02d}/expert{expert:03d}/{stat}"] *= g
            name = f"params/layer{layer:02d}/expert{expert:03d}/fro_norm"
            if weights and name in v:
                v[name] *= ((2 + g * g) / 3) ** 0.5

    return f


def death(layer: int, expert: int, start: int, decay: float = 0.5):
    def f(step, v):
        if step >= start:
            key = f"moe/layer{layer:02d}/expert{expert:03d}"
            v[f"{key}/tokens"] = 0.0
            v[f"{key}/act_rms"] = v[f"{key}/act_maxabs"] = v[f"{key}/out_norm"] = 0.0
            name = f"params/layer{layer:02d}/expert{expert:03d}/fro_norm"
            if name in v:
                v[name] *= decay ** (step - start + 1)

    return f


def starve(layer: int, expert: int, start: int, stop: int = 1 << 30):
    """Tokens vanish but parameters stay (what balancing usually recovers from)."""

    def f(step, v):
        if start <= step < stop:
            key = f"moe/layer{layer:02d}/expert{expert:03d}"
            v[f"{key}/tokens"] = 0.0
            v[f"{key}/act_rms"] = v[f"{key}/act_maxabs"] = v[f"{key}/out_norm"] = 0.0

    return f


def run_detector(det, syn: SyntheticRun, steps) -> list:
    out = []
    for s in steps:
        out += det.observe(syn.frame(s), syn.index)
    return out
