"""Presets that name a paper's architecture are that architecture: where `transformers`
implements it, the preset's model with the reference's weights computes the same logits (float64,
relative RMS error < 1e-10) and the same greedy tokens through its caches."""

import copy

import pytest
import torch

pytest.importorskip("transformers")

from support import paper_models  # noqa: E402
from support.paper_models import float64_reference, rel_err  # noqa: E402

from speedlm.generate.loop import generate  # noqa: E402
from speedlm.models import build_model, preset_config  # noqa: E402

# preset -> (the reference's builder, its weight map); sizes are the preset's tiny ones, with
# untied embeddings where the paper's model has them (the map covers lm_head too)
CASES = {
    "jamba": (paper_models.jamba, paper_models.jamba_state_dict, dict(tie_embeddings=False)),
    "mixtral": (paper_models.mixtral, paper_models.mixtral_state_dict, dict(tie_embeddings=False)),
    "mamba": (paper_models.mamba, paper_models.mamba_state_dict, {}),
    "mamba2": (paper_models.mamba2, paper_models.mamba_state_dict, {}),
    "falcon-h1": (paper_models.falcon_h1, paper_models.falcon_h1_state_dict, dict(tie_embeddings=False)),
}


def pair(preset: str, strict: bool = True, **overrides):
    """The preset's model (float64) and the reference with the same weights."""
    make_reference, state_dict, fields = CASES[preset]
    config = preset_config(preset, **{**fields, **overrides})
    hf = make_reference(config)
    ours = build_model(config).to(torch.float64).eval()
    ours.load_state_dict(state_dict(hf, config), strict=strict)  # strict: every parameter mapped, none left over
    return ours, hf


def ids_of(t: int, vocab: int = 256, b: int = 2) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(t))


@pytest.mark.parametrize("preset", list(CASES))
@torch.no_grad()
def test_preset_equals_the_papers_model_with_the_same_weights(preset):
    ours, hf = pair(preset)
    assert ours.num_params() == sum(p.numel() for p in hf.parameters())
    ids = ids_of(37)
    with float64_reference():
        expected = hf(ids).logits
        hf_tokens = hf.generate(ids[:, :9], max_new_tokens=12, do_sample=False)
    assert rel_err(ours(ids), expected) < 1e-10
    assert torch.equal(generate(ours, ids[:, :9], 12).ids, hf_tokens)


@pytest.mark.parametrize("choice", ["positions", "inner_norms", "renormalize"])
@torch.no_grad()
def test_each_of_jambas_choices_is_needed(choice):
    """With any one of Jamba's three choices back at speedlm's default (RoPE in attention, Mamba
    without the dt/B/C norms, top-2 weights renormalised), the model is no longer Jamba."""
    layers = copy.deepcopy(preset_config("jamba").layers)
    for spec in layers.values():
        for part in spec.values():
            part.pop(choice, None)
    ours, hf = pair("jamba", strict=choice != "inner_norms", layers=layers)  # no norms: their weights stay unused
    ids = ids_of(37)
    with float64_reference():
        expected = hf(ids).logits
    assert rel_err(ours(ids), expected) > 1e-3
