"""The token buffer behind KV caches and convolution states: bounded for windows, amortised
growth for full attention, correct in inference (buffered) and under autograd (concatenated),
slot positions, non-suffix selections, and keys stored before RoPE."""

import pytest
import torch

from speedlm.cache import CompositeCache, FullPolicy, KVCache, RecurrentState, TokenBuffer, WindowPolicy
from speedlm.cache.sepllm import SepLLMPolicy
from speedlm.layers.attention import Attention
from speedlm.layers.dims import ModelDims
from speedlm.layers.mixer import SeqMeta
from speedlm.layers.rope import apply_rope, rope_for
from speedlm.layers.short_conv import ShortConv
from speedlm.ops.attention import attention_reference
from speedlm.ops.conv import causal_conv1d, causal_conv1d_reference
from speedlm.ops.metrics import rel_rms_error
from support.parts import PreRopeSinkWindow, SinkWindowPolicy


def _kv(t):
    return torch.randn(1, 2, t, 4), torch.randn(1, 2, t, 4)


@torch.no_grad()
def test_window_cache_stays_bounded_after_long_prefill_and_decoding():
    cache = KVCache(WindowPolicy(32))
    k, v = _kv(1000)
    k_all, _, pos, _ = cache.extend(k, v, 0)
    assert torch.equal(k_all, k) and pos == 0  # the prefill sees all of its own keys
    assert torch.equal(cache.k, k[:, :, -31:]) and cache.positions() == 1000 - 31
    history = [k]
    for i in range(500):
        k1, v1 = _kv(1)
        history.append(k1)
        k_all, _, pos, _ = cache.extend(k1, v1, 1000 + i)
        assert k_all.shape[2] == 32 and pos == 1000 + i - 31  # slot positions stay contiguous ints
        assert cache.allocated_bytes() <= 2 * 2 * 2 * 64 * 4 * 4  # k and v, 2 heads, <= 2 x 64 rows
    assert torch.equal(cache.k, torch.cat(history, 2)[:, :, -31:])


@torch.no_grad()
def test_full_cache_grows_geometrically_and_keeps_everything():
    cache = KVCache(FullPolicy())
    keys = []
    for _ in range(2000):
        k1, v1 = _kv(1)
        keys.append(k1)
        cache.extend(k1, v1)
    assert torch.equal(cache.k, torch.cat(keys, 2))
    assert cache.reallocations <= 7  # 64, 128, ..., 4096: O(log T), not one per token
    assert cache.nbytes() == 2 * 2000 * 2 * 4 * 4


@torch.no_grad()
def test_views_handed_out_earlier_stay_valid():
    for policy in (FullPolicy(), WindowPolicy(4), SepLLMPolicy((1,), initial=1, window=4)):
        cache = KVCache(policy)
        k, v = _kv(3)
        first, _, _, _ = cache.extend(k, v, marks=torch.zeros(1, 3, dtype=torch.bool) if policy.marks_keys else None)
        snapshot = first.clone()
        for i in range(200):
            cache.extend(*_kv(1), marks=torch.tensor([[i % 3 == 0]]) if policy.marks_keys else None)
        assert torch.equal(first, snapshot)


@torch.no_grad()
def test_a_sink_cache_moves_its_sinks_in_place_and_its_views_last_until_the_next_call():
    """Sinks + window keep a head and a suffix: the sinks move forward over each evicted slot
    (O(sinks) per token) rather than the cache compacting itself per token; the move happens at
    the next call, so what a call reads is intact while it runs."""
    cache = KVCache(SinkWindowPolicy(sinks=2, window=100))
    keys = []
    for i in range(1000):
        k1, v1 = _kv(1)
        keys.append(k1)
        k_all, _, pos, _ = cache.extend(k1, v1, i)
        expected = [j for j in range(i + 1) if j < 2 or j > i - 100]  # what this call reads
        assert torch.equal(k_all, torch.cat([keys[j] for j in expected], 2))
    assert cache.reallocations <= 12  # amortised, like the window: not one per token
    assert cache.length == 2 + 99 and cache.nbytes() == 2 * 101 * 2 * 4 * 4
    assert torch.equal(cache.positions(), torch.tensor([[0, 1, *range(901, 1000)]]))


@torch.no_grad()
def test_non_suffix_policy_keeps_the_selected_slots_with_their_positions():
    cache = KVCache(SinkWindowPolicy(sinks=2, window=4))
    keys = []
    for i in range(10):
        k1, v1 = _kv(1)
        keys.append(k1)
        cache.extend(k1, v1, i)
    kept = [0, 1, 7, 8, 9]
    assert torch.equal(cache.k, torch.cat([keys[i] for i in kept], 2))
    assert torch.equal(cache.positions(), torch.tensor([kept]))


