"""Rotary position embedding (Su et al. 2021, arXiv:2104.09864), on absolute positions.

Layout: the half-split (GPT-NeoX / Llama in Hugging Face) form. Channel i of the first half
and channel i of the second half form the pair rotated by angle pos * theta^(-2i/Dh), i.e.
(x1 + i x2) * e^{i pos w_i} as a complex number.
"""

import torch

from speedlm.ops.caches import register


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (*positions.shape, head_dim / 2) for integer positions. The angles are
    computed in float64 so positions far beyond 2^11 stay exact; callers cast."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float64) / head_dim)
    ang = positions.to(torch.float64)[..., None] * inv_freq
    return ang.cos(), ang.sin()


# Tables of cos/sin for positions 0..N-1 per (head_dim, theta, device, dtype), grown by doubling
# up to _MAX_TABLE positions, so a decode step slices instead of recomputing its angles; positions
# beyond (long streams) are computed directly.
_TABLES: dict = {}
_MAX_TABLE = 1 << 15
register("rope.tables", _TABLES.clear, lambda: len(_TABLES))


def rope_table(start: int, length: int, head_dim: int, theta: float, device, dtype=torch.float64):
    """cos, sin (T, head_dim / 2) for positions start .. start+length-1 in `dtype`, shared by every
    layer and every step (angles computed in float64, then cast once)."""
    end = start + length
    if end > _MAX_TABLE:
        cos, sin = rope_angles(torch.arange(start, end, device=device), head_dim, theta)
        return cos.to(dtype), sin.to(dtype)
    key = (head_dim, theta, str(device), dtype)
    table = _TABLES.get(key)
    if table is None or table[0].shape[0] < end:
        size = min(_MAX_TABLE, max(4096, 2 * end))
        cos, sin = rope_angles(torch.arange(size, device=device), head_dim, theta)
        table = _TABLES[key] = (cos.to(dtype), sin.to(dtype))
    return table[0][start:end], table[1][start:end]


def rope_for(positions, length: int, head_dim: int, theta: float, device, dtype=torch.float64):
    """cos, sin broadcastable against (B, H, T, head_dim / 2): positions is an int start
    (-> (T, Dh/2), from the shared table) or a (B, T) tensor (-> (B, 1, T, Dh/2))."""
    if isinstance(positions, int):
        return rope_table(positions, length, head_dim, theta, device, dtype)
    cos, sin = rope_angles(positions, head_dim, theta)
    return cos[:, None].to(dtype), sin[:, None].to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, Dh): rotate pairs (x[..., :Dh/2], x[..., Dh/2:]) (the GPT-NeoX layout)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    if cos.dtype != x.dtype:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def rope_reference(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """The same rotation written as complex multiplication, for references: x (B, H, T, Dh),
    positions (B or 1, T). Pairs (x[i], x[i + Dh/2]) are the complex numbers x[i] + j x[i + Dh/2]."""
    half = x.shape[-1] // 2
    freq = theta ** (-torch.arange(half, dtype=torch.float64, device=x.device) * 2 / x.shape[-1])
    angle = positions.to(torch.float64)[:, None, :, None] * freq  # (B, 1, T, Dh/2)
    z = torch.complex(x[..., :half].double(), x[..., half:].double()) * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([z.real, z.imag], dim=-1).to(x.dtype)
