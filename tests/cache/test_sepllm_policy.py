"""SepLLM's KV policy: the streaming cache's eviction invariants (initial tokens never evicted,
the separator cache FIFO, the size within its bounds), keys stored before RoPE rotated by
their slot, the separator rate its memory estimate assumes, and its one-line errors."""

import pytest
import torch

from speedlm.cache import KVCache
from speedlm.cache.policies import make_policy
from speedlm.cache.sepllm import TYPICAL_SEPARATOR_RATE, SepLLMPolicy
from speedlm.errors import SpeedlmError
from speedlm.layers.attention import Attention
from speedlm.layers.dims import ModelDims
from speedlm.layers.mixer import SeqMeta
from speedlm.layers.rope import apply_rope, rope_for
from speedlm.ops.attention import attention_reference
from speedlm.ops.metrics import rel_rms_error

SEPARATORS = tuple(range(16))  # a quarter of a 64-token vocabulary


def _stream(policy, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (1, n), generator=g)


@torch.no_grad()
def test_streaming_eviction_keeps_initial_tokens_a_fifo_separator_cache_and_the_size_bounds():
    a, s, w, c = 3, 6, 8, 24
    policy = SepLLMPolicy(SEPARATORS, initial=a, window=w, separator_cache=s, cap=c, shift_positions=True)
    cache = KVCache(policy)
    ids = _stream(policy, 400)
    is_sep = torch.isin(ids[0], torch.tensor(SEPARATORS))
    last_len, compressions = 0, 0
    for i in range(ids.shape[1]):
        k = torch.full((1, 1, 1, 2), float(i))  # the key remembers its position
        cache.extend(k, k, i, policy.mark(ids[:, i : i + 1], i, 1, "cpu"))
        kept = cache.k[0, 0, :, 0].long()
        pos = cache.positions()
        pos = torch.arange(pos, pos + cache.length) if isinstance(pos, int) else pos[0]
        assert torch.equal(kept, pos)  # slots in order, with their positions
        n = kept.numel()
        assert n <= c
        assert kept[: min(a, i + 1)].tolist() == list(range(min(a, i + 1)))  # initial tokens stay
        if n < last_len:  # a compression just happened
            compressions += 1
            assert n <= a + s + w - 1
            assert kept[-(w - 1) :].tolist() == list(range(i - w + 2, i + 1))  # the local window
        # outside the initial tokens and the tokens since the last compression only separators
        # remain, the newest ones (FIFO): no separator newer than a kept one was dropped
        old = [p for p in kept.tolist() if p >= a and is_sep[p]]
        dropped = [p for p in range(a, i + 1) if is_sep[p] and p not in set(kept.tolist())]
        assert not old or not dropped or max(dropped) < min(old)
        last_len = n
    assert compressions > 10


@torch.no_grad()
def test_training_free_cache_keeps_initial_separators_and_window_evicting_in_batches():
    policy = SepLLMPolicy(SEPARATORS, initial=2, window=5)
    cache = KVCache(policy)
    ids = _stream(policy, 400, seed=3)
    is_sep = torch.isin(ids[0], torch.tensor(SEPARATORS))
    k = torch.arange(200.0).view(1, 1, 200, 1)
    cache.extend(k, k, 0, policy.mark(ids[:, :200], 0, 200, "cpu"))  # a prefill: compacted at once
    assert cache.positions()[0].tolist() == [p for p in range(200) if p < 2 or is_sep[p] or p >= 196]
    compactions = 0
    for i in range(200, 400):  # decoding: stale slots wait for a batched eviction
        before = cache.length
        cache.extend(torch.full((1, 1, 1, 1), float(i)), torch.zeros(1, 1, 1, 1), i, policy.mark(ids[:, i : i + 1], i, 1, "cpu"))
        compactions += cache.length < before
        held = cache.positions()
        held = list(range(held, held + cache.length)) if isinstance(held, int) else held[0].tolist()
        needed = [p for p in range(i + 1) if p < 2 or is_sep[p] or p > i - 4]
        assert set(needed) <= set(held) and len(held) - len(needed) <= policy.stale_slots()
    assert compactions >= 2
    assert not policy.bounded and not policy.pre_rope


