"""Parameter counting, checked against the published Step 3.5 Flash totals.

    python -m model.params --preset flash

Counting convention (stated in the output too):
  total   every parameter of the trunk — attention, norms, routers, dense FFNs, all routed and
          shared experts — EXCLUDING the token embedding, the output head and the MTP heads;
  active  the same set with only top_k of the n_experts routed experts per MoE layer (shared
          expert, attention, dense FFNs and routers always count).
Embedding + output head and the MTP heads are printed separately, with the totals including
them, so any other convention can be read off. The model is built on the meta device: no memory
is allocated, so the 196B-parameter preset counts in about a second.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from model.config import PRESETS, ModelConfig, get_preset
from model.transformer import MoETransformer

PUBLISHED = {"flash": {"total": 196e9, "active": 11e9}}  # Step 3.5 Flash report, without MTP
CONVENTION = (
    "non-embedding count: token embedding, output head and MTP heads excluded; "
    "active = top_k of n_experts routed experts per MoE layer + everything else"
)


@dataclass(frozen=True)
class ParamCount:
    total: int  # trunk without embedding / output head / MTP (see module docstring)
    active: int  # per-token active share of `total`
    embedding: int  # token embedding + output head
    mtp: int  # all MTP heads together
    routed_experts: int  # routed expert parameters over all MoE layers (part of `total`)

    @property
    def total_with_embedding(self) -> int:
        return self.total + self.embedding

    @property
    def active_with_embedding(self) -> int:
        return self.active + self.embedding


def count_parameters(model: MoETransformer) -> ParamCount:
    cfg = model.cfg
    total = active = embedding = mtp = routed = 0
    for name, p in model.named_parameters():
        n = p.numel()
        if name in ("embed.weight", "lm_head.weight"):
            embedding += n
        elif name.startswith("mtp."):
            mtp += n
        elif ".experts.w_" in name:  # batched routed experts [E, ...]: only top_k are active
            routed += n
            total += n
            active += n * cfg.top_k // cfg.n_experts
        else:
            total += n
            active += n
    return ParamCount(total, active, embedding, mtp, routed)


def count_config(cfg: ModelConfig) -> ParamCount:
    """Count a configuration without allocating it (meta device)."""
    with torch.device("meta"):
        return count_parameters(MoETransformer(cfg))


def _billions(n: int) -> str:
    return f"{n:>16,d}  ({n / 1e9:.3f} B)"


def report(name: str, cfg: ModelConfig, counts: ParamCount) -> str:
    kinds = cfg.layer_kinds
    lines = [
        f"preset {name!r}: {cfg.n_layers} layers ({kinds.count('full')} full / "
        f"{kinds.count('swa')} sliding-window, window {cfg.window}), d_model {cfg.d_model}, "
        f"{cfg.n_experts} routed experts + 1 shared, top-{cfg.top_k}, "
        f"{cfg.n_dense_layers} dense layers, {cfg.mtp_depth} MTP heads",
        f"convention: {CONVENTION}",
        f"  total                      {_billions(counts.total)}",
        f"  active per token           {_billions(counts.active)}",
        f"  embedding + output head    {_billions(counts.embedding)}",
        f"  MTP heads                  {_billions(counts.mtp)}",
        f"  total  incl. emb + head    {_billions(counts.total_with_embedding)}",
        f"  active incl. emb + head    {_billions(counts.active_with_embedding)}",
    ]
    if name in PUBLISHED:
        for key in ("total", "active"):
            ours, ref = getattr(counts, key), PUBLISHED[name][key]
            lines.append(
                f"  {key:6s} vs published {ref / 1e9:.0f}B: {100 * (ours - ref) / ref:+.2f}%"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="flash", choices=sorted(PRESETS))
    args = parser.parse_args(argv)
    cfg = get_preset(args.preset)
    print(report(args.preset, cfg, count_config(cfg)))


if __name__ == "__main__":
    main()
