"""Hugging Face Mamba and Mamba-2 checkpoints (`MambaForCausalLM`, `Mamba2ForCausalLM`) imported
onto speedlm's `mamba` / `mamba2` layouts (speedlm/hf/mamba.py), weight for weight: the same logits as transformers' own forward, the
same greedy tokens, speedlm's cached decoding equal to its forward, a checkpoint written by
`speedlm hf import`, and refusals that name the field speedlm cannot honour."""

import pytest
import torch

pytest.importorskip("transformers")

from support.hf_models import spread_mamba_mixers, import_through_cli, imported_matches, rel_err  # noqa: E402

from speedlm.errors import SpeedlmError  # noqa: E402
from speedlm.generate.loop import generate  # noqa: E402
from speedlm.hf import (  # noqa: E402
    check_importable, from_mamba, from_pretrained, import_llama, import_model,
)


def tiny_mamba(dtype=torch.float64, seed=0, **overrides):
    from transformers import MambaConfig, MambaForCausalLM

    config = MambaConfig(**{"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "state_size": 8,
                            "expand": 2, "conv_kernel": 4, **overrides})
    torch.manual_seed(seed)
    model = MambaForCausalLM(config).eval()
    spread_mamba_mixers(model)
    return model.to(dtype)


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": False}, {"use_conv_bias": False},
                                       {"time_step_rank": 5}], ids=["tied", "untied", "no-conv-bias", "dt-rank-5"])
def test_imported_mamba_computes_the_same_logits_tokens_and_cached_steps(overrides):
    hf = tiny_mamba(**overrides)
    ours = from_mamba(hf).to(torch.float64)
    assert ours.num_params() == sum(p.numel() for p in hf.parameters()) + (
        0 if hf.config.use_conv_bias else ours.blocks[0].mixer.conv.bias.numel() * len(ours.blocks))
    ids = torch.randint(0, 64, (2, 29), generator=torch.Generator().manual_seed(1))
    imported_matches(ours, hf, ids, prefill=11)  # transformers' RMSNorm runs in float32 whatever the dtype
    with torch.no_grad():
        hf_tokens = hf.generate(ids[:, :9], max_new_tokens=12, do_sample=False)
    assert torch.equal(generate(ours, ids[:, :9], 12).ids, hf_tokens)


def tiny_mamba2(dtype=torch.float64, seed=0, **overrides):
    from transformers import Mamba2Config, Mamba2ForCausalLM

    config = Mamba2Config(**{"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "state_size": 8,
                             "expand": 2, "head_dim": 16, "num_heads": 4, "n_groups": 2, "conv_kernel": 4,
                             "chunk_size": 8, **overrides})
    torch.manual_seed(seed)
    model = Mamba2ForCausalLM(config).eval()
    with torch.no_grad():  # decays, skips and a gated norm away from their inits
        for layer in model.backbone.layers:
            layer.mixer.A_log.add_(torch.randn_like(layer.mixer.A_log) * 0.3)
            layer.mixer.D.add_(torch.randn_like(layer.mixer.D))
            layer.mixer.norm.weight.add_(torch.randn_like(layer.mixer.norm.weight) * 0.2)
    return model.to(dtype)


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": True}, {"use_conv_bias": False}],
                         ids=["untied", "tied", "no-conv-bias"])
def test_imported_mamba2_computes_the_same_logits_tokens_and_cached_steps(overrides):
    hf = tiny_mamba2(**overrides)
    ours = from_pretrained(hf).to(torch.float64)
    assert ours.config.layers["M"]["mixer"]["name"] == "mamba2"
    ids = torch.randint(0, 64, (2, 27), generator=torch.Generator().manual_seed(3))  # odd: a partial last chunk
    imported_matches(ours, hf, ids, prefill=10)
    with torch.no_grad():
        # greedy tokens from transformers' forward, re-run per token: its cached generate() is not
        # consistent with its own forward here (transformers 5, CPU torch path: after a prefill
        # longer than chunk_size, the state it caches is off; with chunk_size >= the prompt its
        # generate() agrees with its forward), so the reference is the forward it computes right
        seq = ids[:, :9]
        for _ in range(12):
            seq = torch.cat([seq, hf(seq).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generate(ours, ids[:, :9], 12).ids, seq)


@pytest.mark.parametrize("overrides, reason", [({"use_bias": True}, "use_bias"),
                                               ({"time_step_limit": (0.0, 1.0)}, "time_step_limit")])
def test_mamba2_fields_speedlm_cannot_honour_are_refused_by_name(overrides, reason):
    from transformers import Mamba2Config

    config = Mamba2Config(**{"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1, "state_size": 8, "expand": 2,
                             "head_dim": 16, "num_heads": 4, "n_groups": 1, **overrides})
    with pytest.raises(SpeedlmError, match=reason):
        check_importable(config)


def test_from_pretrained_picks_the_converter_by_model_type():
    hf = tiny_mamba()
    assert rel_err(from_pretrained(hf).to(torch.float64)(torch.arange(10)[None]), hf(torch.arange(10)[None]).logits) < 1e-6


@pytest.mark.parametrize("overrides, reason", [({"use_bias": True}, "use_bias"), ({"hidden_act": "gelu"}, "activation")])
def test_what_speedlm_cannot_honour_is_refused_by_name(overrides, reason):
    with pytest.raises(SpeedlmError, match=reason):
        from_mamba(tiny_mamba(**overrides))


def test_hf_import_writes_a_mamba_checkpoint_with_the_same_logits(tmp_path, capsys):
    hf = tiny_mamba(dtype=torch.float32, vocab_size=256)
    pre = import_through_cli(hf, tmp_path)
    assert pre.model.config.layers["M"]["mixer"]["name"] == "mamba"
    with pytest.raises(SpeedlmError, match="expected a model of type llama or mistral"):
        import_llama(tmp_path / "hf", tmp_path / "run2")
    assert import_model(tmp_path / "hf", tmp_path / "run3").is_dir()
