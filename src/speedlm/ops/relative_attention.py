"""Transformer-XL attention (Dai et al. 2019, arXiv:1901.02860): relative positional encoding
with the u and v biases, under the segment-memory rule, and its float64 reference.

Scores (per head, scaled by 1/sqrt(Dh)):

    (q_i + u) . k_j          content, and a global content bias u
  + (q_i + v) . r_{i - j}    position: r_d = W_r s_d, s_d the sinusoid of distance d

Segment memory: with segments of L positions and a memory of M, a query at position p sees
the keys from floor(p / L) * L - M (the last M positions before its segment: the previous
segment's states, cached) up to itself. The rule is on absolute positions, so one pass over a
long sequence, segment-by-segment training with a carried cache, and token-by-token decoding
all see the same keys; a query never looks back further than M + L - 1 positions.

The fast form runs query blocks against the M + L + block - 1 keys their rule can reach (a
banded computation: O(T (M + L)), no T x T mask) and gathers the position term from one
(queries x distances) product: Transformer-XL's "relative shift" as a gather.
"""

from __future__ import annotations

import torch

from speedlm.ops.chunking import band_windows


def sinusoid(distances: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer-XL's relative position embedding: [sin(d w), cos(d w)], w = 10000^(-2i/dim)."""
    inv = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=distances.device) / dim)
    angle = distances.to(torch.float64)[..., None] * inv
    return torch.cat([angle.sin(), angle.cos()], dim=-1)


def first_visible(q_pos: torch.Tensor, segment: int, memory: int) -> torch.Tensor:
    """The earliest position a query at q_pos may see: the start of its segment minus memory."""
    return torch.div(q_pos, segment, rounding_mode="floor") * segment - memory


def relative_attention(q, k, v, rel, u, vb, q_pos, k_pos, segment: int, memory: int, q_doc=None, k_doc=None,
                       block: int = 64) -> torch.Tensor:
    """q (B, H, Tq, Dh) are the last Tq of the keys k, v (B, Hkv, Tk, Dh); rel (H, M + L, Dh) the
    projected position embeddings of distances 0..M+L-1; u, vb (H, Dh); q_pos (B|1, Tq) and
    k_pos (B|1, Tk) long positions; q_doc/k_doc optional document ids -> (B, H, Tq, Dv)."""
    b, h, tq, dh = q.shape
    hkv, tk = k.shape[1], k.shape[-2]
    if hkv != h:  # GQA: each query head reads its group's keys
        k, v = (z.repeat_interleave(h // hkv, dim=1) for z in (k, v))
    reach = rel.shape[1]  # M + L: no visible key is further back than reach - 1
    block = min(block, tq)
    nb = -(-tq // block)
    size = block + reach - 1
    off = tk - tq  # query i is key off + i
    scale = dh**-0.5

    qp = torch.cat([q, q.new_zeros(b, h, nb * block - tq, dh)], dim=2).view(b, h, nb, block, dh)
    before = reach - 1 - off  # key window of block n starts at key index n * block + off - (reach - 1)
    kw = band_windows(k, before, size, block, nb, 0.0) if before >= 0 else band_windows(k[..., -before:, :], 0, size, block, nb, 0.0)
    vw = band_windows(v, before, size, block, nb, 0.0) if before >= 0 else band_windows(v[..., -before:, :], 0, size, block, nb, 0.0)
    trim = max(0, -before)
    k_idx = torch.arange(tk, device=q.device)[None]
    win = lambda z, fill: band_windows(z[:, trim:, None], max(0, before), size, block, nb, fill)[..., 0]  # noqa: E731
    kidx_w = win(k_idx, -1)  # (1, nb, size): key index of each window slot (-1: none)
    kpos_w = win(k_pos, -(2**62))
    qpos = torch.cat([q_pos, q_pos.new_zeros(q_pos.shape[0], nb * block - tq)], 1).view(-1, nb, block, 1)
    qidx = (off + torch.arange(nb * block, device=q.device)).view(1, nb, block, 1)

    dist = qpos - kpos_w[:, :, None, :]  # (B|1, nb, block, size)
    visible = (kidx_w[:, :, None, :] >= 0) & (kidx_w[:, :, None, :] <= qidx) & (qidx < tk)
    visible = visible & (kpos_w[:, :, None, :] >= first_visible(qpos, segment, memory))
    if q_doc is not None:
        qd = torch.cat([q_doc, q_doc.new_full((q_doc.shape[0], nb * block - tq), -1)], 1).view(-1, nb, block, 1)
        visible = visible & (qd == win(k_doc, -2)[:, :, None, :])

    content = torch.einsum("bhnqd,bhnkd->bhnqk", qp + u[:, None, None, :], kw)
    by_distance = torch.einsum("bhnqd,hrd->bhnqr", qp + vb[:, None, None, :], rel)
    position = by_distance.gather(-1, dist.clamp(0, reach - 1)[:, None].expand(b, h, nb, block, size))
    # padding query rows see nothing: let them see everything (they are dropped), so that no row
    # is all -inf; -inf rather than a large finite mask value, whose exp takes a slow CPU path
    visible = visible | ~visible.any(-1, keepdim=True)
    scores = ((content + position) * scale).masked_fill(~visible[:, None], float("-inf"))
    out = torch.einsum("bhnqk,bhnkd->bhnqd", torch.softmax(scores, dim=-1), vw)
    return out.reshape(b, h, nb * block, -1)[:, :, :tq]


def relative_attention_reference(q, k, v, r_weight, u, vb, pos, segment: int, memory: int, doc=None) -> torch.Tensor:
    """Naive dense form for tests: q, k, v (B, H, T, Dh) (KV heads already expanded), r_weight
    (H * Dh, D) the position projection, pos (B|1, T); the mask of the rule, the position term
    from the sinusoid of every pair's distance."""
    b, h, t, dh = q.shape
    dist = pos[:, :, None] - pos[:, None, :]  # (B|1, T, T)
    r = torch.einsum("bqkd,ed->bqke", sinusoid(dist.clamp(min=0), r_weight.shape[1]).to(q.dtype), r_weight)
    r = r.view(*r.shape[:3], h, dh)
    content = torch.einsum("bhqd,bhkd->bhqk", q + u[:, None, :], k)
    position = torch.einsum("bhqd,bqkhd->bhqk", q + vb[:, None, :], r.expand(b, -1, -1, -1, -1))
    idx = torch.arange(t, device=q.device)
    allowed = (idx[None, :] <= idx[:, None]) & (pos[:, None, :] >= first_visible(pos, segment, memory)[:, :, None])
    if doc is not None:
        allowed = allowed & (doc[:, :, None] == doc[:, None, :])
    scores = ((content + position) / dh**0.5).masked_fill(~allowed[:, None], -float("inf"))
    return torch.softmax(scores, dim=-1) @ v
