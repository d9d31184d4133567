"""Hugging Face Mamba checkpoints (`MambaForCausalLM`) imported onto speedlm's `mamba` layout
(speedlm/hf/mamba.py), weight for weight: the same logits as transformers' own forward, the
same greedy tokens, speedlm's cached decoding equal to its forward, a checkpoint written by
`speedlm hf import`, and refusals that name the field speedlm cannot honour."""

import pytest
import torch

pytest.importorskip("transformers")

from support.hf_models import rel_err  # noqa: E402

from speedlm.checkpoint.pretrained import load_pretrained  # noqa: E402
from speedlm.cli import main  # noqa: E402
from speedlm.data.tokenizers import ByteTokenizer  # noqa: E402
from speedlm.errors import SpeedlmError  # noqa: E402
from speedlm.generate.loop import generate  # noqa: E402
from speedlm.hf import from_mamba, from_pretrained, import_llama, import_model, to_hf_tokenizer  # noqa: E402


def tiny_mamba(dtype=torch.float64, seed=0, **overrides):
    from transformers import MambaConfig, MambaForCausalLM

    config = MambaConfig(**{"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "state_size": 8,
                            "expand": 2, "conv_kernel": 4, **overrides})
    torch.manual_seed(seed)
    model = MambaForCausalLM(config).eval()
    with torch.no_grad():  # a spread of decays and skips, not the init's narrow band
        for layer in model.backbone.layers:
            layer.mixer.A_log.add_(torch.randn_like(layer.mixer.A_log) * 0.3)
            layer.mixer.D.add_(torch.randn_like(layer.mixer.D))
            layer.mixer.conv1d.weight.mul_(3)
    return model.to(dtype)


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": False}, {"use_conv_bias": False},
                                       {"time_step_rank": 5}], ids=["tied", "untied", "no-conv-bias", "dt-rank-5"])
def test_imported_mamba_computes_the_same_logits_tokens_and_cached_steps(overrides):
    hf = tiny_mamba(**overrides)
    ours = from_mamba(hf).to(torch.float64)
    assert ours.num_params() == sum(p.numel() for p in hf.parameters()) + (
        0 if hf.config.use_conv_bias else ours.blocks[0].mixer.conv.bias.numel() * len(ours.blocks))
    ids = torch.randint(0, 64, (2, 29), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = ours(ids)
        # transformers' RMSNorm runs in float32 whatever the model's dtype: float32-level agreement
        assert rel_err(full, hf(ids).logits) < 1e-6
        cache = ours.init_cache()
        steps = [ours(ids[:, :11], cache)] + [ours(ids[:, i : i + 1], cache) for i in range(11, 29)]
        assert rel_err(torch.cat(steps, dim=1), full) < 1e-12  # speedlm's cached decoding == its forward
        hf_tokens = hf.generate(ids[:, :9], max_new_tokens=12, do_sample=False)
    assert torch.equal(generate(ours, ids[:, :9], 12).ids, hf_tokens)


def test_from_pretrained_picks_the_converter_by_model_type():
    hf = tiny_mamba()
    assert rel_err(from_pretrained(hf).to(torch.float64)(torch.arange(10)[None]), hf(torch.arange(10)[None]).logits) < 1e-6


@pytest.mark.parametrize("overrides, reason", [({"use_bias": True}, "use_bias"), ({"hidden_act": "gelu"}, "activation")])
def test_what_speedlm_cannot_honour_is_refused_by_name(overrides, reason):
    with pytest.raises(SpeedlmError, match=reason):
        from_mamba(tiny_mamba(**overrides))


def test_an_architecture_without_a_converter_is_one_line():
    from support.hf_models import tiny_hf_model

    with pytest.raises(SpeedlmError, match="no speedlm import for Hugging Face model type 'qwen2'; supported: llama"):
        from_pretrained(tiny_hf_model("qwen2"))


def test_hf_import_writes_a_mamba_checkpoint_with_the_same_logits(tmp_path, capsys):
    hf = tiny_mamba(dtype=torch.float32, vocab_size=256)
    hf.save_pretrained(tmp_path / "hf")
    to_hf_tokenizer(ByteTokenizer()).save_pretrained(tmp_path / "hf")
    assert main(["hf", "import", "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    pre = load_pretrained(tmp_path / "run")
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel_err(pre.model(ids), hf(ids).logits) < 1e-5
    assert pre.model.config.layers["M"]["mixer"]["name"] == "mamba"
    with pytest.raises(SpeedlmError, match="expected a model of type llama or mistral"):
        import_llama(tmp_path / "hf", tmp_path / "run2")
    assert import_model(tmp_path / "hf", tmp_path / "run3").is_dir()
