"""Declared state sizes of the data-dependent mixers and blocks (SepLLM, Mixture-of-Depths)
against what their caches hold after an input whose separators or routing the test controls:
the contract suite can only bound them by the full cache."""

import math

import torch

from speedlm.cache.sepllm import TYPICAL_SEPARATOR_RATE, SepLLMPolicy
from speedlm.layers.dims import ModelDims
from speedlm.layers.mixer import SeqMeta
from speedlm.layers.mod import MoDBlock
from speedlm.layers.sepllm import SepLLMAttention

DIMS = ModelDims(d_model=32, n_heads=4, max_seq_len=256, ffn_hidden=48, n_layers=2)
SPACE, LETTER = 32, 100  # a separator id and an ordinary one
KV_BYTES_PER_SLOT = 2 * 4 * 8 * 8  # keys and values, 4 heads of 8 channels, float64


@torch.no_grad()
def test_sepllm_cache_holds_initial_plus_separators_plus_window_minus_one_as_declared():
    """Prefill 211 tokens (initial 4, window 8): the next query needs positions 0-3, the
    separators among positions 4-203 and the last 7 (204-210); at 35% separators in between (the
    rate the declaration assumes), that is 4 + 70 + 7 = 81 slots, the declared count. Catches a
    policy that keeps the whole window (window, not window - 1), never compacts, or counts a
    separator twice when it is also initial or recent."""
    t, initial, window = 211, 4, 8
    ids = torch.full((2, t), LETTER)
    middle = torch.arange(4, 204)
    ids[:, middle[(middle - 4) % 20 < 7]] = SPACE  # 7 of every 20: 70 of the 200
    ids[:, [1, 206]] = SPACE  # separators that are also initial / recent: held once
    assert TYPICAL_SEPARATOR_RATE * 200 == 70
    torch.manual_seed(0)
    mixer = SepLLMAttention(DIMS, window=window, initial=initial, separators=[SPACE]).double()
    cache = mixer.init_cache()
    mixer(torch.randn(2, t, 32, dtype=torch.float64), SeqMeta(token_ids=ids), cache)
    assert cache.length == 4 + 70 + 7 == mixer.policy.retained(t)
    assert cache.nbytes() == 81 * 2 * KV_BYTES_PER_SLOT == mixer.state_bytes(t, batch_size=2, bytes_per_elem=8)
    # at another rate the cache follows the same formula at the input's own rate ...
    ids[:, middle[(middle - 4) % 20 >= 15]] = SPACE  # 12 of every 20
    cache = mixer.init_cache()
    mixer(torch.randn(2, t, 32, dtype=torch.float64), SeqMeta(token_ids=ids), cache)
    assert cache.length == 4 + 120 + 7
    # ... once more than stale_slots() = 64 slots are stale: at 14 of every 20, 151 are needed and
    # all 211 stay (60 stale), above any estimate of what the queries need
    ids[:, middle[(middle - 4) % 20 == 13]] = SPACE
    ids[:, middle[(middle - 4) % 20 == 14]] = SPACE
    cache = mixer.init_cache()
    mixer(torch.randn(2, t, 32, dtype=torch.float64), SeqMeta(token_ids=ids), cache)
    assert cache.length == t == (4 + 140 + 7) + 60 and 60 <= mixer.policy.stale_slots()


@torch.no_grad()
def test_sepllm_streaming_cache_peaks_at_its_declared_cap_and_keeps_every_separator_it_may():
    """Streaming (cap 24, separator cache 6, every third token a separator), token by token: the
    25th token compresses to positions 0-3, the 4 older separators 6, 9, 12, 15 (fewer than 6:
    all stay) and 18-24; later compressions to 4 + 6 + 7 = 17; never above the declared
    min(T, cap) = 24. Catches the negative slice that kept only the newest 6 - 4 = 2 of 4
    separators, and a compression that overshoots the cap."""
    policy = SepLLMPolicy((SPACE,), initial=4, window=8, separator_cache=6, cap=24, shift_positions=True)
    torch.manual_seed(0)
    mixer = SepLLMAttention(DIMS, window=8, initial=4, separators=[SPACE]).double()
    ids = torch.where(torch.arange(90) % 3 == 0, SPACE, LETTER)[None]
    x = torch.randn(1, 90, 32, dtype=torch.float64)
    cache, lengths = mixer.init_cache(policy), []
    for i in range(90):
        mixer(x[:, i : i + 1], SeqMeta(start=i, token_ids=ids[:, i : i + 1]), cache)
        lengths.append(cache.length)
        if i == 24:
            assert cache.positions()[0].tolist() == [0, 1, 2, 3, 6, 9, 12, 15, *range(18, 25)]
    assert lengths[:25] == [*range(1, 25), 15]
    assert max(lengths) == policy.retained(90) == 24 and min(lengths[36:]) == 4 + 6 + 7
    assert cache.nbytes() <= policy.retained(90) * KV_BYTES_PER_SLOT


def _mod_routing(route, capacity):
    """A MoD attention block whose causal rule routes exactly the tokens where `route` (B, T) is
    True: the router reads channel 0 alone, and x's channel 0 is +1 there, -1 elsewhere."""
    torch.manual_seed(0)
    blk = MoDBlock(DIMS, {"name": "attention"}, {"name": "swiglu"}, capacity=capacity).double().eval()
    blk.router.weight.zero_()
    blk.router.weight[0, 0] = 10.0
    x = torch.randn(*route.shape, 32, dtype=torch.float64)
    x[..., 0] = torch.where(route, 1.0, -1.0)
    return blk, x


@torch.no_grad()
def test_mod_routed_cache_holds_the_inner_state_at_the_routed_count():
    """Rows routing 3 and 11 of 40 tokens: the inner KV caches hold 3 and 11 slots, the inner
    block's declared state at those counts. Catches a cache that keeps unrouted tokens or a
    state_bytes that counts the whole context."""
    route = torch.zeros(2, 40, dtype=torch.bool)
    route[0, [2, 17, 39]] = True
    route[1, torch.arange(0, 33, 3)] = True
    assert route.sum(-1).tolist() == [3, 11]
    blk, x = _mod_routing(route, capacity=0.25)
    cache = blk.init_cache()
    blk(x[:, :25], SeqMeta(0), cache)
    for i in range(25, 40):
        blk(x[:, i : i + 1], SeqMeta(i), cache)
    assert cache.counts == [3, 11]
    assert cache.nbytes() == (3 + 11) * KV_BYTES_PER_SLOT == sum(blk.inner.state_bytes(n, 1, 8) for n in (3, 11))


@torch.no_grad()
def test_mod_declared_state_is_the_cache_when_exactly_capacity_times_t_tokens_route():
    """Capacity 0.25 at T = 40: when each row routes exactly 10 tokens, MoDBlock.state_bytes(40)
    is what the cache holds. Catches a declaration at the full context or at floor(capacity T)."""
    route = torch.zeros(2, 40, dtype=torch.bool)
    route[0, :10] = True
    route[1, torch.arange(1, 40, 4)] = True
    blk, x = _mod_routing(route, capacity=0.25)
    assert math.ceil(0.25 * 40) == 10 and route.sum(-1).tolist() == [10, 10]
    cache = blk.init_cache()
    blk(x, SeqMeta(0), cache)
    assert cache.nbytes() == 2 * 10 * KV_BYTES_PER_SLOT == blk.state_bytes(40, batch_size=2, bytes_per_elem=8)
