"""Block top-k attention, MoBA-style (layers/block_topk.py): the mixer equals its dense-mask
reference, the gate restricts what a query reads, top_k >= blocks is full attention, cached
decoding equals the forward with summaries that grow by block, and bad configs are one line."""

import pytest
import torch

from speedlm.cache import WindowPolicy
from speedlm.errors import SpeedlmError
from speedlm.layers.attention import Attention
from speedlm.layers.block_topk import BlockTopkAttention
from speedlm.layers.dims import ModelDims
from speedlm.layers.mixer import SeqMeta
from speedlm.models import ModelConfig
from speedlm.layers.rope import rope_reference
from speedlm.ops.block_topk_attention import block_topk_mask
from speedlm.ops.metrics import rel_rms_error

DIMS = ModelDims(d_model=32, n_heads=4, max_seq_len=256, n_layers=2)


def make(**options):
    torch.manual_seed(1)
    return BlockTopkAttention(DIMS, **options).double()


def x_of(t, b=2):
    return torch.randn(b, t, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(t))


@pytest.mark.parametrize("t", [63, 101])
def test_equals_the_dense_reference_on_odd_lengths(t):
    m, x = make(block_size=8, top_k=2, kv_heads=2), x_of(t)
    assert rel_rms_error(m(x, SeqMeta()), m.reference(x, SeqMeta())) < 1e-12
    assert rel_rms_error(m(x, SeqMeta(start=9)), m.reference(x, SeqMeta(start=9))) < 1e-12  # blocks by position


def selection(m, x):
    """(B, H, T, T) the reference's mask: which keys each query reads."""
    q, k, _ = m.reference_project(x)
    pos = torch.arange(x.shape[1])[None]
    q, k = rope_reference(q, pos, m.rope_theta), rope_reference(k, pos, m.rope_theta)
    return block_topk_mask(q, k, pos, pos, m.block_size, m.top_k - 1)  # the own block is one of the top_k


def test_the_gate_restricts_what_a_late_query_reads():
    """Query 51 (block 12 of 4 positions, top_k=2: MoBA's count, the own block included) reads its
    own block and one earlier block: a token in a skipped block does not reach it (while the
    selection stays), one in the selected block does."""
    m, x = make(block_size=4, top_k=2), x_of(52, b=1)
    mask = selection(m, x)[0, :, 51]  # (H, T)
    assert (mask.sum(-1) == 8).all()
    skipped = [s for s in range(48) if not mask[:, s].any()][0]
    chosen = [s for s in range(48) if mask[:, s].any()][0]
    y = m(x, SeqMeta())
    x2 = x.clone()
    x2[0, skipped] += 1e-3 * torch.randn(32, dtype=torch.float64)
    assert torch.equal(selection(m, x2)[0, :, 51], mask)
    assert rel_rms_error(m(x2, SeqMeta())[0, 51], y[0, 51]) < 1e-14
    x3 = x.clone()
    x3[0, chosen] += 1e-3 * torch.randn(32, dtype=torch.float64)
    assert rel_rms_error(m(x3, SeqMeta())[0, 51], y[0, 51]) > 1e-8


def test_top_k_covering_every_block_is_full_causal_attention():
    m = make(block_size=6, top_k=100, kv_heads=2)
    full = Attention(DIMS, kv_heads=2).double()
    full.load_state_dict(m.state_dict())
    x = x_of(75)
    assert rel_rms_error(m(x, SeqMeta()), full(x, SeqMeta())) < 1e-12


@torch.no_grad()
def test_decoding_token_by_token_equals_the_forward_and_keeps_block_sums():
    m, x = make(block_size=5, top_k=2, kv_heads=2), x_of(48)
    full = m(x, SeqMeta())
    cache = m.init_cache()
    steps = [m(x[:, :7], SeqMeta(0), cache)] + [m(x[:, i : i + 1], SeqMeta(i), cache) for i in range(7, 48)]
    assert rel_rms_error(torch.cat(steps, 1), full) < 1e-12
    assert cache["kv"].length == 48 and cache["blocks"].sums.shape == (2, 2, 10, 8)  # ceil(48 / 5) blocks
    assert cache.nbytes() == m.state_bytes(48, batch_size=2, bytes_per_elem=8)


def test_mean_keys_follow_the_blocks_touched():
    m = make(block_size=8, top_k=3)
    assert m._mean_keys(8) == pytest.approx(4.5)  # within one block: causal attention
    assert 3 * 8 - 4 < m._mean_keys(100_000) < 3 * 8 + 1  # three blocks, as MoBA's top-3: the own and two earlier
    assert m.flops_per_token(4096) < make(block_size=8, top_k=100).flops_per_token(4096)


def test_bad_options_and_unsupported_calls_are_one_line():
    for spec, needle in [({"block_size": 0}, "block_size"), ({"top_k": 0}, "top_k"), ({"kv_heads": 3}, "kv_heads")]:
        with pytest.raises(SpeedlmError, match=needle) as e:
            ModelConfig(layers={"A": {"mixer": {"name": "block_topk", **spec}}}).validate()
        assert "\n" not in str(e.value)
    m, x = make(block_size=4), x_of(12)
    with pytest.raises(SpeedlmError, match="full cache"):
        m.init_cache(WindowPolicy(8))
    with pytest.raises(SpeedlmError, match="causal-only"):
        m(x, SeqMeta(causal=False))
    with pytest.raises(SpeedlmError, match="document boundaries"):
        m(x, SeqMeta(doc_ids=torch.zeros(2, 12, dtype=torch.long)))
