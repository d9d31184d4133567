"""The mixer contract (DESIGN.md), run over every registered mixer.

A mixer is covered the moment it is registered: its `contract_spec` gives options small enough
for the mechanism to matter at these lengths (e.g. a window shorter than the sequence).
"""

import random

import pytest
import torch

from speedlm.layers.dims import ModelDims
from speedlm.layers.mixer import SeqMeta
from speedlm.models.registry import MIXERS
from speedlm.ops.metrics import rel_rms_error

DIMS = ModelDims(d_model=32, n_heads=4)
LENGTHS = [37, 75]  # deliberately not multiples of chunk or block sizes
CAUSAL = [name for name, e in MIXERS.items() if e.cls.supports_causal]
DECODING = [name for name in CAUSAL if MIXERS[name].cls.supports_decoding]


def make(name, dtype=torch.float64):
    torch.manual_seed(1)
    entry = MIXERS[name]
    return entry.cls(DIMS, **entry.contract_spec).to(dtype)


def x_of(t, dtype=torch.float64, b=2):
    return torch.randn(b, t, DIMS.d_model, dtype=dtype, generator=torch.Generator().manual_seed(t))


def run_in_pieces(mixer, x, cuts):
    """Feed x through one cache in pieces [0:c1], [c1:c2], ...; return the concatenated output."""
    cache, outs, start = mixer.init_cache(), [], 0
    for end in list(cuts) + [x.shape[1]]:
        outs.append(mixer(x[:, start:end], SeqMeta(start=start), cache))
        start = end
    return torch.cat(outs, dim=1), cache


@pytest.mark.parametrize("name", CAUSAL)
def test_causality(name):
    mixer, x = make(name), x_of(53)
    s = 29
    x2 = x.clone()
    x2[:, s] += torch.randn_like(x2[:, s])
    y, y2 = mixer(x, SeqMeta()), mixer(x2, SeqMeta())
    assert torch.equal(y[:, :s], y2[:, :s]) or rel_rms_error(y2[:, :s], y[:, :s]) < 1e-14
    assert rel_rms_error(y2[:, s:], y[:, s:]) > 1e-6  # the change is visible from s on


@pytest.mark.parametrize("name", DECODING)
@pytest.mark.parametrize("t", LENGTHS)
@torch.no_grad()  # the inference path (buffered caches); state chaining below runs under autograd
def test_cache_equivalence_full_chunked_tokenwise(name, t):
    mixer, x = make(name), x_of(t)
    full = mixer(x, SeqMeta())
    rng = random.Random(t)
    for _ in range(3):
        cuts = sorted(rng.sample(range(1, t), 3))
        chunked, _ = run_in_pieces(mixer, x, cuts)
        assert rel_rms_error(chunked, full) < 1e-12, cuts
    tokenwise, _ = run_in_pieces(mixer, x, range(1, t))
    assert rel_rms_error(tokenwise, full) < 1e-12


@pytest.mark.parametrize("name", CAUSAL)
@pytest.mark.parametrize("t", LENGTHS)
def test_reference_equivalence_float64_and_float32(name, t):
    mixer = make(name)
    x = x_of(t)
    ref = mixer.reference(x, SeqMeta())
    assert rel_rms_error(mixer(x, SeqMeta()), ref) < 1e-12
    mixer32 = make(name, torch.float32)
    assert rel_rms_error(mixer32(x.float(), SeqMeta()), ref) < 1e-5


@pytest.mark.parametrize("name", DECODING)
def test_state_chaining_and_declared_state_size(name):
    """Under autograd (parameters require grad), so the cache's training path is exercised."""
    mixer, x = make(name), x_of(75)
    whole = mixer(x, SeqMeta())
    halves, cache = run_in_pieces(mixer, x, [40])
    assert rel_rms_error(halves, whole) < 1e-12
    # the cache holds exactly what the mixer promises (O(T), O(window) or O(1))
    assert cache.nbytes() == mixer.state_bytes(75, batch_size=2, bytes_per_elem=8)


@pytest.mark.parametrize("name", CAUSAL)
def test_gradients_finite_and_equal_to_reference(name):
    mixer = make(name)
    x = x_of(45).requires_grad_(True)
    g = torch.randn(2, 45, DIMS.d_model, dtype=torch.float64)
    params = [p for p in mixer.parameters()]
    fast = torch.autograd.grad((mixer(x, SeqMeta()) * g).sum(), [x, *params])
    ref = torch.autograd.grad((mixer.reference(x, SeqMeta()) * g).sum(), [x, *params])
    for a, b in zip(fast, ref):
        assert torch.isfinite(a).all()
        assert rel_rms_error(a, b) < 1e-10


@pytest.mark.parametrize("name", list(MIXERS))
def test_registry_entry_is_documented(name):
    e = MIXERS[name]
    assert e.description and e.paper and e.family
    assert e.cls.supports_causal or e.cls.supports_bidirectional
