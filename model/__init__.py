"""model: a real miniature of the Step 3.5 Flash architecture, its data, training loop and
fault injection. Imports nothing else of ours (train.py's CLI loads hooks only for --monitor).

Modules
  config.py       ModelConfig (+ presets tiny / demo / flash), get_preset
  probe.py        Probe, the observation point telemetry hooks into
  attention.py    masks, RoPE, gated GQA attention with QK-norm (full and sliding-window)
  moe.py          SwiGLU / DenseFFN, Router, RoutedExperts (batched), MoE
  transformer.py  Block, MTPHead, MoETransformer, ModelOutput
  params.py       `python -m model.params --preset flash`: parameter counts + convention
  data.py         byte-level corpus from the stdlib's own *.py files
  faults.py       --inject KIND@STEP[:layer=L,expert=E,...]: dead-expert, blowup, lr-spike, nan
  checkpoint.py   save / load for bit-identical resumption
  monitoring.py   the loop's error fence around an optional monitor
  train.py        train(TrainConfig, monitor) -> TrainResult, CLI, DDP under torchrun
  demo.py         `python -m model.demo`

Probe surface (the contract telemetry builds against; tests/model/test_transformer.py pins it)

  Probe(nn.Module)            forward(*tensors) -> None; `.active` is True iff the probe has
                              forward hooks (or forward pre-hooks). The model computes
                              probe-only values only when the probe is active. Hooks receive
                              the tensors as positional args; they are detached.
  MoETransformer
    .cfg                      ModelConfig
    .layers                   nn.ModuleList of Block; Block index == layer index
    .moe_layers()             list[(layer index, MoE)] of the trunk (MTP heads excluded)
    .lm_head                  nn.Linear producing the main logits [B, T, V]; its forward hook
                              fires once per forward (MTP heads use its weight functionally)
    .forward(idx_BT, targets_BT=None) -> ModelOutput(logits, loss, main_loss,
                              mtp_losses: list[Tensor], aux_loss)
                              loss = main + mtp_loss_weight * mean(mtp_losses) + aux
    .update_expert_bias()     sign-rule step for every MoE layer; the loop calls it once per
                              optimizer step, after optimizer.step()
  Block
    .kind                     "full" | "swa"
    .attn                     Attention; .ffn is MoE (layers >= n_dense_layers) or DenseFFN
    forward output            the residual stream after the block, x_BTD
  Attention
    .n_heads                  query heads of this layer (more in "swa" layers)
    .probe_logits             probe(max_logit_H): per-query-head max pre-softmax logit (after
                              QK-norm, RoPE and 1/sqrt(d) scaling, masked positions excluded)
                              over the whole batch, shape [n_heads]
  MoE
    .n_experts, .top_k        E, K
    .router                   Router: forward(x_TD) -> RouterOutput(topk_idx_TK long,
                              topk_weight_TK normalized gate weights from unbiased scores,
                              scores_TE sigmoid unbiased, logits_TE pre-sigmoid); T = B*T tokens
    .expert_bias              buffer [E], the aux-loss-free selection bias (router.expert_bias)
    .tokens_per_expert_E      long buffer [E]: assignments counted this step (training mode,
                              on the device, no host sync); reset by update_expert_bias()
    .experts.w_gate [E,H,D], .experts.w_up [E,H,D], .experts.w_down [E,D,H]
                              batched routed-expert parameters
    .shared                   shared expert SwiGLU (.w_gate / .w_up / .w_down nn.Linear)
    .probe_experts            probe(h_NH, out_ND, expert_idx_N): every routed assignment
                              (N = T*K), rows grouped by expert in ascending expert order;
                              h = SwiGLU intermediate after clamping (input of w_down),
                              out = expert output before the gate weight
    .probe_shared             probe(h_TH, out_TD) for the shared expert
    .set_clamp(site, limit)   site "routed" | "shared"; limit > 0 or None (off). SwiGLU becomes
                              min(silu(gate), L) * clamp(up, -L, L). The limit is a 0-dim
                              float32 buffer changed in place (inf = off, bit-identical to no
                              clamp); safe to call between steps, e.g. in monitor.step_begin
    .clamp_limit(site)        float | None

Training-loop monitor call points: see model/train.py's module docstring.
"""
