"""KV-cache quantisation (KIVI, Liu et al. 2024, arXiv:2402.02750): every key and value is kept,
in 2 or 4 bits. Keys are quantised per channel over groups of `group` consecutive tokens (their
outliers sit in fixed channels), values per token over groups of `group` channels; both
asymmetric (a scale and a zero point per group, min to max). The newest tokens stay in full
precision: a residual of `residual` to residual + group - 1 tokens, whose oldest `group` tokens are
quantised together once it reaches residual + group (so a query always sees its last `residual`
keys exactly, and a key group is quantised only when complete).

The codes are stored packed (four 2-bit or two 4-bit codes per byte) with float16 scales and
zero points, so `nbytes` is what the cache really holds; a call dequantises the stored groups
and attends with SDPA as a full cache does (positions are the original ones).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from speedlm.cache.base import LayerCache
from speedlm.cache.kv import FullPolicy, Keys
from speedlm.errors import SpeedlmError

BITS = (2, 4)


@dataclass(frozen=True)
class KIVIPolicy(FullPolicy):
    bits: int = 2
    group: int = 32
    residual: int = 32
    emulated_by_mask: ClassVar[bool] = False  # what a query sees depends on when groups were quantised

    def __post_init__(self):
        if self.bits not in BITS:
            raise SpeedlmError(f"kivi: {self.bits}-bit codes are not supported; choose 2 or 4")
        if self.group < 1 or self.residual < 0:
            raise SpeedlmError(f"kivi: group={self.group} must be >= 1 and residual={self.residual} >= 0")

    def make_cache(self, rotate=None) -> QuantizedKVCache:
        return QuantizedKVCache(self)

    def bytes_per_token(self, kv_heads: int, head_dim: int, full_bytes: int = 2) -> float:
        """Stored bytes per quantised token and layer (codes, and float16 scale + zero point per
        group), against 2 * kv_heads * head_dim * full_bytes for a full-precision one."""
        codes = 2 * head_dim * self.bits / 8
        width = min(self.group, head_dim)  # a value group: `group` channels, or the whole head if narrower
        value_groups = -(-head_dim // width)
        params = 2 * 2 * (head_dim / self.group + value_groups)  # keys: per channel per token group; values: per token
        return kv_heads * (codes + params)


def quantize(x: torch.Tensor, bits: int, dim: int):
    """Asymmetric min-max codes of x along `dim`: (codes uint8 in [0, 2^bits), scale, zero)."""
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(1e-8)
    codes = torch.round((x - lo) / scale).clamp(0, 2**bits - 1).to(torch.uint8)
    return codes, scale.half(), lo.half()


def dequantize(codes, scale, zero, dtype):
    return codes.to(dtype) * scale.to(dtype) + zero.to(dtype)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., n) codes -> (..., n * bits / 8) bytes (n a multiple of 8 / bits)."""
    per = 8 // bits
    c = codes.unflatten(-1, (-1, per))
    shifts = torch.arange(per, device=codes.device, dtype=torch.uint8) * bits
    return (c << shifts).sum(-1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.uint8) * bits
    return ((packed[..., None] >> shifts) & (2**bits - 1)).flatten(-2)


