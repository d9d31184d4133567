import pytest
import torch

from speedlm.errors import SpeedlmError
from speedlm.generate import generate, sample_next
from speedlm.models import presets_for, build_model


@pytest.mark.parametrize("preset", presets_for("ar"))
def test_cached_greedy_generation_gives_exactly_the_uncached_tokens(preset):
    torch.manual_seed(3)
    m = build_model(preset)
    # sharpen the random model so greedy choices are not near-ties
    with torch.no_grad():
        m.embed.weight.mul_(20)
    prompt = torch.randint(0, 256, (2, 45))  # longer than the tiny window (32)
    cached = generate(m, prompt, 30, use_cache=True)
    uncached = generate(m, prompt, 30, use_cache=False)
    assert torch.equal(cached.ids, uncached.ids)
    assert cached.ids.shape == (2, 75)
    if any(b.data_dependent_state for b in m.blocks):  # SepLLM, MoD: what it keeps depends on the tokens
        assert 0 < cached.cache_bytes <= build_model("transformer").state_bytes(74, batch_size=2, bytes_per_elem=4)
    else:
        assert cached.cache_bytes == m.state_bytes(74, batch_size=2, bytes_per_elem=4)


def test_top_k_one_is_greedy_and_top_p_keeps_the_nucleus():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9]])
    g = torch.Generator().manual_seed(0)
    assert all(sample_next(logits, 1.0, top_k=1, generator=g).item() == 1 for _ in range(20))
    # p(1) ~ 0.48, p(3) ~ 0.44: top_p=0.5 keeps exactly {1, 3}
    picks = {sample_next(logits, 1.0, top_p=0.5, generator=g).item() for _ in range(200)}
    assert picks == {1, 3}
    assert sample_next(logits, 0.0).item() == 1


def test_seeded_sampling_is_reproducible():
    m = build_model("transformer")
    p = torch.randint(0, 256, (1, 8))
    a = generate(m, p, 10, temperature=1.0, top_k=50, seed=7).ids
    b = generate(m, p, 10, temperature=1.0, top_k=50, seed=7).ids
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs,needle",
    [(dict(temperature=-1.0), "temperature"), (dict(top_k=0), "top_k"), (dict(top_p=1.5), "top_p")],
)
def test_bad_sampling_options(kwargs, needle):
    with pytest.raises(SpeedlmError, match=needle):
        generate(build_model("transformer"), torch.zeros(1, 3, dtype=torch.long), 2, **kwargs)


def test_too_many_new_tokens():
    with pytest.raises(SpeedlmError, match="exceeds the model's max_seq_len"):
        generate(build_model("transformer", max_seq_len=20), torch.zeros(1, 15, dtype=torch.long), 10)


def test_an_empty_prompt_or_no_new_tokens_is_a_user_error():
    m = build_model("transformer")
    with pytest.raises(SpeedlmError, match="at least one token"):
        generate(m, torch.zeros(1, 0, dtype=torch.long), 5)
    with pytest.raises(SpeedlmError, match="at least 1"):
        generate(m, torch.zeros(1, 3, dtype=torch.long), 0)


@torch.no_grad()
def test_a_bounded_kv_policy_lets_full_attention_generate_past_max_seq_len():
    """Training-free streaming caches on a full-attention model: attention sinks (shifted
    positions) and a window (original positions) keep the cache bounded and lift the length
    limit; the model's own full cache keeps it."""
    from speedlm.cache.kv import SinkPolicy
    from speedlm.cache.policies import make_policy

    torch.manual_seed(0)
    m = build_model("transformer-tiny", max_seq_len=64)
    prompt = torch.randint(0, 256, (1, 20))
    with pytest.raises(SpeedlmError, match="max_seq_len=64"):
        generate(m, prompt, 80)
    for name in ("sink", "window"):
        policy = make_policy(name, window=16, sinks=4)
        out = generate(m, prompt, 80, kv_policy=policy)
        assert out.ids.shape == (1, 100)
        kept = policy.retained(100)
        assert kept == (19 if name == "sink" else 15)
        # every layer's K and V for the kept slots, float32: bounded, whatever the length
        assert out.cache_bytes == 2 * m.config.n_layers * kept * m.config.d_model * 4
    assert isinstance(make_policy("sink"), SinkPolicy) and make_policy("full") is None
    with pytest.raises(SpeedlmError, match="unknown attention policy"):
        make_policy("sparse")
    with pytest.raises(SpeedlmError, match="needs the cache"):
        generate(m, prompt, 5, use_cache=False, kv_policy=make_policy("sink", window=16))
