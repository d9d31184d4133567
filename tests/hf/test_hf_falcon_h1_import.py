"""Hugging Face Falcon-H1 checkpoints (`FalconH1ForCausalLM`) imported onto speedlm's
`parallel_hybrid` layout (speedlm/hf/falcon_h1.py), weight for weight with every muP multiplier
folded into the weights: the same logits as transformers' own forward, the same greedy tokens,
speedlm's cached decoding equal to its forward, the same parameter count, a checkpoint written by
`speedlm hf import`, and refusals that name the field speedlm cannot honour."""

import pytest
import torch

pytest.importorskip("transformers")

from support.hf_models import import_through_cli, imported_matches, rel_err  # noqa: E402

from speedlm.errors import SpeedlmError  # noqa: E402
from speedlm.generate.loop import generate  # noqa: E402
from speedlm.hf import check_importable, from_pretrained  # noqa: E402

# muP multipliers away from 1 (each a different value), so that a multiplier left unfolded, or
# folded into the wrong segment, changes the logits
MULTIPLIERS = dict(
    embedding_multiplier=2.5, lm_head_multiplier=0.3, key_multiplier=0.7, attention_in_multiplier=1.3,
    attention_out_multiplier=0.6, ssm_in_multiplier=1.7, ssm_out_multiplier=0.8,
    ssm_multipliers=[0.5, 1.5, 0.8, 1.2, 2.0], mlp_multipliers=[1.4, 0.6],
)
# Mamba-2 heads of 12 channels on an inner width of 48 (not a multiple of the width 32), 2 groups,
# a chunk of 8 (prompts span several), the gated norm after the gate (Falcon-H1's checkpoints)
TINY = dict(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, mamba_d_ssm=48, mamba_n_heads=4, mamba_d_head="auto", mamba_d_state=8, mamba_n_groups=2,
    mamba_chunk_size=8, mamba_rms_norm=True, mamba_norm_before_gate=False, max_position_embeddings=512,
    bos_token_id=None, eos_token_id=None, pad_token_id=None, **MULTIPLIERS,
)


def tiny_falcon_h1(dtype=torch.float64, seed=0, **overrides):
    from transformers import FalconH1Config, FalconH1ForCausalLM

    config = FalconH1Config(**{**TINY, **overrides})
    torch.manual_seed(seed)
    model = FalconH1ForCausalLM(config).eval()
    with torch.no_grad():  # decays, skips, time steps and gains away from their inits
        for layer in model.model.layers:
            mixer = layer.mamba
            mixer.A_log.add_(torch.randn_like(mixer.A_log) * 0.3)
            mixer.D.add_(torch.randn_like(mixer.D))
            mixer.dt_bias.add_(torch.randn_like(mixer.dt_bias) * 0.5)
            gains = [layer.input_layernorm.weight, layer.pre_ff_layernorm.weight]
            gains += [mixer.norm.weight] if config.mamba_rms_norm else []
            for gain in gains:
                gain.add_(torch.randn_like(gain) * 0.2)
        model.model.final_layernorm.weight.add_(torch.randn_like(model.model.final_layernorm.weight) * 0.2)
    return model.to(dtype)


CASES = {
    "untied": {},
    "tied": {"tie_word_embeddings": True},  # lm_head / embedding multiplier folded into the final norm
    "no-gated-norm": {"mamba_rms_norm": False},  # transformers' default: y * silu(z)
    "norm-before-gate,mha,one-group": {"mamba_norm_before_gate": True, "num_key_value_heads": 4, "mamba_n_groups": 1},
    # attention heads of 12: 48 channels on a width of 32 (Falcon-H1's attention is narrower than its width)
    "head-dim,no-conv-bias": {"head_dim": 12, "mamba_conv_bias": False},
}


@pytest.mark.parametrize("overrides", list(CASES.values()), ids=list(CASES))
def test_imported_falcon_h1_computes_the_same_logits_tokens_and_cached_steps(overrides):
    hf = tiny_falcon_h1(**overrides)
    ours = from_pretrained(hf).to(torch.float64)
    assert ours.config.layers["F"]["mixer"]["name"] == "parallel_hybrid"
    assert ours.num_params() == sum(p.numel() for p in hf.parameters())
    ids = torch.randint(0, 64, (2, 27), generator=torch.Generator().manual_seed(3))  # odd: a partial last chunk
    imported_matches(ours, hf, ids, prefill=10)  # transformers runs its SSM and norms in float32
    with torch.no_grad():
        hf_tokens = hf.generate(ids[:, :9], max_new_tokens=12, do_sample=False)
    assert torch.equal(generate(ours, ids[:, :9], 12).ids, hf_tokens)


@pytest.mark.parametrize("field", list(MULTIPLIERS))
def test_every_multiplier_is_folded_into_the_weights(field):
    """One multiplier away from 1 at a time (the others 1): the logits still agree, and the
    multiplier matters (the model with it differs from the one without)."""
    plain = {name: [1.0] * len(v) if isinstance(v, list) else 1.0 for name, v in MULTIPLIERS.items()}
    ids = torch.randint(0, 64, (2, 19), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        hf = tiny_falcon_h1(**{**plain, field: MULTIPLIERS[field]})
        logits = hf(ids).logits
        assert rel_err(from_pretrained(hf).to(torch.float64)(ids), logits) < 1e-6
        assert rel_err(tiny_falcon_h1(**plain)(ids).logits, logits) > 1e-3


REFUSED = [
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"mamba_proj_bias": True}, "mamba_proj_bias"),
    ({"projectors_bias": True}, "projectors_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"time_step_limit": (0.0, 1.0)}, "time_step_limit"),
    ({"tie_word_embeddings": True, "embedding_multiplier": 0.0}, "embedding_multiplier=0"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}, "RoPE type 'linear'"),
]


@pytest.mark.parametrize("overrides, reason", REFUSED, ids=[r for _, r in REFUSED])
def test_fields_speedlm_cannot_honour_are_refused_by_name(overrides, reason):
    from transformers import FalconH1Config

    with pytest.raises(SpeedlmError, match=reason):
        check_importable(FalconH1Config(**{**TINY, **overrides}))


def test_hf_import_writes_a_falcon_h1_checkpoint_with_the_same_logits(tmp_path):
    hf = tiny_falcon_h1(dtype=torch.float32, vocab_size=256)
    pre = import_through_cli(hf, tmp_path)
    assert pre.model.config.layers["F"]["mixer"]["name"] == "parallel_hybrid"
