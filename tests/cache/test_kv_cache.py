"""KV cache storage: bounded for windows, amortised growth for full attention, and correct
both in inference (buffered) and under autograd (concatenated)."""

import torch

from speedlm.cache.kv import FullPolicy, KVCache, WindowPolicy
from speedlm.layers.attention import Attention
from speedlm.layers.dims import ModelDims
from speedlm.layers.mixer import SeqMeta
from speedlm.ops.metrics import rel_rms_error


def _kv(t):
    return torch.randn(1, 2, t, 4), torch.randn(1, 2, t, 4)


@torch.no_grad()
def test_window_cache_stays_bounded_after_long_prefill_and_decoding():
    cache = KVCache(WindowPolicy(32))
    k, v = _kv(1000)
    k_all, _ = cache.extend(k, v)
    assert torch.equal(k_all, k)  # the prefill sees all of its own keys
    assert torch.equal(cache.k, k[:, :, -31:])
    history = [k]
    for _ in range(500):
        k1, v1 = _kv(1)
        history.append(k1)
        k_all, _ = cache.extend(k1, v1)
        assert k_all.shape[2] == 32
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
    cache = KVCache(WindowPolicy(4))
    k, v = _kv(3)
    first, _ = cache.extend(k, v)
    snapshot = first.clone()
    for _ in range(200):
        cache.extend(*_kv(1))
    assert torch.equal(first, snapshot)


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
