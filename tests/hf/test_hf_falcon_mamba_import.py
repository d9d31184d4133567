"""Hugging Face FalconMamba checkpoints (`FalconMambaForCausalLM`) imported onto speedlm's `mamba`
layout with weightless inner norms (speedlm/hf/mamba.py), weight for weight: transformers' logits
(to float64 rounding once its float32 casts are lifted) and greedy tokens, speedlm's cached
decoding equal to its forward, and refusals by name."""

import pytest
import torch

pytest.importorskip("transformers")

from support.hf_models import spread_mamba_mixers, imported_matches, rel_err  # noqa: E402
from support.paper_models import float64_reference  # noqa: E402

from speedlm.errors import SpeedlmError  # noqa: E402
from speedlm.generate.loop import generate  # noqa: E402
from speedlm.hf import check_importable, from_pretrained  # noqa: E402


def falcon_mamba_config(**overrides):
    from transformers import FalconMambaConfig

    return FalconMambaConfig(**{"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "state_size": 8,
                                "expand": 2, "conv_kernel": 4, **overrides})


def tiny_falcon_mamba(dtype=torch.float64, seed=0, **overrides):
    from transformers import FalconMambaForCausalLM

    torch.manual_seed(seed)
    model = FalconMambaForCausalLM(falcon_mamba_config(**overrides)).eval()
    spread_mamba_mixers(model)
    return model.to(dtype)


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": False, "mixer_rms_eps": 1e-2,
                                            "use_conv_bias": False}], ids=["tied", "untied-eps-1e-2-no-conv-bias"])
def test_imported_falcon_mamba_computes_the_same_logits_tokens_and_cached_steps(overrides):
    hf = tiny_falcon_mamba(**overrides)
    ours = from_pretrained(hf).to(torch.float64)
    mixer = ours.config.layers["M"]["mixer"]
    assert (mixer["inner_norms"], mixer["inner_norm_gains"], mixer["inner_norm_eps"]) == (
        True, False, hf.config.mixer_rms_eps)
    assert ours.num_params() == sum(p.numel() for p in hf.parameters()) + (  # the weightless norms add nothing
        0 if hf.config.use_conv_bias else ours.blocks[0].mixer.conv.bias.numel() * len(ours.blocks))
    ids = torch.randint(0, 64, (2, 25), generator=torch.Generator().manual_seed(1))
    imported_matches(ours, hf, ids, prefill=9)  # transformers' norms run in float32 whatever the dtype
    with torch.no_grad(), float64_reference():
        reference = hf(ids).logits
    assert rel_err(ours(ids).detach(), reference) < 1e-12  # the norms and their epsilon exactly
    with torch.no_grad():  # transformers' cached generate() agrees with its forward for FalconMamba
        hf_tokens = hf.generate(ids[:, :9], max_new_tokens=10, do_sample=False)
    assert torch.equal(generate(ours, ids[:, :9], 10).ids, hf_tokens)


@pytest.mark.parametrize("overrides, reason", [({"use_bias": True}, "use_bias"),
                                               ({"hidden_act": "gelu"}, "activation")])
def test_what_speedlm_cannot_honour_is_refused_by_name(overrides, reason):
    with pytest.raises(SpeedlmError, match=reason):
        check_importable(falcon_mamba_config(**overrides))
