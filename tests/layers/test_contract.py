"""The mixer contract (DESIGN.md), run over every registered mixer and the test-only mixers that
prove the shared mechanisms (tests/support/parts.py).

A mixer is covered the moment it is registered: its `contract_spec` gives options small enough
for the mechanism to matter at these lengths (e.g. a window shorter than the sequence).
"""

import random
from dataclasses import replace

import pytest
import torch

from speedlm.cache import CompositeCache, KVCache, RecurrentState, WindowPolicy
from speedlm.errors import SpeedlmError
from speedlm.layers.dims import ModelDims
from speedlm.layers.mixer import SeqMeta
from speedlm.models.registry import MIXERS
from speedlm.ops.metrics import rel_rms_error
from speedlm.cache.sepllm import SepLLMPolicy
from support.parts import TEST_MIXERS, PreRopeFull, SinkWindowPolicy

DIMS = ModelDims(d_model=32, n_heads=4, max_seq_len=128)
LENGTHS = [37, 75]  # deliberately not multiples of chunk or block sizes
# registered mixers once more with an option that changes what they compute, on top of their
# contract_spec: every such option runs the whole suite
OPTION_VARIANTS = {
    "attention[positions=none]": ("attention", {"positions": "none"}),
    "sliding_window[positions=none]": ("sliding_window", {"positions": "none"}),
    # Qwen2 / Qwen3 / Qwen3-Next attention (hf/qwen.py): biases, per-head q/k norms, a head width
    # other than d_model / n_heads, partial rotary, the sigmoid output gate
    "attention[qkv_bias,qk_norm]": ("attention", {"qkv_bias": True, "qk_norm": True}),
    "attention[head_dim=16,rope_dim=4]": ("attention", {"head_dim": 16, "rope_dim": 4}),
    "attention[output_gate]": ("attention", {"output_gate": True}),
    "sliding_window[qkv_bias,qk_norm,head_dim=12,rope_dim=6,output_gate]": (
        "sliding_window", {"qkv_bias": True, "qk_norm": True, "head_dim": 12, "rope_dim": 6, "output_gate": True}),
    "mamba[inner_norms]": ("mamba", {"inner_norms": True}),
    # Mamba-2 as Falcon-H1 configures it: an inner width no multiple of d_model, the gated norm
    # before the gate or none, no conv bias; and the parallel hybrid with Falcon-H1's defaults
    "mamba2[d_inner=96,norm=before_gate]": ("mamba2", {"d_inner": 96, "norm": "before_gate"}),
    "mamba2[norm=none,conv_bias=false]": ("mamba2", {"norm": "none", "conv_bias": False}),
    "parallel_hybrid[head_dim=12,norm=none,conv_bias=false]": (
        "parallel_hybrid", {"head_dim": 12, "norm": "none", "conv_bias": False}),
    # Qwen3-Next's shapes: 6 value heads on 2 query/key heads, own widths, FLA's L2-norm epsilon
    "gated_deltanet[key_heads]": ("gated_deltanet", {"heads": 6, "key_heads": 2, "key_dim": 6, "value_dim": 10,
                                                     "qk_norm_eps": 1e-6}),
    # DeepSeek-V2's query latent, and head widths of their own (V3: nope 128, rope 64, values 128)
    "mla[q_rank,nope_dim,v_dim]": ("mla", {"q_rank": 16, "nope_dim": 6, "v_dim": 10}),
    # FoX (Pro)'s output gate and QK-norm, and RoPE on top of the forget gate
    "forgetting_attention[rope,qk_norm,output_gate]": ("forgetting_attention", {"positions": "rope", "qk_norm": True,
                                                                                "output_gate": True}),
    "mamba[weightless_inner_norms]": ("mamba", {"inner_norms": True, "inner_norm_gains": False,
                                               "inner_norm_eps": 1e-3}),  # FalconMamba's
}
VARIANTS = {
    name: replace(MIXERS[base], name=name, contract_spec={**MIXERS[base].contract_spec, **options})
    for name, (base, options) in OPTION_VARIANTS.items()
}
ENTRIES = {**MIXERS, **TEST_MIXERS, **VARIANTS}
CAUSAL = [n for n, e in ENTRIES.items() if e.cls.supports_causal]
DECODING = [n for n in CAUSAL if ENTRIES[n].cls.supports_decoding]
BIDIRECTIONAL = [n for n, e in ENTRIES.items() if e.cls.supports_bidirectional]
CAUSAL_ONLY = [n for n in CAUSAL if n not in BIDIRECTIONAL]


