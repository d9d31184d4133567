"""Hugging Face Jamba checkpoints (`JambaForCausalLM`) imported onto speedlm's `jamba` layout
(speedlm/hf/jamba.py), weight for weight: transformers' logits (to float64 rounding once its
float32 casts are lifted) and greedy tokens, speedlm's cached decoding equal to its forward, the
layer pattern from the periods and offsets, and refusals by name."""

import pytest
import torch

pytest.importorskip("transformers")

from support.hf_models import imported_matches, rel_err  # noqa: E402
from support.paper_models import float64_reference  # noqa: E402

from speedlm.errors import SpeedlmError  # noqa: E402
from speedlm.generate.loop import generate  # noqa: E402
from speedlm.hf import check_importable, from_pretrained  # noqa: E402
from speedlm.hf.jamba import jamba_model_config  # noqa: E402

SMALL = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 48, "num_experts": 4, "num_experts_per_tok": 2,
         "attn_layer_period": 4, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1,
         "mamba_d_state": 8, "mamba_d_conv": 4, "mamba_expand": 2, "experts_implementation": "eager",
         "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}


def jamba_config(**overrides):
    from transformers import JambaConfig

    return JambaConfig(**{**SMALL, **overrides})


def tiny_jamba(dtype=torch.float64, seed=0, **overrides):
    from transformers import JambaForCausalLM

    torch.manual_seed(seed)
    model = JambaForCausalLM(jamba_config(**overrides)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 or name.endswith("A_log"):  # norm gains, D, dt biases, A away from their inits
                p.add_(0.2 * torch.randn(p.shape, generator=g))
            if name.endswith("router.weight"):  # a router with clear preferences: no near-ties for top-k
                p.mul_(20)
    return model.to(dtype)


@pytest.mark.parametrize("overrides, pattern", [
    ({}, "MXME"),
    # top-1 keeps the raw probability in Jamba as in speedlm (Switch); no conv bias loads zeros
    ({"tie_word_embeddings": True, "num_experts_per_tok": 1, "mamba_conv_bias": False, "num_hidden_layers": 6},
     "MXMEMX"),
], ids=["untied-top2", "tied-top1-no-conv-bias"])
def test_imported_jamba_computes_the_same_logits_tokens_and_cached_steps(overrides, pattern):
    hf = tiny_jamba(**overrides)
    ours = from_pretrained(hf).to(torch.float64)
    assert ours.config.pattern == pattern
    no_conv_bias = 0 if hf.config.mamba_conv_bias else sum(  # speedlm's conv always has a bias (zeros here)
        b.mixer.conv.bias.numel() for b in ours.blocks if hasattr(b.mixer, "conv"))
    assert ours.num_params() == sum(p.numel() for p in hf.parameters()) + no_conv_bias
    ids = torch.randint(0, 64, (2, 19), generator=torch.Generator().manual_seed(1))
    imported_matches(ours, hf, ids, prefill=7)  # transformers' norms and router run in float32
    with torch.no_grad(), float64_reference():
        reference = hf(ids).logits
    assert rel_err(ours(ids).detach(), reference) < 1e-12
    with torch.no_grad():  # transformers' cached generate() agrees with its forward for Jamba
        hf_tokens = hf.generate(ids[:, :7], max_new_tokens=8, do_sample=False)
    assert torch.equal(generate(ours, ids[:, :7], 8).ids, hf_tokens)


def test_the_default_jamba_config_is_the_jamba_preset_layout():
    """Jamba-v0.1's layout (attention in the fifth of every 8 layers, experts every other layer)
    is the preset's pattern; one expert everywhere means dense layers only."""
    from transformers import JambaConfig

    config = jamba_model_config(JambaConfig())
    assert config.pattern == "MEMEAEME" and config.n_layers == 32
    assert config.layers["A"]["mixer"] == {"name": "attention", "positions": "none", "kv_heads": 8}
    assert config.layers["E"]["ffn"] == {"name": "moe", "experts": 16, "top_k": 2, "renormalize": False}
    assert config.layers["M"]["mixer"]["inner_norms"] and "ffn" not in config.layers["M"]
    assert jamba_model_config(jamba_config(num_experts=1)).pattern == "MAMM"


@pytest.mark.parametrize("overrides, reason", [({"hidden_act": "gelu"}, "activation"),
                                               ({"mamba_proj_bias": True}, "mamba_proj_bias"),
                                               ({"sliding_window": 8}, "sliding_window"),
                                               ({"head_dim": 16}, "head_dim=16")])
def test_what_speedlm_cannot_honour_is_refused_by_name(overrides, reason):
    with pytest.raises(SpeedlmError, match=reason):
        check_importable(jamba_config(**overrides))
