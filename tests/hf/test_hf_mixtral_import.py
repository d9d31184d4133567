"""Hugging Face Mixtral checkpoints (`MixtralForCausalLM`) imported onto speedlm's attention +
`moe` layout (speedlm/hf/mixtral.py), weight for weight: transformers' logits and greedy
tokens, speedlm's cached decoding equal to its forward, and refusals by name."""

import pytest
import torch

pytest.importorskip("transformers")

from support.hf_models import imported_matches  # noqa: E402

from speedlm.errors import SpeedlmError  # noqa: E402
from speedlm.generate.loop import generate  # noqa: E402
from speedlm.hf import from_pretrained  # noqa: E402


def tiny_mixtral(dtype=torch.float64, seed=0, **overrides):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(**{
        "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 48, "num_local_experts": 4, "num_experts_per_tok": 2,
        "max_position_embeddings": 128, "sliding_window": None, "experts_implementation": "eager",
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, **overrides})
    torch.manual_seed(seed)
    model = MixtralForCausalLM(config).eval()
    with torch.no_grad():  # a router with clear preferences: no near-ties for top-2 to flip on
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(20)
    return model.to(dtype)


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": True, "num_local_experts": 6}],
                         ids=["untied", "tied-6-experts"])
def test_imported_mixtral_computes_the_same_logits_tokens_and_cached_steps(overrides):
    hf = tiny_mixtral(**overrides)
    ours = from_pretrained(hf).to(torch.float64)
    assert ours.config.ffn["name"] == "moe" and ours.config.ffn["top_k"] == hf.config.num_experts_per_tok
    assert ours.num_params() == sum(p.numel() for p in hf.parameters())
    ids = torch.randint(0, 64, (2, 23), generator=torch.Generator().manual_seed(1))
    imported_matches(ours, hf, ids, prefill=8)  # transformers computes RoPE angles in float32
    with torch.no_grad():
        hf_tokens = hf.generate(ids[:, :9], max_new_tokens=12, do_sample=False)
    assert torch.equal(generate(ours, ids[:, :9], 12).ids, hf_tokens)


@pytest.mark.parametrize("overrides, reason", [({"router_jitter_noise": 0.1}, "router_jitter_noise"),
                                               ({"sliding_window": 8}, "sliding window"),
                                               ({"hidden_act": "gelu"}, "activation"),
                                               ({"num_experts_per_tok": 1}, "num_experts_per_tok=1")])
def test_what_speedlm_cannot_honour_is_refused_by_name(overrides, reason):
    with pytest.raises(SpeedlmError, match=reason):
        from_pretrained(tiny_mixtral(**overrides))
