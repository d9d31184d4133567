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

from dataclasses import dataclass

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


@dataclass(frozen=True)
class BandLayout:
    """Where a band's queries and keys sit in blocks: block i holds queries i * block + [0, block)
    and reads the key window i * block + lo + [0, span). Shared by the SDPA form below and the
    log-sum-exp form of ops/marked_window_flash.py, which runs the same blocks through the flash
    kernel directly."""

    tq: int
    tk: int
    lo: int
    width: int
    block: int
    nb: int

    @classmethod
    def of(cls, tq: int, tk: int, lo: int, hi: int, block: int | None = None) -> "BandLayout":
        width = hi - lo + 1
        block = band_block(width) if block is None else block
        nb = -(-tq // block)
        return cls(tq, tk, lo, width, -(-tq // nb), nb)  # the same blocks, as little padding as they allow

    @property
    def span(self) -> int:
        return self.block + self.width - 1

    def windows(self, k: torch.Tensor, first: int = 0, n: int | None = None) -> torch.Tensor:
        """k (B, Hkv, Tk, D) -> the key windows of blocks first .. first + n - 1 as (B Hkv, n, span,
        D): views of k where they lie inside it (the interior), a padded copy of just their keys
        where they reach past either end."""
        n = self.nb - first if n is None else n
        a = first * self.block + self.lo
        z = a + (n - 1) * self.block + self.span
        if a < 0 or z > self.tk:
            k = F.pad(k[..., max(a, 0) : min(z, self.tk), :], (0, 0, max(0, -a), max(0, z - self.tk)))
        else:
            k = k[..., a:z, :]
        return k.unfold(2, self.span, self.block).transpose(-1, -2).flatten(0, 1)

    def fold_windows(self, g: torch.Tensor, blocks: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Adds per-window gradients g (B Hkv, len(blocks), span, D) of the windows `blocks` onto
        the keys' gradient `out` (B, Hkv, Tk, D), in place; returns it."""
        idx = (blocks[:, None] * self.block + self.lo + torch.arange(self.span, device=g.device)).flatten()
        flat, g = out.view(-1, self.tk, out.shape[-1]), g.flatten(1, 2)
        keep = (idx >= 0) & (idx < self.tk)
        if not bool(keep.all()):  # an edge window past the keys: its padding's gradients go nowhere
            idx, g = idx[keep], g[:, keep]
        flat.index_add_(1, idx, g)
        return out

    def blocks(self, x: torch.Tensor, hkv: int, first: int = 0, n: int | None = None) -> torch.Tensor:
        """x (B, H, Tq, ...) -> its blocks first .. first + n - 1 as (B Hkv, n, groups * block, ...):
        a key-value head's query groups as one block of rows, padded past Tq."""
        n = self.nb - first if n is None else n
        b, h = x.shape[:2]
        rest = x.shape[3:]
        a, z = first * self.block, (first + n) * self.block
        x = x[:, :, a:z]
        if z > self.tq:
            x = torch.cat([x, x.new_zeros(b, h, z - max(a, self.tq), *rest)], dim=2)
        x = x.reshape(b, hkv, h // hkv, n, self.block, *rest).transpose(2, 3)
        return x.reshape(b * hkv, n, (h // hkv) * self.block, *rest)

    def unblock(self, x: torch.Tensor, b: int, h: int, first: int = 0) -> torch.Tensor:
        """The inverse of `blocks`: (B Hkv, n, groups * block, ...) -> (B, H, rows, ...), the rows
        of blocks first .. first + n - 1 that are queries."""
        hkv, n = x.shape[0] // b, x.shape[1]
        rest = x.shape[3:]
        x = x.view(b, hkv, n, h // hkv, self.block, *rest).transpose(2, 3)
        rows = min(self.tq, (first + n) * self.block) - first * self.block
        return x.reshape(b, h, n * self.block, *rest)[:, :, :rows]

    def rows(self, first: int, n: int) -> slice:
        """The query rows of blocks first .. first + n - 1."""
        return slice(first * self.block, min(self.tq, (first + n) * self.block))

    def band(self, device) -> torch.Tensor:
        """(block, span) bool: the band, the same in every block."""
        offset = torch.arange(self.span, device=device)[None, :] - torch.arange(self.block, device=device)[:, None]
        return (offset >= 0) & (offset < self.width)

    def inside(self, device) -> torch.Tensor:
        """(nb,) bool: blocks whose whole window and queries exist (the rest are the edges)."""
        first = torch.arange(self.nb, device=device) * self.block + self.lo
        return (first >= 0) & (first + self.span <= self.tk) & (first - self.lo + self.block <= self.tq)

    def edge_mask(self, edges: torch.Tensor) -> torch.Tensor:
        """(E, block, span) bool: the exact masks of the edge blocks `edges`."""
        dev = edges.device
        key_idx = edges[:, None, None] * self.block + self.lo + torch.arange(self.span, device=dev)
        q_idx = edges[:, None, None] * self.block + torch.arange(self.block, device=dev)[:, None]
        return self.band(dev) & (key_idx >= 0) & (key_idx < self.tk) & (q_idx < self.tq)


def band_attention(q, k, v, lo: int, hi: int, scale: float | None = None, block: int | None = None):
    """q (B, H, Tq, Dh), k/v (B, Hkv, Tk, Dh); query i sees keys i + lo .. i + hi that exist."""
    bsz, h = q.shape[:2]
    hkv = k.shape[1]
    groups = h // hkv
    lay = BandLayout.of(q.shape[2], k.shape[2], lo, hi, block)
    # 4-d calls, (B Hkv, blocks, rows, Dh): SDPA on CPU runs its fused flash kernel only on 4-d
    # inputs (5-d ones fall back to the math path, which materialises every block's scores)
    q_b, k_win, v_win = lay.blocks(q, hkv), lay.windows(k), lay.windows(v)
    out = q_b.new_empty(bsz * hkv, lay.nb, groups * lay.block, v.shape[-1])
    inside = lay.inside(q.device)
    mid = inside.nonzero().flatten()
    if mid.numel():
        lo_b, hi_b = int(mid[0]), int(mid[-1]) + 1  # the interior blocks are one run
        out[:, lo_b:hi_b] = F.scaled_dot_product_attention(
            q_b[:, lo_b:hi_b], k_win[:, lo_b:hi_b], v_win[:, lo_b:hi_b], attn_mask=lay.band(q.device).repeat(groups, 1),
            scale=scale)
    edges = (~inside).nonzero().flatten()
    if edges.numel():
        allowed = lay.edge_mask(edges)
        seen = allowed.any(-1, keepdim=True)
        allowed = (allowed | ~seen).repeat(1, groups, 1)
        o = F.scaled_dot_product_attention(q_b[:, edges], k_win[:, edges], v_win[:, edges], attn_mask=allowed,
                                           scale=scale)
        out[:, edges] = o * seen.repeat(1, groups, 1).to(o.dtype)
    return lay.unblock(out, bsz, h)


__all__ = ["MAX_EXCESS", "BandLayout", "band_attention", "band_block"]