@torch.no_grad()
def test_streaming_keys_are_rotated_by_their_slot_after_compression():
    torch.manual_seed(0)
    dims = ModelDims(32, 4)
    attn = Attention(dims).double()
    policy = SepLLMPolicy(SEPARATORS, initial=2, window=4, separator_cache=3, cap=12, shift_positions=True)
    cache = attn.init_cache(policy)
    ids = _stream(policy, 60, seed=5)
    x = torch.randn(1, 60, 32, dtype=torch.float64)
    for i in range(59):
        attn(x[:, i : i + 1], SeqMeta(i, token_ids=ids[:, i : i + 1]), cache)
    kept = cache.positions()[0].tolist()
    y = attn(x[:, 59:], SeqMeta(59, token_ids=ids[:, 59:]), cache)
    assert len(kept) <= 12 and 59 not in kept
    rows = kept + [59]
    q, k, v = attn.project(x[:, rows])
    cos, sin = rope_for(0, len(rows), dims.head_dim, dims.rope_theta, "cpu")
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    expected = attn.output(attention_reference(q[:, :, -1:], k, v, None))  # every cached key is seen
    assert rel_rms_error(y, expected) < 1e-12


def test_the_memory_estimate_uses_the_default_corpus_separator_rate():
    import numpy as np

    from speedlm.data import encode_split, load_corpus, make_tokenizer
    from speedlm.data.separators import separator_ids

    corpus = load_corpus("stdlib")
    tok = make_tokenizer("byte", corpus, None)
    ids = np.asarray(encode_split(corpus, tok, "val"))
    rate = float(np.isin(ids, separator_ids(tok)).mean())
    assert abs(rate - TYPICAL_SEPARATOR_RATE) < 0.02, rate
    policy = SepLLMPolicy(SEPARATORS, initial=4, window=64)
    assert policy.retained(10) == 10 and policy.retained(67) == 67
    assert policy.retained(10_067) == 67 + round(TYPICAL_SEPARATOR_RATE * 10_000)


def test_bad_settings_and_missing_token_ids_are_one_line_errors():
    with pytest.raises(SpeedlmError, match="cap must be at least"):
        SepLLMPolicy(SEPARATORS, initial=4, window=64, separator_cache=64, cap=100)
    with pytest.raises(SpeedlmError, match="both a cap and a separator cache"):
        SepLLMPolicy(SEPARATORS, separator_cache=8)
    with pytest.raises(SpeedlmError, match="at least one separator"):
        SepLLMPolicy(())
    with pytest.raises(SpeedlmError, match="needs separator ids"):
        make_policy("sepllm")
    attn = Attention(ModelDims(32, 4))
    with pytest.raises(SpeedlmError, match="token ids"):
        attn(torch.randn(1, 3, 32), SeqMeta(), attn.init_cache(make_policy("sepllm", 8, separators=[1])))
    streaming = make_policy("sepllm", window=16, sinks=4, separators=[1, 2], cap=100)
    assert streaming.bounded and streaming.pre_rope and streaming.separator_cache == 64


@pytest.mark.parametrize(
    "policy",
    [SepLLMPolicy(SEPARATORS, initial=3, window=6), make_policy("sink", window=6, sinks=3), make_policy("window", 6)],
    ids=["sepllm", "sink", "window"],
)
def test_keys_seen_counts_what_the_mask_lets_each_query_see(policy):
    ids = _stream(policy, 70, seed=9).expand(2, -1).clone()
    ids[1] = _stream(policy, 70, seed=10)
    pos = torch.arange(70)
    marks = policy.mark(ids, 0, 70, "cpu")
    visible = policy.visible(pos[None, :, None], pos[None, None, :], None if marks is None else marks[:, None, :])
    causal = pos[None, :] <= pos[:, None]
    assert torch.equal(policy.keys_seen(ids), (visible & causal).sum(-1).expand(2, -1))


def test_a_capped_cache_keeps_every_older_separator_when_it_has_fewer_than_its_separator_cache():
    """The review's reproduction: 2 older separators and room for 3 kept only one of them (the
    slice start went negative)."""
    p = SepLLMPolicy((9,), initial=1, window=3, separator_cache=3, cap=8)
    kept = p.keep(9, 0, p.mark(torch.tensor([[0, 1, 9, 1, 9, 1, 1, 1, 1]]), 0, 9, None))
    assert kept.tolist() == [0, 2, 4, 7, 8]