# parameters whose fresh init is the identity (zero biases, unit gains): random in the suite, so
# that a path that forgets them fails
IDENTITY_AT_INIT = {"q_proj.bias", "k_proj.bias", "v_proj.bias", "q_norm.weight", "k_norm.weight",
                    "dt_norm.weight", "b_norm.weight", "c_norm.weight",  # these three: Mamba's inner norms
                    "i_gate.weight", "f_gate.weight",  # mLSTM's gates start input-independent
                    "w_down.weight", "a_down.weight", "g_down.weight"}  # and RWKV-7's low-rank ones


def make(name, dtype=torch.float64):
    torch.manual_seed(1)
    entry = ENTRIES[name]
    mixer = entry.cls(DIMS, **entry.contract_spec).to(dtype)
    with torch.no_grad():
        for pname, p in mixer.named_parameters():
            if pname in IDENTITY_AT_INIT:
                p.add_(0.5 * torch.randn(p.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(len(pname))).to(dtype))
    return mixer


def x_of(t, dtype=torch.float64, b=2):
    return torch.randn(b, t, DIMS.d_model, dtype=dtype, generator=torch.Generator().manual_seed(t))


def ids_of(t, b=2):
    return torch.randint(0, 256, (b, t), generator=torch.Generator().manual_seed(t + 1))


def meta(ids, start=0, **kw):
    """Every call carries token ids, as the model passes them."""
    return SeqMeta(start=start, token_ids=ids, **kw)


def run_in_pieces(mixer, x, ids, cuts, cache=None):
    """Feed x through one cache in pieces [0:c1], [c1:c2], ...; return the concatenated output."""
    cache = mixer.init_cache() if cache is None else cache
    outs, start = [], 0
    for end in list(cuts) + [x.shape[1]]:
        outs.append(mixer(x[:, start:end], meta(ids[:, start:end], start), cache))
        start = end
    return torch.cat(outs, dim=1), cache


def layer_caches(cache):
    return list(cache.parts.values()) if isinstance(cache, CompositeCache) else [cache]


# ----- causal contract -----------------------------------------------------------------
@pytest.mark.parametrize("name", CAUSAL)
def test_causality(name):
    mixer, x, ids = make(name), x_of(53), ids_of(53)
    s = 29
    x2 = x.clone()
    x2[:, s] += torch.randn_like(x2[:, s])
    y, y2 = mixer(x, meta(ids)), mixer(x2, meta(ids))
    assert torch.equal(y[:, :s], y2[:, :s]) or rel_rms_error(y2[:, :s], y[:, :s]) < 1e-14
    assert rel_rms_error(y2[:, s:], y[:, s:]) > 1e-6  # the change is visible from s on


@pytest.mark.parametrize("name", list(ENTRIES))
def test_batch_rows_are_independent(name):
    mixer, x, ids = make(name), x_of(41, b=3), ids_of(41, b=3)
    causal = ENTRIES[name].cls.supports_causal
    x2 = x.clone()
    x2[1] += torch.randn_like(x2[1])
    y, y2 = mixer(x, meta(ids, causal=causal)), mixer(x2, meta(ids, causal=causal))
    for row in (0, 2):
        assert rel_rms_error(y2[row], y[row]) < 1e-14
    assert rel_rms_error(y2[1], y[1]) > 1e-6


@pytest.mark.parametrize("name", DECODING)
@pytest.mark.parametrize("t", LENGTHS)
@torch.no_grad()  # the inference path (buffered caches); state chaining below runs under autograd
def test_cache_equivalence_full_chunked_tokenwise(name, t):
    mixer, x, ids = make(name), x_of(t), ids_of(t)
    full = mixer(x, meta(ids))
    rng = random.Random(t)
    for _ in range(3):
        cuts = sorted(rng.sample(range(1, t), 3))
        chunked, _ = run_in_pieces(mixer, x, ids, cuts)
        assert rel_rms_error(chunked, full) < 1e-12, cuts
    tokenwise, _ = run_in_pieces(mixer, x, ids, range(1, t))
    assert rel_rms_error(tokenwise, full) < 1e-12


