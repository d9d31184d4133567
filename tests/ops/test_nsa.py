"""Native sparse attention's branches (ops/nsa.py): the selected branch equals dense attention
under the selection rule's mask, the rule keeps the forced blocks and at most top_n, the
queries may be the last of the keys (decoding, chunked prefill), and no operation builds a
(T, T) tensor."""

import pytest
import torch

from speedlm.ops.attention import attention_reference
from speedlm.ops.metrics import rel_rms_error
from speedlm.ops.nsa import compressed_attention, nsa_branches, nsa_masks, pooled_blocks
from support.largest import largest_tensor

H, HKV, D = 4, 2, 8


def _qkv(tq, tk, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, H, tq, D, dtype=torch.float64, generator=g),
            torch.randn(2, HKV, tk, D, dtype=torch.float64, generator=g),
            torch.randn(2, HKV, tk, D, dtype=torch.float64, generator=g))


def _dense(q, k, v, block, top_n, window):
    tq, tk = q.shape[2], k.shape[2]
    scale = D**-0.5
    kc, vc = pooled_blocks(k, block), pooled_blocks(v, block)
    cmp, probs = compressed_attention(q, kc, vc, torch.arange(tk - tq, tk), block, scale)
    sel_mask, win_mask = nsa_masks(probs, tk, HKV, block, top_n, window)
    return cmp, attention_reference(q, k, v, sel_mask, scale), attention_reference(q, k, v, win_mask, scale), sel_mask


@pytest.mark.parametrize("t,block,top_n,window", [(1, 4, 3, 5), (37, 4, 3, 5), (75, 8, 4, 16), (64, 16, 16, 64)])
def test_the_branches_equal_dense_attention_under_the_rule(t, block, top_n, window):
    q, k, v = _qkv(t, t, seed=t)
    cmp, sel, swa = nsa_branches(q, k, v, block, top_n, window)
    d_cmp, d_sel, d_swa, _ = _dense(q, k, v, block, top_n, window)
    for fast, dense in ((cmp, d_cmp), (sel, d_sel), (swa, d_swa)):
        assert rel_rms_error(fast, dense) < 1e-12 if dense.abs().max() > 0 else fast.abs().max() == 0


@pytest.mark.parametrize("tq", [1, 5])
def test_queries_that_are_the_last_keys(tq):
    q, k, v = _qkv(53, 53, seed=3)
    full = nsa_branches(q, k, v, 8, 4, 12)
    last = nsa_branches(q[:, :, -tq:], k, v, 8, 4, 12)
    for a, b in zip(last, full):
        assert rel_rms_error(a, b[:, :, -tq:]) < 1e-12


def test_the_rule_keeps_the_forced_blocks_and_at_most_top_n():
    q, k, v = _qkv(96, 96, seed=4)
    *_, sel_mask = _dense(q, k, v, 8, 5, 16)
    blocks = sel_mask.unflatten(-1, (12, 8)).any(-1)  # (B, H, T, 12): the blocks each query reads
    assert (blocks.sum(-1) <= 5).all()
    t = torch.arange(96)
    own = t // 8
    assert blocks[..., 0].all()  # the first block
    assert blocks.gather(-1, own.view(1, 1, 96, 1).expand(2, H, 96, 1)).all()  # the own block
    prev = (own - 1).clamp(min=0)
    assert blocks.gather(-1, prev.view(1, 1, 96, 1).expand(2, H, 96, 1)).all()
    assert blocks[:, :, 95].sum(-1).min() == 5  # late queries select a full top_n


def test_no_operation_builds_a_t_by_t_tensor():
    t, block, top_n = 2048, 64, 4
    q, k, v = (x.float() for x in _qkv(t, t, seed=5))
    largest = largest_tensor(lambda: nsa_branches(q, k, v, block, top_n, 128))
    # the largest: the selected pairs' scores, B x H x T x top_n x block, in tiles of 64 pairs per
    # (row, head, block) whose last one is padded (a T x T table: 7x more)
    assert largest <= 2 * H * t * top_n * block * 1.15, largest
    assert largest * 7 <= 2 * H * t * t
