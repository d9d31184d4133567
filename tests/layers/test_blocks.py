"""Block-level contract, over the block and FFN registries: every block kind with every FFN
around a causal mixer is causal, decodes through its cache exactly as its full forward, has
finite gradients, and reports the state, FLOPs and residual projections of its parts."""

import itertools
import math

import pytest
import torch

from speedlm.layers.dims import ModelDims
from speedlm.layers.mixer import SeqMeta
from speedlm.models.registry import BLOCKS, FFNS, MIXERS
from speedlm.ops.metrics import rel_rms_error
from support.parts import TEST_BLOCKS

ALL_BLOCKS = {**BLOCKS, **TEST_BLOCKS}
DIMS = ModelDims(d_model=32, n_heads=4, max_seq_len=128, ffn_hidden=48, n_layers=2)
MIXER_SPECS = [{"name": n, **MIXERS[n].contract_spec} for n in ("attention", "linear_attention")]
CASES = list(itertools.product(ALL_BLOCKS, FFNS, range(len(MIXER_SPECS))))
IDS = [f"{b}-{f}-{MIXER_SPECS[m]['name']}" for b, f, m in CASES]


def make(block, ffn, m, dtype=torch.float64):
    torch.manual_seed(2)
    ffn_spec = {"name": ffn, **FFNS[ffn].contract_spec}
    return ALL_BLOCKS[block].cls(DIMS, mixer=MIXER_SPECS[m], ffn=ffn_spec).to(dtype)


def x_of(t, b=2):
    return torch.randn(b, t, DIMS.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(t))


@pytest.mark.parametrize("block,ffn,m", CASES, ids=IDS)
def test_block_is_causal_and_decodes_like_its_full_forward(block, ffn, m):
    # inference mode: routed blocks (MoD) route by their causal rule there, as generation does
    # (their training-time top-k over the sequence looks ahead by design); MoE is dropless
    blk, x = make(block, ffn, m).eval(), x_of(43)
    full = blk(x, SeqMeta())
    x2 = x.clone()
    x2[:, 30] += 1.0
    assert rel_rms_error(blk(x2, SeqMeta())[:, :30], full[:, :30]) < 1e-14
    with torch.no_grad():
        cache = blk.init_cache()
        steps = [blk(x[:, :11], SeqMeta(0), cache)] + [blk(x[:, i : i + 1], SeqMeta(i), cache) for i in range(11, 43)]
    assert rel_rms_error(torch.cat(steps, 1), full) < 1e-12
    if block == "mod":  # each row's inner cache holds the tokens that row routed
        assert cache.nbytes() == sum(blk.inner.state_bytes(n, 1, 8) for n in cache.counts) > 0
        assert blk.state_bytes(43, 2, 8) == blk.inner.state_bytes(math.ceil(blk.capacity * 43), 2, 8)  # at capacity
    else:
        assert cache.nbytes() == blk.state_bytes(43, batch_size=2, bytes_per_elem=8) >= blk.mixer.state_bytes(43, 2, 8)


@pytest.mark.parametrize("block,ffn,m", CASES, ids=IDS)
def test_block_gradients_are_finite_and_reach_every_parameter(block, ffn, m):
    blk, x = make(block, ffn, m), x_of(29).requires_grad_(True)
    grads = torch.autograd.grad(blk(x, SeqMeta()).pow(2).sum(), [x, *blk.parameters()])
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("block,ffn,m", CASES, ids=IDS)
def test_block_accounting_is_the_sum_of_its_parts(block, ffn, m):
    blk = make(block, ffn, m)
    ffn_flops = blk.ffn.flops_per_token() if blk.ffn is not None else 0.0
    if block == "mod":  # the router on every token, the block on the k = ceil(capacity T) routed ones, over their length
        routed = math.ceil(blk.capacity * 100)
        inner = blk.mixer.flops_per_token(routed) + ffn_flops
        inner_bidirectional = blk.mixer.bidirectional_flops_per_token(routed) + ffn_flops
        assert blk.flops_per_token(100) == pytest.approx(2 * DIMS.d_model + routed / 100 * inner)
        assert blk.bidirectional_flops_per_token(100) == pytest.approx(2 * DIMS.d_model + routed / 100 * inner_bidirectional)
    else:
        own = blk.own_flops_per_token()  # the parts beside mixer and FFN, counted in both directions
        assert blk.flops_per_token(100) == pytest.approx(blk.mixer.flops_per_token(100) + ffn_flops + own)
        bidirectional = blk.mixer.bidirectional_flops_per_token(100) + ffn_flops + own
        assert blk.bidirectional_flops_per_token(100) == pytest.approx(bidirectional)
    res = blk.residual_weights()  # the mixer's output projection, and the FFN's (an MoE: experts and shared)
    assert len(res) >= 1 + (blk.ffn is not None) and all(DIMS.d_model in (w.shape[0], w.shape[-1]) for w in res)
    with torch.no_grad():  # NaN trap: every parameter is initialised by some module's own reset
        for p in blk.parameters():
            p.fill_(float("nan"))
    for mod in reversed(list(blk.modules())):
        if hasattr(mod, "reset_parameters"):
            mod.reset_parameters()
    assert all(torch.isfinite(p).all() for p in blk.parameters())


@pytest.mark.parametrize("ffn", list(FFNS))
def test_ffn_is_position_wise_and_documented(ffn):
    e = FFNS[ffn]
    assert e.description and e.paper and e.family
    f = e.cls(DIMS, **e.contract_spec).double()
    x = x_of(17)
    y = f(x, SeqMeta())
    x2 = x.clone()
    x2[:, 9] += 1.0
    # up to rounding: grouped dispatch (MoE) multiplies in shapes that depend on the routing
    changed = (f(x2, SeqMeta()) - y).abs().sum(dim=(0, 2)) > 1e-12
    assert changed.sum() <= 1 and not changed[:9].any() and not changed[10:].any()


@pytest.mark.parametrize("block", list(BLOCKS))
def test_block_entry_is_documented(block):
    e = BLOCKS[block]
    assert e.description and e.paper and e.family
    assert not {"dims", "mixer", "ffn"} & set(e.options())  # the fixed arguments are not options
