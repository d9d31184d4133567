"""Rotary position embedding (Su et al. 2021, arXiv:2104.09864), on absolute positions.

Layout: the half-split (GPT-NeoX / Llama in Hugging Face) form. Channel i of the first half
and channel i of the second half form the pair rotated by angle pos * theta^(-2i/Dh), i.e.
(x1 + i x2) * e^{i pos w_i} as a complex number.
"""

import functools

import torch


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (*positions.shape, head_dim / 2) for integer positions. The angles are
    computed in float64 so positions far beyond 2^11 stay exact; callers cast."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float64) / head_dim)
    ang = positions.to(torch.float64)[..., None] * inv_freq
    return ang.cos(), ang.sin()


@functools.lru_cache(maxsize=8)  # small: a long-context table is MBs; decoding needs one per step
def rope_table(start: int, length: int, head_dim: int, theta: float, device: torch.device):
    """cos, sin (T, head_dim / 2) for positions start .. start+length-1, shared by every layer
    of one forward."""
    return rope_angles(torch.arange(start, start + length, device=device), head_dim, theta)


def rope_for(positions, length: int, head_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin broadcastable against (B, H, T, head_dim / 2): positions is an int start
    (-> (T, Dh/2), cached) or a (B, T) tensor (-> (B, 1, T, Dh/2))."""
    if isinstance(positions, int):
        return rope_table(positions, length, head_dim, theta, torch.device(device))
    cos, sin = rope_angles(positions, head_dim, theta)
    return cos[:, None], sin[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, Dh): rotate pairs (x[..., :Dh/2], x[..., Dh/2:]) (the GPT-NeoX layout)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
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
