"""Forgetting attention (FoX, Lin et al. 2025, arXiv:2503.02130): causal softmax attention whose
logits carry a data-dependent decay,

    o_i = sum_{j <= i} softmax_j(q_i . k_j * scale + c_i - c_j) v_j,   c_t = sum_{l <= t} log f_l

with f_t in (0, 1] a forget gate per head and token (so c is non-increasing and the bias
c_i - c_j <= 0 is the log of the product of the gates between key and query).

The fast form never builds the (T, T) bias. Within a row, c_i is a constant, which softmax
ignores: the bias is a per-key term -c_j, and a per-key term is one more channel of the dot
product, q' = [q * scale, 1], k' = [k, r - c_j], for any constant r. So SDPA's fused kernels
run it unchanged (flash / memory-efficient, their own backward). r is chosen per block of
queries, as c at the block's last query: the keys a query can weigh (those not yet forgotten)
then have a small |r - c_j|, which keeps the extra channel exact to float32's precision
however long the sequence (a global r would add |c_T|, thousands of nats, to every logit).
Blocks cost one SDPA call each over the keys up to their last query (causal, lower-right
aligned), and one copy of those keys with the extra channel: O(T^2 / block) copies next to the
O(T^2) attention. The extra channel is why this op computes in float32 at least: a bfloat16
channel would round a bias of 10 nats by 0.04.

q (B, H, Tq, D); k, v (B, Hkv, Tk, D), the queries being the last Tq of the Tk keys; c_q
(B, H, Tq) and c_k (B, H, Tk): the cumulative log gates of the queries' and keys' positions
(per query head: with GQA the keys are repeated to the query heads for the extra channel).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from speedlm.ops.attention import causal_mask, repeat_kv
from speedlm.ops.common import query_scale


def forgetting_attention_reference(q, k, v, c_q, c_k, scale=None):
    """Dense: softmax(q k^T scale + c_i - c_j, causal) v; run it in float64."""
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    scale = query_scale(q, scale)
    tq, tk = q.shape[-2], k.shape[-2]
    scores = (q @ k.transpose(-1, -2)) * scale + c_q[..., :, None] - c_k[..., None, :]
    scores = scores.masked_fill(~causal_mask(tq, tk, q.device), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def _pad_to(x: torch.Tensor, width: int) -> torch.Tensor:
    return x if x.shape[-1] == width else F.pad(x, (0, width - x.shape[-1]))


def forgetting_attention(q, k, v, c_q, c_k, scale=None, block_size: int = 256):
    """The fused form (module doc): per block of queries, SDPA on the keys up to its last query
    with the forget bias as one more key channel. Returns (B, H, Tq, D) in q's dtype."""
    out_dtype = q.dtype
    dt = torch.promote_types(q.dtype, torch.float32)
    scale = query_scale(q, scale)
    groups = q.shape[1] // k.shape[1]
    q, k, v = q.to(dt), repeat_kv(k, groups).to(dt), repeat_kv(v, groups).to(dt)
    c_q, c_k = c_q.to(dt), c_k.to(dt)
    tq, tk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    width = d + 1
    if q.is_cuda:
        width = -(-width // 8) * 8  # the flash kernel's head widths
    ones = q.new_ones(*q.shape[:-1], 1)
    q_ext = _pad_to(torch.cat([q * scale, ones], dim=-1), width)
    v_ext = _pad_to(v, width)  # the fused kernels take one head width for q, k and v
    offset = tk - tq
    outs = []
    for a in range(0, tq, block_size):
        e = min(a + block_size, tq)
        keys = offset + e
        r = c_q[..., e - 1 : e]  # (B, H, 1)
        k_ext = _pad_to(torch.cat([k[..., :keys, :], (r - c_k[..., :keys])[..., None]], dim=-1), width)
        qb = q_ext[..., a:e, :]
        mask = None if e - a == 1 else causal_mask(e - a, keys, q.device)  # one query sees every key
        outs.append(F.scaled_dot_product_attention(qb, k_ext, v_ext[..., :keys, :], attn_mask=mask, scale=1.0))
    return torch.cat(outs, dim=-2)[..., :d].to(out_dtype)