@pytest.mark.parametrize("name", CAUSAL)
@pytest.mark.parametrize("t", LENGTHS)
def test_reference_equivalence_float64_and_float32(name, t):
    mixer, x, ids = make(name), x_of(t), ids_of(t)
    ref = mixer.reference(x, meta(ids))
    assert rel_rms_error(mixer(x, meta(ids)), ref) < 1e-12
    mixer32 = make(name, torch.float32)
    assert rel_rms_error(mixer32(x.float(), meta(ids)), ref) < 1e-5


@pytest.mark.parametrize("name", DECODING)
def test_state_chaining_and_declared_state_size(name):
    """Under autograd (parameters require grad), so the cache's training path is exercised."""
    mixer, x, ids = make(name), x_of(75), ids_of(75)
    whole = mixer(x, meta(ids))
    halves, cache = run_in_pieces(mixer, x, ids, [40])
    assert rel_rms_error(halves, whole) < 1e-12
    # the cache holds exactly what the mixer promises (O(T), O(window) or O(1)); where that
    # depends on the tokens (SepLLM's separators) the promise is an estimate within its bounds
    declared = mixer.state_bytes(75, batch_size=2, bytes_per_elem=8)
    if mixer.data_dependent_state:
        full = 2 * 2 * mixer.kv_heads * mixer.head_dim * 75 * 8
        assert declared < full and cache.nbytes() <= full
    else:
        assert cache.nbytes() == declared


@pytest.mark.parametrize("name", DECODING)
def test_detached_cache_carries_values_but_no_gradient(name):
    """Segment memory: the second segment reads the first one's state but does not
    backpropagate into it."""
    mixer, x, ids = make(name), x_of(60).requires_grad_(True), ids_of(60)
    cache = mixer.init_cache()
    mixer(x[:, :30], meta(ids[:, :30]), cache)
    cache.detach()
    y = mixer(x[:, 30:], meta(ids[:, 30:], 30), cache)
    assert rel_rms_error(y, mixer(x, meta(ids))[:, 30:]) < 1e-12
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert torch.all(grad[:, :30] == 0) and grad[:, 30:].abs().sum() > 0


@pytest.mark.parametrize("name", CAUSAL)
def test_gradients_finite_and_equal_to_reference(name):
    mixer, x, ids = make(name), x_of(45).requires_grad_(True), ids_of(45)
    g = torch.randn(2, 45, DIMS.d_model, dtype=torch.float64)
    params = list(mixer.parameters())
    fast = torch.autograd.grad((mixer(x, meta(ids)) * g).sum(), [x, *params])
    ref = torch.autograd.grad((mixer.reference(x, meta(ids)) * g).sum(), [x, *params])
    for a, b in zip(fast, ref):
        assert torch.isfinite(a).all()
        assert rel_rms_error(a, b) < 1e-10


@pytest.mark.parametrize("name", CAUSAL)
def test_per_row_positions_equal_separate_runs(name):
    """SeqMeta.positions (B, T): each row at its own offset gives what that row alone gives."""
    mixer, x, ids = make(name), x_of(40, b=3), ids_of(40, b=3)
    starts = [0, 7, 19]
    positions = torch.stack([torch.arange(s, s + 40) for s in starts])
    y = mixer(x, meta(ids, positions=positions))
    for row, s in enumerate(starts):
        alone = mixer(x[row : row + 1], meta(ids[row : row + 1], positions=positions[row : row + 1]))
        assert rel_rms_error(y[row : row + 1], alone) < 1e-12
        if s == 0:
            assert rel_rms_error(alone, mixer(x[row : row + 1], meta(ids[row : row + 1]))) < 1e-12


def _doc_ids(t):
    d = torch.zeros(2, t, dtype=torch.long)
    d[0, 20:], d[1, 9:], d[1, 31:] = 1, 1, 2
    return d


