"""Parameter counts: the flash preset matches the published Step 3.5 Flash totals."""

import pytest

from model.config import ModelConfig, get_preset
from model.params import count_config, main


def test_flash_counts_match_published_totals():
    cfg = get_preset("flash")
    assert (cfg.n_layers, cfg.d_model, cfg.n_experts, cfg.top_k, cfg.expert_hidden) == (
        45,
        4096,
        288,
        8,
        1280,
    )
    assert (
        cfg.vocab_size,
        cfg.n_heads_full,
        cfg.n_heads_swa,
        cfg.n_kv_heads,
        cfg.head_dim,
        cfg.window,
        cfg.mtp_depth,
    ) == (128_896, 64, 96, 8, 128, 512, 3)
    assert cfg.layer_kinds.count("full") == 12 and cfg.layer_kinds.count("swa") == 33
    counts = count_config(cfg)
    assert abs(counts.total - 196e9) / 196e9 < 0.03
    assert abs(counts.active - 11e9) / 11e9 < 0.10
    # routed experts: 42 MoE layers x 288 experts x 3 matrices of 4096 x 1280
    assert counts.routed_experts == 42 * 288 * 3 * 4096 * 1280
    assert counts.embedding == 2 * 128_896 * 4096
    assert counts.mtp > 0


def test_active_count_arithmetic_on_a_small_config():
    cfg = get_preset("tiny")
    c = count_config(cfg)
    per_layer_routed = cfg.n_experts * 3 * cfg.d_model * cfg.expert_hidden
    n_moe = cfg.n_layers - cfg.n_dense_layers
    assert c.routed_experts == n_moe * per_layer_routed
    assert (
        c.total - c.active
        == n_moe * per_layer_routed * (cfg.n_experts - cfg.top_k) // cfg.n_experts
    )


def test_cli_states_convention(capsys):
    main(["--preset", "tiny"])
    text = capsys.readouterr().out
    assert "convention" in text and "MTP heads excluded" in text


@pytest.mark.parametrize(
    "bad",
    [
        dict(top_k=9),
        dict(n_heads_swa=5),
        dict(mtp_depth=4),
        dict(n_dense_layers=6),
        dict(d_model=0),
        dict(head_dim=15),
    ],
)
def test_config_validation(bad):
    with pytest.raises(ValueError):
        ModelConfig(**bad)


def test_unknown_preset():
    with pytest.raises(ValueError, match="tiny"):
        get_preset("huge")
