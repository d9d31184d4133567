"""Imported checkpoints exported back as their original transformers class (`speedlm hf export
--format native`, speedlm/hf/native.py): the folder loads with plain `AutoModelForCausalLM`
(no speedlm config, no remote code) and computes the original model's logits, for every
architecture speedlm imports; checkpoints that were not imported are refused in one line."""

import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from support.hf_models import rel_err, tiny_hf_model  # noqa: E402

from speedlm.cli import main  # noqa: E402
from speedlm.data.tokenizers import ByteTokenizer  # noqa: E402
from speedlm.errors import SpeedlmError  # noqa: E402
from speedlm.hf import from_pretrained, to_hf_tokenizer  # noqa: E402
from speedlm.hf.imports import CONVERTERS, hf_config_dict, native_config  # noqa: E402
from speedlm.hf.native import to_native  # noqa: E402

HERE = Path(__file__).parent


def _builder(module: str, name: str):
    """A tiny-model builder of another import test (each architecture's test owns its config)."""
    spec = importlib.util.spec_from_file_location(f"_native_{module}", HERE / f"{module}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return getattr(mod, name)


# model type -> (test module, builder, overrides): one tiny random model of each supported architecture
BUILDERS = {
    "llama": ("support", "tiny_hf_model", {"arch": "llama"}),
    "mistral": ("support", "tiny_hf_model", {"arch": "mistral", "tie_word_embeddings": True}),
    "mamba": ("test_hf_mamba_import", "tiny_mamba", {"use_conv_bias": False}),
    "mamba2": ("test_hf_mamba_import", "tiny_mamba2", {}),
    "mixtral": ("test_hf_mixtral_import", "tiny_mixtral", {}),
    "jamba": ("test_hf_jamba_import", "tiny_jamba", {"mamba_conv_bias": False}),
    "falcon_mamba": ("test_hf_falcon_mamba_import", "tiny_falcon_mamba", {"tie_word_embeddings": False}),
    "qwen2": ("test_hf_qwen_import", "tiny_qwen", {"arch": "qwen2"}),
    "qwen3": ("test_hf_qwen_import", "tiny_qwen", {"arch": "qwen3", "head_dim": 16}),
    "qwen2_moe": ("test_hf_qwen_moe_import", "tiny_qwen_moe", {"arch": "qwen2_moe", "mlp_only_layers": [1]}),
    "qwen3_moe": ("test_hf_qwen_moe_import", "tiny_qwen_moe", {"arch": "qwen3_moe", "head_dim": 16}),
    "qwen3_next": ("test_hf_qwen3_next_import", "tiny_qwen3_next", {}),
    "falcon_h1": ("test_hf_falcon_h1_import", "tiny_falcon_h1", {}),  # its muP multipliers folded
}


def tiny(kind: str, **extra):
    module, name, overrides = BUILDERS[kind]
    build = tiny_hf_model if module == "support" else _builder(module, name)
    return build(**{**overrides, **extra})


def test_every_importable_architecture_has_a_native_export_test():
    assert set(BUILDERS) == set(CONVERTERS)


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_native_export_gives_back_the_original_model(kind):
    hf = tiny(kind, dtype=torch.float32)
    ours = from_pretrained(hf)
    config = native_config({"hf_config": hf_config_dict(hf.config)})
    back = to_native(ours, config, from_pretrained)
    assert type(back) is type(hf)
    original, exported = hf.state_dict(), back.state_dict()
    assert set(original) == set(exported)
    for name, weight in original.items():
        # bit-equal, except where the import folded a factor (a muP multiplier, a zero-centred
        # gain's 1 + w): dividing it out again rounds within a float32 ulp
        assert torch.allclose(exported[name], weight, rtol=2e-7, atol=0), name
    ids = torch.randint(0, hf.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert rel_err(back(ids).logits, hf(ids).logits) < 1e-6


def test_hf_export_native_writes_a_folder_the_original_class_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    hf = tiny("mamba2", dtype=torch.float32, vocab_size=256)
    hf.save_pretrained(tmp_path / "hf")
    to_hf_tokenizer(ByteTokenizer()).save_pretrained(tmp_path / "hf")
    assert main(["hf", "import", "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    assert main(["hf", "export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "native"),
                 "--format", "native"]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "native").eval()
    assert type(loaded) is type(hf) and loaded.config.model_type == "mamba2"
    ids = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert rel_err(loaded(ids).logits, hf(ids).logits) < 1e-6


def test_native_export_of_a_checkpoint_not_imported_is_one_line(tmp_path, capsys):
    from speedlm.models import build_model, preset_config
    from speedlm.train.checkpoint import save_checkpoint

    tok = ByteTokenizer()
    run = tmp_path / "run"
    save_checkpoint(run, 1, build_model(preset_config("transformer-tiny", vocab_size=tok.vocab_size)),
                    trainer_state={"tokenizer": tok.spec()}, extra_files_writer=tok.save)
    assert main(["hf", "export", "--checkpoint", str(run), "--out", str(tmp_path / "x"), "--format", "native"]) == 2
    err = capsys.readouterr().err.strip()
    assert "not imported from Hugging Face" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()
    with pytest.raises(SpeedlmError, match="not imported"):
        native_config({})


def accuracy_table() -> str:
    """Per architecture: the import's logits against transformers (float64 weights) and the
    native export's largest relative weight change (float32 weights); BENCHMARKS.md's table."""
    lines = ["| model type | params | logits rel. error vs transformers (float64 weights) "
             "| native export: max relative weight change |", "|---|---|---|---|"]
    for kind in sorted(BUILDERS):
        hf = tiny(kind)
        ids = torch.randint(0, hf.config.vocab_size, (2, 23), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            err = rel_err(from_pretrained(hf).to(torch.float64)(ids), hf(ids).logits)
        hf32 = tiny(kind, dtype=torch.float32)
        back = to_native(from_pretrained(hf32), native_config({"hf_config": hf_config_dict(hf32.config)}),
                         from_pretrained).state_dict()
        worst = max(((back[n] - w).abs() / w.abs().clamp_min(1e-30)).max().item()
                    for n, w in hf32.state_dict().items() if w.is_floating_point() and w.numel())
        lines.append(f"| {kind} | {sum(p.numel() for p in hf.parameters()):,} | {err:.1e} | {worst:.1e} |")
    return "\n".join(lines)


if __name__ == "__main__":  # cd tests && python -m hf.test_hf_native_export
    print(accuracy_table())