@pytest.mark.parametrize("name", list(ENTRIES))
def test_document_boundaries_are_honoured_or_refused(name):
    mixer, x, ids = make(name), x_of(45), ids_of(45)
    doc = _doc_ids(45)
    causal = ENTRIES[name].cls.supports_causal
    if not mixer.supports_doc_ids:
        with pytest.raises(SpeedlmError, match="document boundaries"):
            mixer(x, meta(ids, doc_ids=doc, causal=causal))
        return
    # positions restart in every document: each document alone, from position 0
    first = (doc != torch.nn.functional.pad(doc, (1, 0), value=-1)[:, :-1]).long()
    seg_start = torch.cummax(torch.arange(45) * first, dim=1).values
    positions = torch.arange(45) - seg_start
    y = mixer(x, meta(ids, doc_ids=doc, positions=positions, causal=causal))
    for row in range(2):
        for d in doc[row].unique():
            sel = doc[row] == d
            alone = mixer(x[row : row + 1, sel], meta(ids[row : row + 1, sel], causal=causal))
            assert rel_rms_error(y[row : row + 1, sel], alone) < 1e-12
    ref = mixer.reference(x, meta(ids, doc_ids=doc, positions=positions, causal=causal))
    assert rel_rms_error(y, ref) < 1e-12


# ----- bidirectional contract ----------------------------------------------------------
@pytest.mark.parametrize("name", BIDIRECTIONAL)
@pytest.mark.parametrize("t", LENGTHS)
def test_bidirectional_sees_both_sides_and_equals_reference(name, t):
    mixer, x, ids = make(name), x_of(t), ids_of(t)
    bidi = meta(ids, causal=False)
    y = mixer(x, bidi)
    assert rel_rms_error(y, mixer.reference(x, bidi)) < 1e-12
    assert rel_rms_error(make(name, torch.float32)(x.float(), bidi), y) < 1e-5
    s = t // 2
    x2 = x.clone()
    x2[:, s] += 1.0
    if name != "test_no_mixing":  # the one mixer that is meant to see only its own token
        assert rel_rms_error(mixer(x2, bidi)[:, :s], y[:, :s]) > 1e-8  # earlier positions see a later token
    with pytest.raises(SpeedlmError, match="takes no cache"):
        mixer(x, bidi, mixer.init_cache() if mixer.supports_decoding else KVCache())


@pytest.mark.parametrize("name", BIDIRECTIONAL)
def test_bidirectional_gradients_equal_reference(name):
    mixer, x, ids = make(name), x_of(33).requires_grad_(True), ids_of(33)
    bidi = meta(ids, causal=False)
    g = torch.randn(2, 33, DIMS.d_model, dtype=torch.float64)
    params = list(mixer.parameters())
    fast = torch.autograd.grad((mixer(x, bidi) * g).sum(), [x, *params])
    ref = torch.autograd.grad((mixer.reference(x, bidi) * g).sum(), [x, *params])
    for a, b in zip(fast, ref):
        assert torch.isfinite(a).all() and rel_rms_error(a, b) < 1e-10


@pytest.mark.parametrize("name", CAUSAL_ONLY)
def test_causal_only_mixers_refuse_bidirectional_calls(name):
    mixer, x, ids = make(name), x_of(20), ids_of(20)
    with pytest.raises(SpeedlmError, match="causal-only"):
        mixer(x, meta(ids, causal=False))


# ----- lossy cache policies (the hook) -------------------------------------------------
KV_MIXERS = [n for n in DECODING if any(isinstance(c, KVCache) for c in layer_caches(make(n).init_cache()))]
POLICIES = {
    "window": WindowPolicy(6),
    "sink_window": SinkWindowPolicy(sinks=3, window=6),
    "pre_rope_full": PreRopeFull(),
}


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("name", [n for n in KV_MIXERS if not n.startswith("test_")])
@torch.no_grad()
def test_kv_policies_decode_as_the_masked_forward_they_emulate(name, policy):
    """Token-by-token decoding under any KV policy (non-suffix selections, keys stored before
    RoPE) equals the mixer's own reference with the policy's mask added."""
    mixer, x, ids = make(name), x_of(41), ids_of(41)
    pol = POLICIES[policy]
    tokenwise, cache = run_in_pieces(mixer, x, ids, range(1, 41), mixer.init_cache(pol))
    expected = mixer.reference(x, meta(ids), policy=pol)
    assert rel_rms_error(tokenwise, expected) < 1e-12
    (kv,) = [c for c in layer_caches(cache) if isinstance(c, KVCache)]  # the KV part of a composite cache
    assert kv.length == pol.retained(41)


