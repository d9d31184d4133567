"""The gathered-block plan finds its key blocks without evaluating the mask over T x T pairs
(ops/sparse_attention.py, `active_kv_blocks`): a band on contiguous positions by one key range
per query block, any other mask from each block's position, document and index ranges. Checked
against the blocks the mask itself marks (`evaluated_active_blocks`): equal for bands, a superset
otherwise (the plan then drops the tiles without an allowed pair), over many shapes,
chunked-prefill offsets, windows, block sizes, both directions, per-row positions, packed
documents and a KV policy's window with marked keys; and the outputs equal the dense reference."""

import itertools
import random

import pytest
import torch

from speedlm.ops import sparse_attention as sa
from speedlm.ops.dilated_attention import DilatedWindow
from speedlm.ops.logsparse_attention import LogSparse
from speedlm.ops.longformer import LongformerLocal, UpToPosition
from speedlm.ops.masks import AttentionMask, Full, SlidingWindow
from speedlm.ops.metrics import rel_rms_error


def _as_sets(kv_idx, valid):
    """(Bm, nQb, K) -> [[set of key blocks per query block] per row]."""
    return [[set(kv_idx[b, i][valid[b, i]].tolist()) for i in range(kv_idx.shape[1])] for b in range(kv_idx.shape[0])]


def _evaluated(mask, block):
    return _as_sets(*sa._compact(sa.evaluated_active_blocks(mask, block, "cpu"), "cpu"))


def _found(mask, block):
    return _as_sets(*sa.active_kv_blocks(mask, block, "cpu"))


def _bands():
    """Contiguous masks of band patterns: (mask, block)."""
    rng = random.Random(0)
    patterns = [SlidingWindow(w) for w in (1, 2, 5, 17, 64, 200)] + [Full(), UpToPosition()]
    for pattern, causal, block in itertools.product(patterns, (True, False), (1, 7, 16, 64)):
        for _ in range(4):
            tk = rng.randint(1, 150)
            tq = rng.randint(1, tk) if causal else rng.randint(1, 150)
            k_pos = rng.choice((0, rng.randint(0, 40)))
            q_pos = k_pos + tk - tq if rng.random() < 0.7 else rng.randint(0, 200)  # chunked prefill, or any offset
            window = rng.choice((None, None, 1, 9, 33))
            yield AttentionMask(pattern, tq, tk, q_pos, k_pos, causal, window=window), block


def test_band_blocks_equal_the_mask_evaluated_blocks():
    n = 0
    for mask, block in _bands():
        assert sa._band_bounds(mask) is not None
        assert _found(mask, block) == _evaluated(mask, block), (mask, block)
        n += 1
    assert n == 256