class QuantizedKVCache(LayerCache):
    """Packed quantised groups of keys and values plus a full-precision residual (module doc).
    Only the codes, their scales and the residual persist; each call dequantises the groups
    into a temporary (what a fused kernel would do inside the attention), so the memory held
    between calls is what `nbytes` reports."""

    stores_marks = False

    def __init__(self, policy: KIVIPolicy):
        self.policy = policy
        # per group along dim 2: packed codes (B, Hkv, Ng, bytes), scales and zero points
        self.k_codes = self.k_scale = self.k_zero = None
        self.v_codes = self.v_scale = self.v_zero = None
        self.rk = self.rv = None  # the residual (B, Hkv, R, Dh)
        self.quantized = 0

    @property
    def length(self) -> int:
        return self.quantized + (0 if self.rk is None else self.rk.shape[2])

    def tensors(self) -> list[torch.Tensor]:
        stored = [self.k_codes, self.k_scale, self.k_zero, self.v_codes, self.v_scale, self.v_zero]
        return [t for t in stored if t is not None] + ([] if self.rk is None else [self.rk, self.rv])

    def kv_slots(self) -> list[float]:
        return [self.length]

    def detach(self) -> None:
        if self.rk is not None:
            self.rk, self.rv = self.rk.detach(), self.rv.detach()

    @staticmethod
    def _append(held, new):
        return new if held is None else torch.cat([held, new], dim=2)

    def _quantize_group(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v (B, Hkv, G, Dh): keys per channel over the G tokens, values per token over channel
        groups of `group` (padded to whole groups)."""
        p, dh = self.policy, v.shape[-1]
        kc, ks, kz = quantize(k, p.bits, dim=2)  # scales (B, Hkv, 1, Dh)
        cg = min(p.group, dh)
        vp = torch.nn.functional.pad(v, (0, (-dh) % cg)).unflatten(-1, (-1, cg))
        vc, vs, vz = quantize(vp, p.bits, dim=-1)  # scales (B, Hkv, G, Dh / cg, 1)
        per = 8 // p.bits
        kflat = torch.nn.functional.pad(kc.flatten(-2), (0, (-kc[0, 0].numel()) % per))
        vflat = torch.nn.functional.pad(vc.flatten(-3), (0, (-vc[0, 0].numel()) % per))
        self.k_codes = self._append(self.k_codes, pack(kflat, p.bits)[:, :, None])
        self.v_codes = self._append(self.v_codes, pack(vflat, p.bits)[:, :, None])
        self.k_scale, self.k_zero = self._append(self.k_scale, ks), self._append(self.k_zero, kz)
        self.v_scale, self.v_zero = self._append(self.v_scale, vs[:, :, None]), self._append(self.v_zero, vz[:, :, None])
        self.quantized += k.shape[2]

    def _dequantized(self, dtype, dh: int):
        """Every quantised group as (B, Hkv, quantized, Dh) keys and values, in `dtype`."""
        p = self.policy
        g = p.group
        cg = min(p.group, dh)
        kc = unpack(self.k_codes, p.bits)[..., : g * dh].unflatten(-1, (g, dh))  # (B, Hkv, Ng, G, Dh)
        keys = dequantize(kc, self.k_scale[:, :, :, None], self.k_zero[:, :, :, None], dtype)
        width = dh + (-dh) % cg
        vc = unpack(self.v_codes, p.bits)[..., : g * width].unflatten(-1, (g, width // cg, cg))
        values = dequantize(vc, self.v_scale, self.v_zero, dtype).flatten(-2)[..., :dh]
        return keys.flatten(2, 3), values.flatten(2, 3)

    def extend(self, k, v, positions=None, marks=None) -> Keys:
        """Append the new tokens; return every key and value the new queries read (dequantised
        groups, then the full-precision residual and the new tokens), at positions 0 .. L - 1."""
        self.rk = k if self.rk is None else torch.cat([self.rk, k], dim=2)
        self.rv = v if self.rv is None else torch.cat([self.rv, v], dim=2)
        if self.k_codes is None:
            keys, values = self.rk, self.rv
        else:
            old_k, old_v = self._dequantized(k.dtype, k.shape[-1])
            keys, values = torch.cat([old_k, self.rk], dim=2), torch.cat([old_v, self.rv], dim=2)
        p = self.policy
        while self.rk.shape[2] >= p.residual + p.group:  # the oldest complete group leaves the residual
            self._quantize_group(self.rk[:, :, : p.group], self.rv[:, :, : p.group])
            self.rk, self.rv = self.rk[:, :, p.group :], self.rv[:, :, p.group :]
        return Keys(keys, values, 0, None)

    def mask_terms(self, keys: Keys, positions, t: int, window):
        return positions, 0, None
