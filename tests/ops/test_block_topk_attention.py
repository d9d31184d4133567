"""Block top-k attention (ops/block_topk_attention.py): the gathered form equals attention under
the rule's dense mask (odd lengths, GQA, per-row positions, query chunks, gradients); the gate
really restricts the keys; ties go to the later block; top_k >= blocks is full causal attention."""

import pytest
import torch

from speedlm.ops.attention import attention_reference, causal_mask
from speedlm.ops.block_topk_attention import block_key_sums, block_topk_attention, block_topk_mask
from speedlm.ops.metrics import rel_rms_error


def qkv(t, b=2, h=4, hkv=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, d, dtype=torch.float64, generator=g)
    k = torch.randn(b, hkv, t, d, dtype=torch.float64, generator=g)
    v = torch.randn(b, hkv, t, d, dtype=torch.float64, generator=g)
    return q, k, v


def fast(q, k, v, pos, bs, top_k, **kw):
    return block_topk_attention(q, k, v, pos, pos, block_key_sums(k, pos, bs), bs, top_k, **kw)


@pytest.mark.parametrize("t,bs,top_k", [(63, 4, 3), (75, 7, 2), (37, 5, 1), (41, 8, 0)])
def test_fast_form_equals_the_dense_mask_reference(t, bs, top_k):
    q, k, v = qkv(t)
    pos = torch.arange(t)[None]
    ref = attention_reference(q, k, v, block_topk_mask(q, k, pos, pos, bs, top_k))
    assert rel_rms_error(fast(q, k, v, pos, bs, top_k), ref) < 1e-12
    assert rel_rms_error(fast(q, k, v, pos, bs, top_k, chunk=6), ref) < 1e-12  # query chunks


def test_per_row_positions_and_gradients():
    q, k, v = (x.requires_grad_(True) for x in qkv(45))
    pos = torch.stack([torch.arange(0, 45), torch.arange(13, 58)])  # row 1 starts inside block 2
    out = fast(q, k, v, pos, 5, 2)
    ref = attention_reference(q, k, v, block_topk_mask(q, k, pos, pos, 5, 2))
    assert rel_rms_error(out, ref) < 1e-12
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad((out * g).sum(), (q, k, v)), torch.autograd.grad((ref * g).sum(), (q, k, v))):
        assert rel_rms_error(a, b) < 1e-10


def test_a_query_reads_its_own_block_and_exactly_top_k_earlier_blocks():
    q, k, v = qkv(60)
    pos = torch.arange(60)[None]
    mask = block_topk_mask(q, k, pos, pos, 6, 2)
    i = 50  # block 8: positions 48..50 of its own block and two whole earlier blocks
    assert (mask[:, :, i].sum(-1) == 3 + 2 * 6).all()
    assert (mask[:, :, i, 48:51]).all() and not mask[:, :, i, 51:].any()


def test_values_outside_the_selected_blocks_are_never_read():
    q, k, v = qkv(60, h=2, hkv=1)
    pos = torch.arange(60)[None]
    bs, i = 6, 55
    mask = block_topk_mask(q, k, pos, pos, bs, 2)[0, :, i]  # (H, T) for query i, row 0
    seen = mask.any(0)
    unseen = [j for j in range(48) if not seen[j]]
    chosen = [j for j in range(48) if mask[:, j].any()]
    assert unseen and chosen
    y = fast(q, k, v, pos, bs, 2)
    v2 = v.clone()
    v2[0, :, unseen] += 10.0  # blocks the gate skipped: query i is unchanged
    assert torch.equal(fast(q, k, v2, pos, bs, 2)[0, :, i], y[0, :, i])
    v3 = v.clone()
    v3[0, :, chosen[0]] += 10.0  # a selected block: query i changes (in the heads that chose it)
    assert (fast(q, k, v3, pos, bs, 2)[0, :, i] - y[0, :, i]).abs().max() > 1e-3
    k2 = k.clone()  # a small change of a skipped key that keeps the selection: nothing changes
    k2[0, :, unseen[0]] += 1e-6
    assert torch.equal(block_topk_mask(q, k2, pos, pos, bs, 2)[0, :, i], mask)
    assert torch.equal(fast(q, k2, v, pos, bs, 2)[0, :, i], y[0, :, i])


def test_equal_blocks_go_to_the_later_one():
    q, k, v = qkv(15, b=1, h=1, hkv=1)
    k[:, :, 5:10] = k[:, :, 0:5]  # blocks 0 and 1 have equal means: a tie for every query
    pos = torch.arange(15)[None]
    mask = block_topk_mask(q, k, pos, pos, 5, 1)
    assert mask[0, 0, 10:, 5:10].all() and not mask[0, 0, 10:, :5].any()
    ref = attention_reference(q, k, v, mask)
    assert rel_rms_error(fast(q, k, v, pos, 5, 1), ref) < 1e-12


def test_top_k_at_least_the_number_of_blocks_is_full_causal_attention():
    q, k, v = qkv(53)
    pos = torch.arange(53)[None]
    full = attention_reference(q, k, v, causal_mask(53, 53))
    assert rel_rms_error(fast(q, k, v, pos, 6, 9), full) < 1e-12


def test_cached_queries_against_more_keys_and_running_sums():
    """A chunk of queries (the last ones) over cached keys, with block sums built in pieces."""
    q, k, v = qkv(50)
    pos = torch.arange(50)[None]
    whole = fast(q, k, v, pos, 4, 2)
    sums = block_key_sums(k[:, :, :30], pos[:, :30], 4)
    sums = torch.nn.functional.pad(sums, (0, 0, 0, 13 - sums.shape[2]))
    block_key_sums(k[:, :, 30:], pos[:, 30:], 4, out=sums)
    tail = block_topk_attention(q[:, :, 30:], k, v, pos[:, 30:], pos, sums, 4, 2)
    assert rel_rms_error(tail, whole[:, :, 30:]) < 1e-12
