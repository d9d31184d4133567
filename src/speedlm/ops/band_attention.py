"""Band attention: query i sees the key indices i + lo .. i + hi (a sliding window, causal or
both-sided, on contiguous positions), executed at close to the pairs it counts.

The gathered-block plan (ops/sparse_attention.py) reads whole 64-key blocks: a 64-query block
under a 32-key causal window read 128 keys, 4x the pairs the window has. Here every block of
`block` queries reads exactly the keys its queries reach, block + (hi - lo) of them, as one
strided view of the keys (`unfold`: overlapping windows, no gather), and all blocks run in one
SDPA call whose mask is the same band for every block: one (block x span) boolean broadcast over
the blocks and heads, never a per-block or T x T mask. Each query then reads
(block + width - 1) keys for the width = hi - lo + 1 it sees: the block is sized to keep that
at most `MAX_EXCESS` x the width.

The few blocks whose span leaves 0 .. Tk - 1 (the first queries of a causal window, the last of a
both-sided one, padding past Tq) run in a second call with their exact masks; rows there that
see no key output 0, as everywhere in ops/.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# executed keys per query / keys in the band, at most, away from the ends; the ramps at the ends
# (and padding to whole blocks) add up to ~0.15 at 256 tokens, and the bound is 1.5x
# (tests/layers/test_flop_convention.py measures it with FlopCounterMode)
MAX_EXCESS = 1.3
MIN_BLOCK = 8  # below this, the kernel's per-tile overhead outweighs the pairs saved


def band_block(width: int) -> int:
    """Queries per block for a band of `width` keys: block + width - 1 <= MAX_EXCESS * width."""
    return max(MIN_BLOCK, int(MAX_EXCESS * width) - width + 1)


def band_attention(q, k, v, lo: int, hi: int, scale: float | None = None, block: int | None = None):
    """q (B, H, Tq, Dh), k/v (B, Hkv, Tk, Dh); query i sees keys i + lo .. i + hi that exist."""
    bsz, h, tq, dh = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    groups = h // hkv
    width = hi - lo + 1
    block = band_block(width) if block is None else block
    nb = -(-tq // block)
    block = -(-tq // nb)  # the same number of blocks, as little padding as they allow
    span = block + width - 1
    # keys padded so that block i's span, key indices i * block + lo + [0, span), is a window of kp
    left = max(0, -lo)
    right = max(0, (nb - 1) * block + lo + span - tk)
    start = lo + left  # index in kp of block 0's first key
    kp = F.pad(k, (0, 0, left, right))[..., start:, :]
    vp = F.pad(v, (0, 0, left, right))[..., start:, :]
    k_win = kp.unfold(2, span, block).transpose(-1, -2)[:, :, :nb]  # (B, Hkv, nb, span, Dh), views
    v_win = vp.unfold(2, span, block).transpose(-1, -2)[:, :, :nb]
    # the group's queries of one key-value head as one block: (B, Hkv, nb, groups * block, Dh)
    q_pad = F.pad(q, (0, 0, 0, nb * block - tq))
    q_b = q_pad.view(bsz, hkv, groups, nb, block, dh).permute(0, 1, 3, 2, 4, 5).reshape(bsz, hkv, nb, groups * block, dh)

    rows = torch.arange(block, device=q.device)
    cols = torch.arange(span, device=q.device)
    offset = cols[None, :] - rows[:, None]  # key index - query index - lo
    band = (offset >= 0) & (offset < width)  # (block, span): the same in every block
    first = torch.arange(nb, device=q.device) * block + lo  # key index of each block's span start
    inside = (first >= 0) & (first + span <= tk) & (torch.arange(nb, device=q.device) * block + block <= tq)
    # 4-d calls, (B Hkv, blocks, rows, Dh): SDPA on CPU runs its fused flash kernel only on 4-d
    # inputs (5-d ones fall back to the math path, which materialises every block's scores)
    q_b, k_win, v_win = q_b.flatten(0, 1), k_win.flatten(0, 1), v_win.flatten(0, 1)
    out = q_b.new_empty(bsz * hkv, nb, groups * block, v.shape[-1])
    mid = inside.nonzero().flatten()
    if mid.numel():
        lo_b, hi_b = int(mid[0]), int(mid[-1]) + 1  # the interior blocks are one run
        out[:, lo_b:hi_b] = F.scaled_dot_product_attention(
            q_b[:, lo_b:hi_b], k_win[:, lo_b:hi_b], v_win[:, lo_b:hi_b], attn_mask=band.repeat(groups, 1), scale=scale)
    edges = (~inside).nonzero().flatten()
    if edges.numel():
        key_idx = first[edges, None, None] + cols  # (E, 1, span)
        q_idx = edges[:, None, None] * block + rows[:, None]  # (E, block, 1)
        allowed = band & (key_idx >= 0) & (key_idx < tk) & (q_idx < tq)  # (E, block, span)
        seen = allowed.any(-1, keepdim=True)
        allowed = (allowed | ~seen).repeat(1, groups, 1)
        o = F.scaled_dot_product_attention(q_b[:, edges], k_win[:, edges], v_win[:, edges], attn_mask=allowed,
                                           scale=scale)
        out[:, edges] = o * seen.repeat(1, groups, 1).to(o.dtype)
    out = out.view(bsz, hkv, nb, groups, block, -1).permute(0, 1, 3, 2, 4, 5).reshape(bsz, h, nb * block, -1)
    return out[:, :, :tq]


__all__ = ["MAX_EXCESS", "band_attention", "band_block"]
