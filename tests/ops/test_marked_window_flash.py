"""Window + marked keys as a few fused flash calls per layer (ops/marked_window_flash.py): the
dense float64 reference with gradients on odd lengths, GQA, per-row marks, a chunk after cached
keys, rows that see nothing; the pairs the kernel executes against the pairs the mask keeps; and
what autograd keeps for the backward (no gathered copy of the marked keys)."""

import pytest
import torch

import speedlm.ops.marked_window_flash as mwf
from speedlm.ops.attention import attention, attention_reference
from speedlm.ops.marked_window_flash import applies, marked_window_flash
from speedlm.ops.masks import AttentionMask, Full
from speedlm.ops.metrics import rel_rms_error

CASES = [  # b, h, hkv, tq, tk, q_pos, window, mark rate, prefix block
    (2, 4, 2, 45, 45, 0, 7, 0.3, 8),  # GQA, per-row marks, several prefix blocks
    (1, 2, 1, 37, 60, 23, 5, 0.2, 16),  # a chunk after 23 cached keys
    (2, 4, 1, 70, 70, 0, 1, 0.1, 32),  # window 1: only itself and the marks
    (2, 2, 2, 30, 30, 0, 64, 0.3, 8),  # window longer than the sequence: full causal
    (1, 3, 3, 53, 53, 0, 9, 0.0, 16),  # no marks: the band alone
    (1, 2, 2, 41, 41, 0, 6, 1.0, 7),  # every key marked: the staircase and prefix alone
    (2, 2, 1, 33, 50, 10, 4, 0.4, 8),  # queries at positions before the cache's end (lead < shift)
]


def _case(b, h, hkv, tq, tk, q_pos, w, rate, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, tq, 8, generator=g, dtype=dtype).requires_grad_()
    k, v = (torch.randn(b, hkv, tk, 8, generator=g, dtype=dtype).requires_grad_() for _ in range(2))
    marks = torch.rand(b, tk, generator=g) < rate if rate else None
    return q, k, v, AttentionMask(Full(), tq, tk, q_pos, 0, True, window=w, k_mark=marks)


@pytest.mark.parametrize("case", CASES)
def test_matches_the_dense_reference_with_gradients(case, monkeypatch):
    *shape, block = case
    monkeypatch.setattr(mwf, "prefix_block", lambda tq: block)
    q, k, v, mask = _case(*shape)
    assert applies(q, mask)
    dense = mask.dense()
    seen = dense.any(-1, keepdim=True)[:, None]
    group = q.shape[1] // k.shape[1]
    ref = attention_reference(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                              (dense[:, None] | ~seen).squeeze(1)) * seen
    fast = marked_window_flash(q, k, v, mask)
    assert rel_rms_error(fast, ref) < 1e-12
    g = torch.randn_like(ref)
    for a, r in zip(torch.autograd.grad((fast * g).sum(), (q, k, v)), torch.autograd.grad((ref * g).sum(), (q, k, v))):
        assert torch.isfinite(a).all() and rel_rms_error(a, r) < 1e-11


def test_non_contiguous_inputs_as_the_projections_give_them():
    """q, k, v as (B, T, H, D) projections transposed to (B, H, T, D): strided views."""
    q, k, v, mask = _case(1, 4, 2, 50, 50, 0, 6, 0.3, seed=6)
    qt, kt, vt = (x.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for x in (q, k, v))
    assert not kt.is_contiguous()
    out = marked_window_flash(qt, kt, vt, mask)
    ref = marked_window_flash(q, k, v, mask)
    assert rel_rms_error(out, ref) < 1e-14
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), (qt, kt, vt)), torch.autograd.grad((ref * g).sum(), (q, k, v))
    for a, r in zip(*grads):
        assert rel_rms_error(a, r) < 1e-14


def test_float32_and_the_dispatch():
    q, k, v, mask = _case(1, 4, 2, 300, 300, 0, 32, 0.35, seed=3)
    ref = attention_reference(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), mask.dense())
    q32, k32, v32 = (x.detach().float() for x in (q, k, v))
    assert rel_rms_error(attention(q32, k32, v32, mask).double(), ref) < 1e-5


def _executed_pairs(monkeypatch, q, k, v, mask):
    pairs = []
    real = mwf._FLASH

    def spy(q, k, v, **kw):
        pairs.append(q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] // k.shape[0] // k.shape[1] * k.shape[1])
        return real(q, k, v, **kw)

    monkeypatch.setattr(mwf, "_FLASH", spy)
    marked_window_flash(q, k, v, mask)
    return sum(pairs), len(pairs)


def test_executed_pairs_follow_the_kept_keys(monkeypatch):
    """At 2k tokens, window 64, 35 % marks (sepllm's text): the kernel runs at most 1.3x the
    query-key pairs the mask keeps, in a handful of calls, never T x T."""
    t = 2048
    assert mwf.prefix_block(t) == 256
    q, k, v, mask = _case(1, 1, 1, t, t, 0, 64, 0.35, seed=4, dtype=torch.float32)
    executed, calls = _executed_pairs(monkeypatch, q.detach(), k.detach(), v.detach(), mask)
    kept = int(mask.dense().sum())
    assert kept <= executed <= 1.2 * kept, executed / kept
    assert calls <= t // 32  # runs of blocks, not a call per query
    assert executed < 0.5 * t * t


def test_the_backward_keeps_what_full_attention_keeps():
    """Saved for the backward: q, k, v, the output and its log-sum-exp; no gathered marked keys
    and no masks (sepllm-small's head shape, 35 % marks)."""
    t = 2048
    q, k, v, mask = _case(1, 8, 8, t, t, 0, 128, 0.35, seed=5, dtype=torch.float32)
    storages = {}

    def pack(x):
        storages[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        marked_window_flash(q, k, v, mask)
    assert sum(storages.values()) <= 4 * q.numel() * 4 + 8 * t * 4
