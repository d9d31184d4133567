"""H2O and SnapKV (cache/scored.py) against token-by-token simulations written from the papers'
rules in float64 (per-head kept sets, accumulated or observed attention), and through a model:
a budget that never binds decodes exactly as the full forward; bad sizes are one-line errors."""

import pytest
import torch
import torch.nn.functional as F

from speedlm.cache.policies import make_policy
from speedlm.cache.scored import H2OPolicy, ScoredKVCache, SnapKVPolicy
from speedlm.errors import SpeedlmError
from speedlm.models import build_model
from speedlm.models.presets import preset_config
from speedlm.ops.metrics import rel_rms_error

B, H, HKV, D, T = 2, 4, 2, 8, 60
SCALE = D**-0.5


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, T, D, dtype=torch.float64, generator=g) * 2,
            torch.randn(B, HKV, T, D, dtype=torch.float64, generator=g),
            torch.randn(B, HKV, T, D, dtype=torch.float64, generator=g))


def _weights(qt, keys):
    """qt (G, D) queries of one KV group over keys (n, D): softmax weights (G, n)."""
    return torch.softmax(qt @ keys.T * SCALE, dim=-1)


def _decode(policy, q, k, v):
    cache = ScoredKVCache(policy)
    return torch.cat([cache.attend(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], SCALE)
                      for t in range(T)], dim=2)


def test_h2o_keeps_the_recent_keys_and_the_heaviest_by_accumulated_attention():
    heavy, recent = 6, 5
    q, k, v = _inputs()
    out = _decode(H2OPolicy(heavy, recent), q, k, v)
    g = H // HKV
    for b in range(B):
        for kv in range(HKV):
            kept, acc = [], {}
            for t in range(T):
                kept.append(t)
                acc[t] = 0.0
                w = _weights(q[b, kv * g : (kv + 1) * g, t], k[b, kv, kept])
                expected = w @ v[b, kv, kept]
                assert torch.allclose(out[b, kv * g : (kv + 1) * g, t], expected, atol=1e-12)
                for j, key in enumerate(kept):
                    acc[key] += float(w[:, j].sum())
                if len(kept) > heavy + recent:
                    older = kept[:-recent]
                    best = sorted(sorted(older, key=lambda j: -acc[j])[:heavy])
                    kept = best + kept[-recent:]


def test_snapkv_keeps_the_window_and_the_keys_its_queries_vote_for():
    budget, observe, kernel = 12, 4, 3
    q, k, v = _inputs(1)
    out = _decode(SnapKVPolicy(budget, observe, kernel), q, k, v)
    g = H // HKV
    for b in range(B):
        for kv in range(HKV):
            kept = []
            for t in range(T):
                kept.append(t)
                w = _weights(q[b, kv * g : (kv + 1) * g, t], k[b, kv, kept])
                assert torch.allclose(out[b, kv * g : (kv + 1) * g, t], w @ v[b, kv, kept], atol=1e-12)
                if len(kept) >= budget + observe:
                    window, older = kept[-observe:], kept[:-observe]
                    votes = torch.zeros(len(older), dtype=torch.float64)
                    for i in window:  # each observed query votes over the keys before it
                        visible = [j for j in kept if j <= i]
                        wi = _weights(q[b, kv * g : (kv + 1) * g, i], k[b, kv, visible]).sum(0)
                        votes += wi[: len(older)]
                    pooled = F.avg_pool1d(votes[None, None], kernel, 1, kernel // 2, count_include_pad=False)[0, 0]
                    best = sorted(pooled.topk(budget - observe).indices.tolist())
                    kept = [older[j] for j in best] + window


@pytest.mark.parametrize("name,sizes", [("h2o", {"window": 100}), ("snapkv", {"window": 60, "observe": 8}),
                                        ("kivi", {"bits": 4, "residual": 200})])
def test_a_budget_that_never_binds_decodes_as_the_full_forward(name, sizes):
    torch.manual_seed(0)
    model = build_model(preset_config("gqa-tiny")).double()
    x = torch.randint(0, 256, (2, 50))
    cache = model.init_cache(make_policy(name, **sizes))
    decoded = torch.cat([model(x[:, i : i + 1], cache) for i in range(50)], dim=1)
    assert rel_rms_error(decoded, model(x)) < 1e-10


@pytest.mark.parametrize("name,sizes,message", [
    ("snapkv", {"window": 17}, "budget \\(32\\) must exceed the observation window"),
    ("snapkv", {"window": 40, "observe": 8, "budget": 8}, "budget \\(8\\) must exceed"),
    ("h2o", {"window": 17, "heavy": -1}, "--heavy must be >= 0"),
    ("kivi", {"bits": 3}, "3-bit codes are not supported"),
])
def test_bad_sizes_are_one_line_errors(name, sizes, message):
    with pytest.raises(SpeedlmError, match=message):
        make_policy(name, **sizes)


def test_a_sparse_pattern_refuses_score_eviction():
    model = build_model(preset_config("sliding-window-tiny"))
    with pytest.raises(SpeedlmError, match="H2OPolicy evicts by full attention's weights"):
        model.init_cache(make_policy("h2o", window=16))
