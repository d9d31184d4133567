"""Hugging Face Qwen3-Next checkpoints (`Qwen3NextForCausalLM`) imported onto speedlm's
`gated_deltanet` + gated `attention` + `moe` layers (speedlm/hf/qwen3_next.py), weight for weight:
transformers' logits and greedy tokens, speedlm's cached decoding equal to its forward, parameter
counts, and refusals by name. transformers runs its torch fallbacks here (no fla, no
causal_conv1d on CPU): the chunked gated delta rule and the conv in float32 whatever the model's
dtype, so the logits agree at float32 level."""

import pytest
import torch

pytest.importorskip("transformers")

from support.hf_models import imported_matches  # noqa: E402

from speedlm.errors import SpeedlmError  # noqa: E402
from speedlm.generate.loop import generate  # noqa: E402
from speedlm.hf import from_pretrained  # noqa: E402

LINEAR, FULL = "linear_attention", "full_attention"


def tiny_qwen3_next(dtype=torch.float64, seed=0, **overrides):
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    config = Qwen3NextConfig(**{
        "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 48,
        # 4 value heads on 2 query/key heads, keys and values of their own widths
        "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 8,
        "linear_value_head_dim": 12, "linear_conv_kernel_dim": 4,
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24,
        "shared_expert_intermediate_size": 40, "mlp_only_layers": [2],
        "layer_types": [LINEAR, FULL, LINEAR, FULL], "max_position_embeddings": 128,
        "experts_implementation": "eager",
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        **overrides})
    torch.manual_seed(seed)
    model = Qwen3NextForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # zero-centred norms start at 0, the gated norm at 1: make them matter
                # on a 2^-12 grid, so that 1 + w is exact in float32 (as for bf16 checkpoints): the native
                # export round trip (test_hf_native_export.py) compares weights exactly
                p.add_(torch.round(0.2 * torch.randn_like(p) * 4096) / 4096)
            elif name.endswith(("dt_bias", "A_log")):
                p.add_(0.3 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight"):  # a router with clear preferences: no top-k near-ties
                p.mul_(20)
    return model.to(dtype)


def greedy_by_forward(hf, ids, steps):
    """transformers' greedy tokens from its uncached forward: its cached `generate` cannot run a
    model without any attention layer (its cache asks an attention layer for the mask sizes)."""
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, hf(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def check_import(hf, tol=1e-6):
    ours = from_pretrained(hf).to(torch.float64)
    assert ours.num_params() == sum(p.numel() for p in hf.parameters())
    ids = torch.randint(0, 64, (2, 23), generator=torch.Generator().manual_seed(1))
    imported_matches(ours, hf, ids, prefill=8, tol=tol)
    if FULL in hf.config.layer_types:
        with torch.no_grad():
            hf_tokens = hf.generate(ids[:, :9], max_new_tokens=12, do_sample=False)
    else:
        hf_tokens = greedy_by_forward(hf, ids[:, :9], 12)
    assert torch.equal(generate(ours, ids[:, :9], 12).ids, hf_tokens)
    return ours


def test_linear_attention_layers_with_grouped_values_and_shared_experts():
    """The DeltaNet side alone: every layer linear attention, MoE with its gated shared expert
    except one dense layer (mlp_only_layers). transformers' forward cannot build its cache for a
    model without attention layers (its mask asks an attention layer for sizes): it runs uncached."""
    hf = tiny_qwen3_next(layer_types=[LINEAR] * 4, use_cache=False)
    ours = check_import(hf)
    spec = ours.config.layer_specs()[0]
    assert spec["mixer"]["name"] == "gated_deltanet" and spec["mixer"]["key_heads"] == 2 and spec["mixer"]["heads"] == 4
    assert spec["ffn"]["shared_gate"] and [s["ffn"]["name"] for s in ours.config.layer_specs()] == ["moe", "moe", "swiglu", "moe"]


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": True, "decoder_sparse_step": 2, "mlp_only_layers": [],
                                            "norm_topk_prob": False, "linear_num_value_heads": 2}],
                         ids=["mixed", "tied-sparse-step-2"])
def test_imported_qwen3_next_computes_the_same_logits_tokens_and_cached_steps(overrides):
    ours = check_import(tiny_qwen3_next(**overrides))
    mixers = [s["mixer"]["name"] for s in ours.config.layer_specs()]
    assert mixers == ["gated_deltanet", "attention", "gated_deltanet", "attention"]


@pytest.mark.parametrize("overrides, reason", [({"hidden_act": "gelu"}, "hidden_act"),
                                               ({"attention_bias": True}, "attention_bias"),
                                               ({"num_experts_per_tok": 1}, "num_experts_per_tok=1"),
                                               ({"rope_parameters": {"rope_type": "linear", "factor": 2.0,
                                                                     "rope_theta": 10000.0}}, "RoPE type"),
                                               ({"linear_num_value_heads": 3}, "linear_num_value_heads")])
def test_what_speedlm_cannot_honour_is_refused_by_name(overrides, reason):
    from transformers import Qwen3NextConfig

    from speedlm.hf.imports import check_importable

    config = Qwen3NextConfig(**{
        "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 8,
        "linear_value_head_dim": 8, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
        "shared_expert_intermediate_size": 16, **overrides})
    with pytest.raises(SpeedlmError, match=reason):
        check_importable(config)