@torch.no_grad()
def test_explicit_per_row_positions_are_stored_per_row():
    cache = KVCache(FullPolicy())
    k, v = torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4)
    cache.extend(k, v, torch.tensor([[0, 1, 2], [10, 11, 12]]))
    _, _, pos, _ = cache.extend(k[:, :, :1], v[:, :, :1], torch.tensor([[3], [13]]))
    assert torch.equal(pos, torch.tensor([[0, 1, 2, 3], [10, 11, 12, 13]]))


def test_chunked_forward_with_gradients_matches_full_forward():
    """Under autograd the cache concatenates, so gradients flow through cached keys."""
    torch.manual_seed(0)
    attn = Attention(ModelDims(32, 4), kv_heads=2).double()
    x = torch.randn(2, 40, 32, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 40, 32, dtype=torch.float64)
    full = torch.autograd.grad((attn(x, SeqMeta()) * g).sum(), x)[0]
    cache = attn.init_cache()
    y = torch.cat([attn(x[:, :17], SeqMeta(0), cache), attn(x[:, 17:], SeqMeta(17), cache)], 1)
    chunked = torch.autograd.grad((y * g).sum(), x)[0]
    assert rel_rms_error(chunked, full) < 1e-12


@torch.no_grad()
def test_pre_rope_keys_are_rotated_by_their_cache_slot_after_eviction():
    """Attention sinks with shifted positions: once tokens are evicted, every retained key is
    rotated at its slot in the cache and the query at the next slot; computed here from scratch
    from the unrotated keys the cache holds."""
    torch.manual_seed(0)
    dims = ModelDims(32, 4)
    attn = Attention(dims).double()
    policy = PreRopeSinkWindow(sinks=2, window=5)
    cache = attn.init_cache(policy)
    x = torch.randn(1, 30, 32, dtype=torch.float64)
    for i in range(29):
        attn(x[:, i : i + 1], SeqMeta(i), cache)
    y = attn(x[:, 29:], SeqMeta(29), cache)

    kept = [0, 1, 25, 26, 27, 28, 29]  # sinks + window - 1 before this query, then the query
    q, k, v = attn.project(x[:, kept])
    n = len(kept)
    cos, sin = rope_for(0, n, dims.head_dim, dims.rope_theta, "cpu")
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    expected = attn.output(attention_reference(q[:, :, -1:], k, v, None))
    assert rel_rms_error(y, expected) < 1e-12
    assert cache.length == 6 and torch.equal(cache.positions(), torch.tensor([[0, 1, 26, 27, 28, 29]]))
    # and the positions fed to RoPE never exceed the cache size, however long the stream
    assert cache.length < 30


@torch.no_grad()
def test_conv_state_and_long_conv_inputs_use_the_same_buffer():
    """A short convolution keeps the last kernel - 1 inputs (window policy); token-by-token it
    equals the full convolution, and its buffer never grows."""
    torch.manual_seed(0)
    conv = ShortConv(8, kernel=4).double()
    x = torch.randn(2, 50, 8, dtype=torch.float64)
    cache = conv.init_cache()
    assert isinstance(cache, TokenBuffer)
    y = torch.cat([conv(x[:, :7], cache)] + [conv(x[:, i : i + 1], cache) for i in range(7, 50)], 1)
    assert rel_rms_error(y, conv(x)) < 1e-12
    assert torch.equal(cache.entries()[0], x[:, -3:])
    assert cache.nbytes() == conv.state_bytes(50, 2, 8) and cache.allocated_bytes() <= 2 * 64 * 8 * 8


@pytest.mark.parametrize("taps", [1, 2, 5, 12])  # shifted multiply-adds up to 8 taps, F.conv1d beyond
def test_causal_conv1d_matches_the_naive_sum_with_history(taps):
    torch.manual_seed(0)
    x = torch.randn(2, 37, 6, dtype=torch.float64)
    w, b = torch.randn(6, taps, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    assert rel_rms_error(causal_conv1d(x, w, b), causal_conv1d_reference(x, w, b)) < 1e-12
    assert rel_rms_error(causal_conv1d(x, w), causal_conv1d_reference(x, w)) < 1e-12
    for h in (1, 2, 4, 9, 15):  # shorter and longer than kernel - 1
        hist = torch.randn(2, h, 6, dtype=torch.float64)
        full = causal_conv1d_reference(torch.cat([hist, x], 1), w, b)[:, h:]
        assert rel_rms_error(causal_conv1d(x, w, b, hist), full) < 1e-12


def test_composite_cache_sums_and_detaches_its_parts():
    kv, rec = KVCache(), RecurrentState()
    kv.extend(*[t.requires_grad_() for t in _kv(5)])
    rec.state = (torch.ones(3, requires_grad=True) * 2,)
    c = CompositeCache(kv=kv, state=rec)
    assert c.nbytes() == kv.nbytes() + rec.nbytes() == 2 * 2 * 5 * 4 * 4 + 3 * 4
    c.detach()
    assert not any(t.requires_grad for t in c.tensors())
