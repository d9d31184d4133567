"""Rotary position embedding (Su et al. 2021, arXiv:2104.09864), on absolute positions."""

import functools

import torch


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (T, head_dim / 2) for integer positions (T,). Computed in float32
    (float64 for float64 runs is decided by the caller's cast) so positions beyond 2^11 stay exact."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float64) / head_dim)
    ang = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    return ang.cos(), ang.sin()


@functools.lru_cache(maxsize=8)  # small: a long-context table is MBs; decoding needs one per step
def rope_table(start: int, length: int, head_dim: int, theta: float, device: torch.device):
    """cos, sin for positions start .. start+length-1, shared by every layer of one forward."""
    return rope_angles(torch.arange(start, start + length, device=device), head_dim, theta)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, Dh): rotate pairs (x[..., :Dh/2], x[..., Dh/2:]) (the GPT-NeoX layout)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
