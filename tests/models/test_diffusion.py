"""Masked diffusion LM (models/diffusion.py) and its sampler (generate/diffusion.py): the masking
schedule and the 1/p loss weighting match their definitions, the one-token-per-step sampler is
a deterministic left-to-right reference, prompts are kept and nothing stays masked."""

import pytest
import torch
import torch.nn.functional as F

from speedlm.errors import SpeedlmError
from speedlm.generate.diffusion import diffusion_generate
from speedlm.models import ModelConfig, build_model
from speedlm.models.diffusion import MASK_FLOOR, low_discrepancy_times, mask_probability


def model(**fields):
    torch.manual_seed(0)
    cfg = ModelConfig(objective="diffusion", vocab_size=50, d_model=32, n_heads=4, n_layers=2, max_seq_len=64, **fields)
    return build_model(cfg).double()


def ids(b=4, t=24):
    return torch.randint(0, 50, (b, t), generator=torch.Generator().manual_seed(t))


def test_schedule_definitions():
    t = low_discrepancy_times(8, torch.Generator().manual_seed(3))
    gaps = (t.sort().values.diff())
    assert ((0 <= t) & (t < 1)).all() and torch.allclose(gaps, torch.full_like(gaps, 1 / 8))  # one point per 1/B stratum
    assert mask_probability(torch.tensor(0.0)) == pytest.approx(MASK_FLOOR) and mask_probability(torch.tensor(1.0)) == 1.0
    m = model()
    x0 = torch.randint(0, 50, (256, 200), generator=torch.Generator().manual_seed(0))
    noisy, masked, p = m.corrupt(x0, torch.Generator().manual_seed(1))
    assert torch.equal(noisy == m.mask_id, masked) and torch.equal(noisy[~masked], x0[~masked])
    assert (masked.float().mean(1) - p[:, 0]).abs().max() < 0.15  # each row masks a p share of its tokens
    assert abs(masked.float().mean().item() - p.mean().item()) < 0.01


def test_loss_is_the_one_over_p_weighted_masked_cross_entropy():
    m, x0 = model().eval(), ids()
    loss = m.loss(x0)
    from speedlm.models.diffusion import EVAL_SEED, _fingerprint

    noisy, masked, p = m.corrupt(x0, torch.Generator().manual_seed(EVAL_SEED + _fingerprint(x0)))  # evaluation's masks
    logits = m(noisy)
    ce = F.cross_entropy(logits.flatten(0, 1), x0.flatten(), reduction="none").view(x0.shape)
    expected = sum(ce[r, c] / p[r, 0] for r, c in masked.nonzero().tolist()) / x0.numel()
    assert loss.parts["lm"].item() == pytest.approx(float(expected), rel=1e-6)  # the loss takes its CE in float32
    assert m.loss(x0).parts["lm"] == loss.parts["lm"]  # evaluation is deterministic
    assert m.loss(ids(t=23)).parts["lm"] != m.loss(ids(t=23)[:, :22]).parts["lm"]  # each batch its own draw
    assert m.train().loss(x0).parts["lm"] != loss.parts["lm"]  # training draws fresh masks


def test_one_token_per_step_left_to_right_is_the_deterministic_reference():
    m, prompt = model(), ids(b=2, t=5)
    out = diffusion_generate(m, prompt, 12, steps=12, block=1)
    x = torch.cat([prompt, torch.full((2, 12), m.mask_id)], 1)
    with torch.no_grad():
        for i in range(12):  # the reference: unmask position 5 + i with the argmax, one per step
            x[:, 5 + i] = m(x)[:, 5 + i].argmax(-1)
    assert torch.equal(out.ids, x) and out.steps == 12


@pytest.mark.parametrize("opts", [dict(steps=4, block=None), dict(steps=8, block=4, remasking="random"),
                                  dict(steps=2, block=6, threshold=0.3), dict(steps=6, block=6, temperature=1.0, seed=3)])
def test_prompt_kept_and_nothing_left_masked(opts):
    m, prompt = model(), ids(b=3, t=7)
    out = diffusion_generate(m, prompt, 12, **opts)
    assert torch.equal(out.ids[:, :7], prompt)
    assert not (out.ids == m.mask_id).any() and out.ids.shape == (3, 19)
    assert out.tokens_per_step == 12 / out.steps


def test_bad_options_and_causal_only_mixers_are_refused():
    m = model()
    with pytest.raises(SpeedlmError, match="fewer than the 3 blocks"):
        diffusion_generate(m, ids(1, 4), 12, steps=2, block=4)
    with pytest.raises(SpeedlmError, match="longer than this model allows"):
        diffusion_generate(m, ids(1, 60), 12, steps=12)
    with pytest.raises(SpeedlmError, match="causal-only and cannot be used in an encoder or a diffusion LM"):
        model(layers={"A": {"mixer": {"name": "hgrn"}}})


def test_prefix_cache_is_exact_for_a_frozen_prefix_at_the_mixer_and_for_one_step_blocks():
    from speedlm.cache.prefix import PrefixCache
    from speedlm.layers.attention import Attention
    from speedlm.layers.dims import ModelDims
    from speedlm.layers.mixer import SeqMeta
    from speedlm.ops.metrics import rel_rms_error

    torch.manual_seed(0)
    att = Attention(ModelDims(d_model=32, n_heads=4), kv_heads=2).double()
    x = torch.randn(2, 30, 32, dtype=torch.float64)
    full = att(x, SeqMeta(causal=False))
    cache = PrefixCache()
    assert rel_rms_error(att(x, SeqMeta(causal=False), cache), full) < 1e-14  # recording attends as usual
    cache.keep_prefix(12)
    suffix = att(x[:, 12:], SeqMeta(start=12, causal=False), cache)  # the frozen prefix: keys of the same input
    assert rel_rms_error(suffix, full[:, 12:]) < 1e-12 and cache.length == 12
    with pytest.raises(SpeedlmError, match="takes no cache"):
        att(x, SeqMeta(causal=False), att.init_cache())  # only a prefix cache
    m, prompt = model(), ids(b=2, t=6)
    exact = diffusion_generate(m, prompt, 16, steps=4, block=4)  # one step per block: only the recorded pass
    assert torch.equal(diffusion_generate(m, prompt, 16, steps=4, block=4, prefix_cache=True).ids, exact.ids)
    approx = diffusion_generate(m, prompt, 16, steps=16, block=8, prefix_cache=True)
    assert torch.equal(approx.ids[:, :6], prompt) and not (approx.ids == m.mask_id).any() and approx.steps == 16
    with pytest.raises(SpeedlmError, match="--prefix-cache needs"):
        diffusion_generate(model(layers={"A": {"mixer": {"name": "linear_attention"}}}), prompt, 8, 8, prefix_cache=True)