@pytest.mark.parametrize("block", [16, 64])
def test_band_blocks_of_a_long_window_never_touch_the_pairs(block, monkeypatch):
    monkeypatch.setattr(sa, "evaluated_active_blocks", None)  # any call would fail
    t = 1 << 16
    kv_idx, valid = sa.active_kv_blocks(AttentionMask(SlidingWindow(128), t, t, 0, 0), block, "cpu")
    assert kv_idx.shape == (1, t // block, -(-127 // block) + 1)
    assert valid[0, -1].all() and valid[0, 0].sum() == 1


def _positions(rng, b, t, contiguous_rows: bool):
    """(b, t) non-decreasing positions with gaps (a lossy cache's keys, routed tokens)."""
    g = torch.Generator().manual_seed(rng.randint(0, 10**6))
    steps = torch.randint(1, 4, (b, t), generator=g)
    if contiguous_rows:
        steps[0] = 1
    return steps.cumsum(1) - 1 + torch.randint(0, 20, (b, 1), generator=g)


def _documents(rng, b, t):
    g = torch.Generator().manual_seed(rng.randint(0, 10**6))
    return (torch.rand(b, t, generator=g) < 0.04).long().cumsum(1)


def _general_masks():
    """Masks with per-row positions, documents, marks or non-band patterns: (mask, block)."""
    rng = random.Random(1)
    patterns = [
        SlidingWindow(9), SlidingWindow(40), Full(), UpToPosition(), DilatedWindow(5, 3), DilatedWindow(3, 8),
        LongformerLocal(6, (0, 1, 2)), LongformerLocal(4, (3, 50)), LogSparse(1), LogSparse(4, restart=24),
    ]
    for pattern, causal, block in itertools.product(patterns, (True, False), (8, 16, 64)):
        for kind in ("positions", "documents", "both", "marks", "contiguous"):
            b, tk = 3, rng.randint(20, 140)
            tq = rng.randint(1, tk) if causal else tk
            pos = _positions(rng, b, tk, contiguous_rows=True)
            q_pos, k_pos, q_doc, k_doc, window, k_mark = 0, 0, None, None, None, None
            if kind in ("positions", "both", "marks"):
                q_pos, k_pos = pos[:, tk - tq :], pos
            if kind in ("documents", "both"):
                k_doc = _documents(rng, b, tk)
                q_doc = k_doc[:, tk - tq :]
            if kind == "marks":
                window = rng.choice((4, 11))
                k_mark = torch.rand(b, tk, generator=torch.Generator().manual_seed(tk)) < 0.05
            if kind == "contiguous":
                k_pos = rng.randint(0, 30)
                q_pos = k_pos + tk - tq
            yield AttentionMask(pattern, tq, tk, q_pos, k_pos, causal, q_doc, k_doc, window, k_mark), block


def _superset(found, evaluated):
    if len(found) == 1 and len(evaluated) > 1:
        found = found * len(evaluated)
    if len(evaluated) == 1 and len(found) > 1:
        evaluated = evaluated * len(found)
    return len(found) == len(evaluated) and all(f >= e for fr, er in zip(found, evaluated) for f, e in zip(fr, er))


def test_blockwise_blocks_hold_every_block_the_mask_touches():
    n = tight = 0
    for mask, block in _general_masks():
        found, evaluated = _found(mask, block), _evaluated(mask, block)
        assert _superset(found, evaluated), (mask.pattern, mask.causal, block)
        tight += found == evaluated
        n += 1
    assert n == 300 and tight > n // 2  # block ranges are tight for most masks, not merely safe


def test_plans_gather_exactly_the_blocks_the_mask_touches():
    """The plan drops the candidate tiles that hold no allowed pair (evaluated tile by tile)."""
    for mask, block in list(_general_masks())[::3]:
        exact = _as_sets(*sa._drop_empty_tiles(mask, block, *sa.active_kv_blocks(mask, block, "cpu")))
        evaluated = _evaluated(mask, block)
        assert _superset(exact, evaluated) and _superset(evaluated, exact), (mask.pattern, block)
        widest = max(len(blocks) for row in evaluated for blocks in row)
        assert sa.block_plan(mask, block, "cpu").kv_idx.shape[-1] == max(1, widest)


def test_blockwise_blocks_of_a_band_on_contiguous_positions_are_exact():
    """Without the band shortcut, the block-range test alone is exact for a band: every
    constraint is an interval on the index difference, and intervals that meet pairwise meet."""
    for mask, block in _bands():
        if isinstance(mask.pattern, SlidingWindow) and mask.causal and mask.q_pos - mask.k_pos == mask.tk - mask.tq:
            blockwise = _as_sets(*sa._compact(sa._blockwise_active(mask, block, "cpu"), "cpu"))
            assert blockwise == _evaluated(mask, block), (mask, block)


def _inputs(mask, dtype=torch.float64, h=4, hkv=2, dh=8):
    g = torch.Generator().manual_seed(mask.tq * 131 + mask.tk)
    b = max(mask.batch, 2)
    return (torch.randn(b, h, mask.tq, dh, generator=g, dtype=dtype), torch.randn(b, hkv, mask.tk, dh, generator=g, dtype=dtype),
            torch.randn(b, hkv, mask.tk, dh, generator=g, dtype=dtype))


def test_outputs_equal_the_dense_reference():
    masks = list(_general_masks())[::5] + list(_bands())[::17]
    assert len(masks) == 76
    for mask, block in masks:
        q, k, v = _inputs(mask)
        out = sa.block_sparse_attention(q, k, v, mask, block=block)
        assert rel_rms_error(out, sa.sparse_attention_reference(q, k, v, mask)) < 1e-12, (mask.pattern, block)


def test_per_row_document_masks_gather_only_their_documents(monkeypatch):
    """Packed documents with per-row positions: no pair evaluation, and each query block gathers
    the key blocks of its own documents, not every earlier block."""
    monkeypatch.setattr(sa, "evaluated_active_blocks", None)
    b, t, block = 2, 4096, 64
    doc = (torch.arange(t) // 256).expand(b, t)  # documents of 256 tokens
    pos = (torch.arange(t) % 256).expand(b, t)
    mask = AttentionMask(Full(), t, t, pos, pos, True, doc, doc)
    plan = sa.block_plan(mask, block, "cpu")
    assert plan.kv_idx.shape == (b, t // block, 256 // block)
    q, k, v = (torch.randn(b, 2, t, 8, dtype=torch.float64) for _ in range(3))
    ref_rows = slice(256 * 5, 256 * 6)  # one document, by itself
    out = sa.block_sparse_attention(q, k, v, mask, block=block)
    alone = AttentionMask(Full(), 256, 256, 0, 0, True)
    ref = sa.sparse_attention_reference(q[:, :, ref_rows], k[:, :, ref_rows], v[:, :, ref_rows], alone)
    assert rel_rms_error(out[:, :, ref_rows], ref) < 1e-12
