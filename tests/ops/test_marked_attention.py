"""Window + marked-keys attention (SepLLM, attention sinks) against the dense reference: odd
lengths, several query blocks, chunked queries after cached keys, non-contiguous cached
positions, per-row marks, documents, GQA, gradients; and keys used that follow the marks."""

import pytest
import torch

from speedlm.ops.attention import attention, attention_reference
from speedlm.ops.marked_attention import marked_window_attention
from speedlm.ops.masks import AttentionMask, Full
from speedlm.ops.metrics import rel_rms_error


def _qkv(b, h, hkv, tq, tk, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_(grad)  # noqa: E731
    return mk(b, h, tq, 8), mk(b, hkv, tk, 8), mk(b, hkv, tk, 8)


def _marks(b, tk, rate, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, tk, generator=g) < rate


CASES = [  # b, h, hkv, tq, tk, window, mark rate, block
    (2, 4, 2, 45, 45, 7, 0.3, 8),
    (1, 2, 1, 37, 60, 5, 0.2, 16),  # a chunk after 23 cached keys
    (2, 2, 2, 1, 50, 9, 0.5, 128),  # one decoding query
    (2, 4, 1, 70, 70, 1, 0.1, 32),  # window 1: only itself and the marks
    (2, 2, 2, 30, 30, 64, 0.3, 8),  # window longer than the sequence: full causal
]


@pytest.mark.parametrize("form", ["flash", "merged", "sdpa"])
@pytest.mark.parametrize("case", CASES)
def test_matches_the_dense_reference_with_gradients(case, form, monkeypatch):
    """Every path: three fused calls per layer (ops/marked_window_flash.py, contiguous positions),
    the fused CPU kernels per query block merged by log-sum-exp, masked SDPA on gathered keys."""
    import speedlm.ops.marked_attention as ma
    import speedlm.ops.marked_window_flash as mwf

    monkeypatch.setattr(ma, "can_merge", lambda q: form != "sdpa")
    if form == "merged":
        monkeypatch.setattr(ma, "window_flash_applies", lambda q, mask: False)
    monkeypatch.setattr(mwf, "prefix_block", lambda tq: case[-1])  # several prefix blocks at these lengths
    b, h, hkv, tq, tk, w, rate, block = case
    q, k, v = _qkv(b, h, hkv, tq, tk, grad=True)
    mask = AttentionMask(Full(), tq, tk, tk - tq, 0, True, window=w, k_mark=_marks(b, tk, rate))
    fast = marked_window_attention(q, k, v, mask, block=block)
    ref = attention_reference(q, k, v, mask.dense())
    assert rel_rms_error(fast, ref) < 1e-12
    g = torch.randn_like(ref)
    gf = torch.autograd.grad((fast * g).sum(), (q, k, v))
    gr = torch.autograd.grad((ref * g).sum(), (q, k, v))
    for a, r in zip(gf, gr):
        assert rel_rms_error(a, r) < 1e-11


def test_non_contiguous_cached_positions_documents_and_no_marks():
    b, h, tq, tk = 2, 2, 12, 40
    q, k, v = _qkv(b, h, h, tq, tk, seed=3)
    k_pos = torch.cat([torch.tensor([0, 1, 2, 5, 9, 14, 20]), torch.arange(80 - (tk - 7), 80)])[None].expand(b, -1)
    q_pos = k_pos[:, tk - tq :]
    doc = torch.zeros(b, tk, dtype=torch.long)
    doc[1, 30:] = 1
    for marks in (_marks(b, tk, 0.3), None):
        mask = AttentionMask(Full(), tq, tk, q_pos, k_pos, True, doc[:, tk - tq :], doc, window=6, k_mark=marks)
        ref = attention_reference(q, k, v, mask.dense())
        assert rel_rms_error(marked_window_attention(q, k, v, mask, block=5), ref) < 1e-12
        assert rel_rms_error(attention(q, k, v, mask), ref) < 1e-12  # the dispatch picks this form


def test_marks_are_seen_beyond_the_window_and_nothing_else():
    """A key far outside the window changes a query's output iff it is marked."""
    t, w = 40, 4
    q, k, v = _qkv(1, 1, 1, t, t, seed=5)
    marks = torch.zeros(1, t, dtype=torch.bool)
    marks[0, 3] = True
    mask = AttentionMask(Full(), t, t, 0, 0, True, window=w, k_mark=marks)
    y = marked_window_attention(q, k, v, mask, block=8)
    for j, expect_change in ((3, True), (4, False)):
        v2 = v.clone()
        v2[..., j, :] += 1.0
        y2 = marked_window_attention(q, k, v2, mask, block=8)
        changed = (y2 - y).abs().amax(-1)[0, 0]  # per query
        assert bool(changed[j + w :].gt(1e-9).all()) == expect_change
        assert bool(changed[j : j + w].gt(1e-9).all())  # inside the window either way


@pytest.mark.parametrize("fused", [True, False])
def test_keys_used_follow_the_marks_not_the_length(monkeypatch, fused):
    """Each query block attends to about window + block + marked keys, never all T keys, on the
    fused CPU path (two key sets per block) and on the masked-SDPA path (one gathered set)."""
    import speedlm.ops.marked_attention as ma

    widths = []
    real_sdpa, real_merged = ma.F.scaled_dot_product_attention, ma.merged_attention

    def spy_sdpa(q, k, v, **kw):
        widths.append(k.shape[-2])
        return real_sdpa(q, k, v, **kw)

    def spy_merged(q, parts, scale=None):
        widths.append(sum(k.shape[-2] for k, _, _ in parts))
        return real_merged(q, parts, scale)

    monkeypatch.setattr(ma.F, "scaled_dot_product_attention", spy_sdpa)
    monkeypatch.setattr(ma, "merged_attention", spy_merged)
    monkeypatch.setattr(ma, "can_merge", lambda q: fused)
    monkeypatch.setattr(ma, "window_flash_applies", lambda q, mask: False)  # the per-block forms
    t, w, block = 2048, 64, 128
    q, k, v = (x.float() for x in _qkv(1, 1, 1, t, t, seed=7))
    marks = torch.zeros(1, t, dtype=torch.bool)
    marks[0, ::32] = True  # 64 marked keys
    marked_window_attention(q, k, v, AttentionMask(Full(), t, t, 0, 0, True, window=w, k_mark=marks), block=block)
    assert len(widths) == t // block and max(widths) <= 64 + w + block
