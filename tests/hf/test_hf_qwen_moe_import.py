"""Hugging Face Qwen2-MoE and Qwen3-MoE checkpoints imported onto speedlm's attention + `moe`
layers (speedlm/hf/qwen_moe.py), weight for weight: transformers' logits and greedy tokens,
speedlm's cached decoding equal to its forward, dense and sparse layers mixed as the config says,
and refusals by name."""

import pytest
import torch

pytest.importorskip("transformers")

from support.hf_models import imported_matches  # noqa: E402

from speedlm.errors import SpeedlmError  # noqa: E402
from speedlm.generate.loop import generate  # noqa: E402
from speedlm.hf import check_importable, from_pretrained  # noqa: E402
from speedlm.hf.qwen_moe import shortest_tiling  # noqa: E402

COMMON = {
    "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
    "intermediate_size": 56, "moe_intermediate_size": 24, "num_experts": 6, "num_experts_per_tok": 2,
    "max_position_embeddings": 128, "experts_implementation": "eager", "bos_token_id": None, "eos_token_id": None,
    "pad_token_id": None, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
}


def tiny_qwen_moe(arch: str, dtype=torch.float64, seed=0, **overrides):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    config_cls, model_cls = {"qwen2_moe": (Qwen2MoeConfig, Qwen2MoeForCausalLM),
                             "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM)}[arch]
    extra = {"shared_expert_intermediate_size": 40} if arch == "qwen2_moe" else {}
    config = config_cls(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):  # routers start at zero: make them decisive, no near-ties
                p.normal_(0.0, 0.02).mul_(20)
            elif name.endswith("shared_expert_gate.weight"):  # a gate that varies from token to token
                p.normal_(0.0, 0.5)
            elif "norm" in name:  # norms start at one: random gains so a misplaced one shows
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    return model.to(dtype)


def check_import(hf):
    ours = from_pretrained(hf).to(torch.float64)
    assert ours.num_params() == sum(p.numel() for p in hf.parameters())
    ids = torch.randint(0, 64, (2, 23), generator=torch.Generator().manual_seed(1))
    imported_matches(ours, hf, ids, prefill=8)  # transformers' routing softmax and RoPE angles are float32
    with torch.no_grad():
        hf_tokens = hf.generate(ids[:, :9], max_new_tokens=12, do_sample=False)
    assert torch.equal(generate(ours, ids[:, :9], 12).ids, hf_tokens)
    return ours


CASES = {
    "qwen2-all-moe": ("qwen2_moe", {}),
    "qwen2-sparse-step-2-tied": ("qwen2_moe", {"decoder_sparse_step": 2, "tie_word_embeddings": True}),
    "qwen2-mlp-only-renormalized": ("qwen2_moe", {"mlp_only_layers": [0, 3], "norm_topk_prob": True}),
    "qwen2-top1-no-bias": ("qwen2_moe", {"num_experts_per_tok": 1, "qkv_bias": False}),
    "qwen2-head-dim": ("qwen2_moe", {"head_dim": 16, "mlp_only_layers": [1]}),
    "qwen3-all-moe": ("qwen3_moe", {"norm_topk_prob": True}),
    "qwen3-mixed-tied": ("qwen3_moe", {"mlp_only_layers": [2], "tie_word_embeddings": True}),
    "qwen3-head-dim-sparse-step": ("qwen3_moe", {"head_dim": 16, "decoder_sparse_step": 2}),
}


@pytest.mark.parametrize("arch, overrides", list(CASES.values()), ids=list(CASES))
def test_imported_qwen_moe_computes_the_same_logits_tokens_and_cached_steps(arch, overrides):
    hf = tiny_qwen_moe(arch, **overrides)
    ours = check_import(hf)
    sparse = [type(layer.mlp).__name__.endswith("SparseMoeBlock") for layer in hf.model.layers]
    specs = ours.config.layer_specs()
    assert [s["ffn"]["name"] == "moe" for s in specs] == sparse and any(sparse)
    moe = next(s for s in specs if s["ffn"]["name"] == "moe")["ffn"]
    assert moe["top_k"] == hf.config.num_experts_per_tok and moe["hidden"] == 24
    assert moe.get("shared_gate", False) == (arch == "qwen2_moe")  # Qwen3-MoE has no shared expert
    assert all(s["ffn"] == {"name": "swiglu"} for s in specs if s["ffn"]["name"] != "moe")


def test_layer_patterns_are_the_shortest_tiling():
    assert shortest_tiling("EEEE") == "E" and shortest_tiling("DEDE") == "DE" and shortest_tiling("DEED") == "DEED"
    config = from_pretrained(tiny_qwen_moe("qwen2_moe", decoder_sparse_step=2)).config
    assert config.pattern == "DE" and config.layers["E"]["ffn"]["shared_hidden"] == 40


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_a_zero_width_shared_expert_is_left_out():
    """Qwen2-MoE with shared_expert_intermediate_size=0: the shared expert adds zeros whatever its
    gate, so speedlm builds none (and has d_model fewer parameters per layer: the unused gate)."""
    hf = tiny_qwen_moe("qwen2_moe", shared_expert_intermediate_size=0, num_hidden_layers=2)
    ours = from_pretrained(hf).to(torch.float64)
    assert "shared" not in ours.config.layer_specs()[0]["ffn"]
    assert sum(p.numel() for p in hf.parameters()) - ours.num_params() == 2 * 32
    ids = torch.randint(0, 64, (2, 15), generator=torch.Generator().manual_seed(2))
    imported_matches(ours, hf, ids, prefill=5)


@pytest.mark.parametrize("arch, overrides, reason", [
    ("qwen2_moe", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 4}, "sliding_window"),
    ("qwen3_moe", {"use_sliding_window": True, "sliding_window": 8}, "sliding_window"),
    ("qwen3_moe", {"attention_bias": True}, "attention_bias"),
    ("qwen2_moe", {"hidden_act": "gelu"}, "activation 'gelu'"),
    ("qwen3_moe", {"num_experts_per_tok": 1, "norm_topk_prob": True}, "norm_topk_prob"),
    ("qwen2_moe", {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}}, "RoPE type"),
])
def test_what_speedlm_cannot_honour_is_refused_by_name(arch, overrides, reason):
    from transformers import Qwen2MoeConfig, Qwen3MoeConfig

    config = {"qwen2_moe": Qwen2MoeConfig, "qwen3_moe": Qwen3MoeConfig}[arch](**{**COMMON, **overrides})
    with pytest.raises(SpeedlmError, match=reason):
        check_importable(config)
