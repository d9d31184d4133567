"""Causal attention for heads that only some queries use (mixture-of-heads routing, layers/moh.py):
each head attends from its selected tokens only, so its work follows the tokens routed to it.

q (B, R, T, D) the routed heads' queries, k, v (B, R, T, D) their keys and values (every token:
any later query may route to the head), sel (B, R, T) bool, which tokens use which head. Returns
(B, R, T, D): each selected token's causal attention output for that head, zeros elsewhere.

Per head, the selected tokens are gathered in position order (padded to the most any (row,
head) has, the padding pointing at token 0 and dropped at the end) and cut into blocks of
`block` selected queries; a block reads the keys up to the last position any of its queries has,
under a causal mask by position. Work: about (selected share) x T^2 / 2 pairs, plus one block of
keys per block; never a T x T mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gather_order(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx (B, R, n), valid (B, R, n)): the selected positions of each (row, head) in
    ascending order, padded with 0 to n = the largest count."""
    count = sel.sum(-1)
    n = int(count.max()) if sel.numel() else 0
    # stable sort of "not selected" puts the selected positions first, in order
    idx = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True)[..., :n]
    valid = torch.arange(n, device=sel.device) < count[..., None]
    return idx.masked_fill(~valid, 0), valid


def block_key_ends(idx: torch.Tensor, valid: torch.Tensor, block: int) -> list[tuple[int, int, int]]:
    """[(first, last + 1, keys)] per block of selected queries: the keys the block reads are the
    positions up to the largest any of its queries has."""
    n = idx.shape[-1]
    out = []
    for a in range(0, n, block):
        e = min(a + block, n)
        keys = int(idx[..., a:e].masked_fill(~valid[..., a:e], 0).max()) + 1
        out.append((a, e, keys))
    return out


def routed_head_attention(q, k, v, sel, scale=None, block: int = 64):
    """See the module doc."""
    b, r, t, d = q.shape
    idx, valid = gather_order(sel)
    if idx.shape[-1] == 0:
        return q.new_zeros(b, r, t, v.shape[-1])
    gather = idx[..., None].expand(-1, -1, -1, d)
    q_sel = q.gather(2, gather)  # (B, R, n, D)
    outs = []
    for a, e, keys in block_key_ends(idx, valid, block):
        mask = torch.arange(keys, device=q.device) <= idx[..., a:e, None]  # (B, R, nb, keys)
        outs.append(F.scaled_dot_product_attention(q_sel[..., a:e, :], k[..., :keys, :], v[..., :keys, :],
                                                   attn_mask=mask, scale=scale))
    o = torch.cat(outs, dim=2) * valid[..., None].to(q.dtype)  # the padding contributes nothing
    return q.new_zeros(b, r, t, v.shape[-1]).scatter_add(2, idx[..., None].expand(-1, -1, -1, v.shape[-1]), o)