SEPLLM = SepLLMPolicy(tuple(range(64)), initial=2, window=5)  # a quarter of the ids are separators


@pytest.mark.parametrize("name", [n for n in KV_MIXERS if not n.startswith("test_")])
@torch.no_grad()
def test_sepllm_policy_decodes_as_the_sepllm_masked_forward(name):
    """Training-free SepLLM on any KV mixer: token by token and in chunks it equals the mixer's
    reference under the SepLLM mask (initial tokens, separators, window) with original
    positions; the cache holds exactly those keys (the union over rows)."""
    mixer, x, ids = make(name), x_of(41), ids_of(41)
    expected = mixer.reference(x, meta(ids), policy=SEPLLM)
    for cuts in (range(1, 41), [9, 30]):
        out, cache = run_in_pieces(mixer, x, ids, cuts, mixer.init_cache(SEPLLM))
        assert rel_rms_error(out, expected) < 1e-12
    (kv,) = [c for c in layer_caches(cache) if isinstance(c, KVCache)]
    needed = (ids < 64).any(0) | (torch.arange(41) < 2) | (torch.arange(41) >= 37)
    held = torch.zeros(41, dtype=torch.bool)
    pos = kv.positions()
    held[torch.arange(pos, pos + kv.length) if isinstance(pos, int) else pos[0]] = True
    # everything the next query needs, and at most `stale_slots` more awaiting a batched eviction
    assert bool(held[needed].all()) and int((held & ~needed).sum()) <= SEPLLM.stale_slots()


# ----- precision of recurrent state ----------------------------------------------------
RECURRENT = [n for n in DECODING if any(isinstance(c, RecurrentState) for c in layer_caches(make(n).init_cache()))]


@pytest.mark.parametrize("name", RECURRENT)
@torch.no_grad()
def test_bfloat16_decoding_does_not_drift(name):
    """State is accumulated in float32: a bf16 model decoded token by token stays as close to
    the float64 result at token 600 as its parallel bf16 form (a bf16 state drifted to 0.17)."""
    t = 600
    x = x_of(t, b=1) * 0.5
    ids = ids_of(t, b=1)
    ref = make(name)(x, meta(ids))
    mixer = make(name, torch.bfloat16)
    parallel = rel_rms_error(mixer(x.bfloat16(), meta(ids)), ref)
    tokenwise, cache = run_in_pieces(mixer, x.bfloat16(), ids, range(1, t))
    late = rel_rms_error(tokenwise[:, -100:], ref[:, -100:])
    assert late < max(3 * parallel, 2e-2), (late, parallel)
    for c in layer_caches(cache):
        if isinstance(c, RecurrentState):
            assert all(s.dtype == torch.float32 for s in c.state)


# ----- parameters, registry ------------------------------------------------------------
@pytest.mark.parametrize("name", list(ENTRIES))
def test_mixer_initialises_every_parameter_itself(name):
    """NaN trap: after poisoning every parameter, the mixer's own reset_parameters() must
    overwrite all of them (the model never re-initialises a mixer's parameters by name)."""
    mixer = make(name)
    with torch.no_grad():
        for p in mixer.parameters():
            p.fill_(float("nan"))
    mixer.reset_parameters()
    assert all(torch.isfinite(p).all() for p in mixer.parameters())
    res = mixer.residual_weights()
    assert res and all(any(w is p for p in mixer.parameters()) for w in res)
    assert all(w.shape[0] == DIMS.d_model for w in res)  # projections into the residual stream


@pytest.mark.parametrize("name", list(MIXERS))
def test_registry_entry_is_documented(name):
    e = MIXERS[name]
    assert e.description and e.paper and e.family
    assert e.cls.supports_causal or e.cls.supports_bidirectional
    MIXERS.check({"name": name, **e.contract_spec}, "contract_spec")  # the suite's options are valid options


@pytest.mark.parametrize("name", list(VARIANTS))
def test_option_variants_are_valid_options(name):
    base, _ = OPTION_VARIANTS[name]
    MIXERS.check({"name": base, **VARIANTS[name].contract_spec}, "contract_spec")
