"""Several key sets through the fused CPU flash kernel, merged by log-sum-exp: the union's exact
attention (float64 reference, gradients), rows that see nothing, grouped-query heads, and the
memory it keeps for the backward."""

import torch

from speedlm.ops.attention import attention_reference
from speedlm.ops.marked_attention import marked_window_attention
from speedlm.ops.masks import AttentionMask, Full
from speedlm.ops.merged_attention import merged_attention
from speedlm.ops.metrics import rel_rms_error


def _parts(b, h, hkv, tq, sizes, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, tq, 8, generator=g, dtype=dtype).requires_grad_()
    parts = []
    for n in sizes:
        k = torch.randn(b, hkv, n, 8, generator=g, dtype=dtype).requires_grad_()
        v = torch.randn(b, hkv, n, 8, generator=g, dtype=dtype).requires_grad_()
        parts.append((k, v, torch.rand(b, 1, tq, n, generator=g) < 0.4))
    return q, parts


def _dense(q, parts):
    """The union as one key set, through the float64 reference (rows that see nothing give 0)."""
    k = torch.cat([p[0] for p in parts], dim=-2)
    v = torch.cat([p[1] for p in parts], dim=-2)
    allowed = torch.cat([p[2].expand(-1, -1, q.shape[2], -1) for p in parts], dim=-1)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    seen = allowed.any(-1, keepdim=True)
    return attention_reference(q, k, v, allowed | ~seen) * seen


def test_the_merge_is_the_unions_attention_with_gradients():
    for h, hkv in ((4, 4), (4, 2), (6, 1)):
        q, parts = _parts(2, h, hkv, 19, (7, 30, 1, 9))
        k, v, m = parts[3]
        parts[3] = (k, v, m[:, :, :1])  # one row that every query shares: broadcast by the kernel
        parts[0][2][:, :, 3] = False  # row 3 sees nothing in the first part
        for p in parts[:3]:
            p[2][:, :, 5] = False  # row 5 sees nothing but the shared part
        fast, ref = merged_attention(q, parts), _dense(q, parts)
        assert rel_rms_error(fast, ref) < 1e-12
        g = torch.randn_like(ref)
        inputs = [q] + [t for k, v, _ in parts for t in (k, v)]
        for a, r in zip(torch.autograd.grad((fast * g).sum(), inputs), torch.autograd.grad((ref * g).sum(), inputs)):
            assert torch.isfinite(a).all() and rel_rms_error(a, r) < 1e-11


def test_a_row_that_sees_nothing_outputs_zero_with_finite_gradients():
    q, parts = _parts(1, 2, 1, 6, (5, 4), seed=2)
    for _, _, m in parts:
        m[:, :, 2] = False
    fast = merged_attention(q, parts)
    assert fast[:, :, 2].abs().max() == 0 and rel_rms_error(fast, _dense(q, parts)) < 1e-12
    grads = torch.autograd.grad(fast.sum(), [q] + [t for k, v, _ in parts for t in (k, v)])
    assert all(torch.isfinite(g).all() for g in grads) and grads[0][:, :, 2].abs().max() == 0


def test_float32_matches_the_float64_reference():
    q, parts = _parts(1, 2, 2, 33, (40, 12), seed=3)
    q32 = q.detach().float()
    parts32 = [(k.detach().float(), v.detach().float(), m) for k, v, m in parts]
    assert rel_rms_error(merged_attention(q32, parts32).double(), _dense(q, parts)) < 1e-5


def test_the_fused_path_keeps_no_copy_of_each_blocks_keys():
    """What autograd keeps for the backward: the masked-SDPA path holds every block's gathered
    keys; the fused path holds views of the keys, one gathered copy of the marked ones, and the
    blocks' boolean masks (sepllm-small's head shape, 35 % marked keys)."""
    import speedlm.ops.marked_attention as ma

    t = 2048
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, t, 64, generator=g).requires_grad_() for _ in range(3))
    mask = AttentionMask(Full(), t, t, 0, 0, True, window=64, k_mark=torch.rand(1, t, generator=g) < 0.35)
    kept = {}
    for fused in (True, False):
        storages = {}

        def pack(x, _s=storages):
            _s[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
            return x

        ma_can_merge = ma.can_merge
        ma.can_merge = lambda q, _f=fused: _f
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
                marked_window_attention(q, k, v, mask)
        finally:
            ma.can_merge = ma_can_merge
        kept[fused] = sum(storages.values())
    qkv = 3 * q.numel() * 4
    assert kept[True] < qkv + 0.5 * (kept[False] - qkv)  # at 16k: 8.3 GB -> BENCHMARKS
