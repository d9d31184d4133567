"""KIVI (cache/quantized.py): codes pack and unpack exactly, quantisation error is bounded by
half a step, every query sees its newest keys exactly and the older ones as their groups'
dequantised codes (keys per channel over token groups, values per token over channel groups),
and the stored bytes are what the codes and scales take."""

import pytest
import torch

from speedlm.cache.quantized import KIVIPolicy, QuantizedKVCache, dequantize, pack, quantize, unpack

B, HKV, D = 2, 2, 16


@pytest.mark.parametrize("bits", [2, 4])
def test_codes_pack_and_unpack_exactly(bits):
    codes = torch.randint(0, 2**bits, (3, 5, 64), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape[-1] == 64 * bits // 8
    assert torch.equal(unpack(packed, bits), codes)


@pytest.mark.parametrize("bits", [2, 4])
def test_quantisation_error_is_at_most_half_a_step(bits):
    x = torch.randn(4, 32, 16, dtype=torch.float64)
    codes, scale, zero = quantize(x, bits, dim=1)
    err = (dequantize(codes, scale, zero, torch.float64) - x).abs()
    # half a step, plus what rounding the scale and zero point to float16 adds
    assert (err <= scale.double() * 0.5 + 2e-3 * x.abs().amax(1, keepdim=True)).all()


def _expected(k_all, v_all, i, p):
    """What query i (token i, 0-based) reads: a key group g is quantised once (g + 1) G + R <= i."""
    keys, values = k_all[:, :, : i + 1].clone(), v_all[:, :, : i + 1].clone()
    g = 0
    while (g + 1) * p.group + p.residual <= i:
        sl = slice(g * p.group, (g + 1) * p.group)
        kc, ks, kz = quantize(k_all[:, :, sl], p.bits, dim=2)  # per channel over the group's tokens
        keys[:, :, sl] = dequantize(kc, ks, kz, k_all.dtype)
        vg = v_all[:, :, sl].unflatten(-1, (-1, min(p.group, D)))  # per token over channel groups
        vc, vs, vz = quantize(vg, p.bits, dim=-1)
        values[:, :, sl] = dequantize(vc, vs, vz, v_all.dtype).flatten(-2)
        g += 1
    return keys, values


@pytest.mark.parametrize("bits,group,residual", [(2, 8, 8), (4, 4, 12), (2, 16, 0)])
def test_each_query_reads_exact_recent_keys_and_dequantised_older_groups(bits, group, residual):
    p = KIVIPolicy(bits, group, residual)
    g = torch.Generator().manual_seed(bits + group)
    k_all = torch.randn(B, HKV, 70, D, dtype=torch.float64, generator=g)
    v_all = torch.randn(B, HKV, 70, D, dtype=torch.float64, generator=g)
    cache = QuantizedKVCache(p)
    for i in range(70):
        keys = cache.extend(k_all[:, :, i : i + 1], v_all[:, :, i : i + 1])
        ek, ev = _expected(k_all, v_all, i, p)
        assert torch.allclose(keys.k, ek, atol=1e-12) and torch.allclose(keys.v, ev, atol=1e-12), i


def test_the_stored_bytes_are_the_codes_the_scales_and_the_residual():
    p = KIVIPolicy(2, 16, 16)
    cache = QuantizedKVCache(p)
    x = torch.randn(B, HKV, 100, D)
    cache.extend(x, x)
    quantized = 100 - 16 - (100 - 16) % 16  # the residual keeps 16..31 tokens: 84 -> 80 quantised, 20 kept
    assert cache.quantized == quantized
    per_token = p.bytes_per_token(HKV, D)  # codes + float16 scale and zero per group, keys and values
    full_residual = 2 * HKV * (100 - quantized) * D * 4  # float32 residual
    assert cache.nbytes() == B * quantized * per_token + B * full_residual
    assert B * quantized * per_token <= B * quantized * 2 * HKV * D * 2 / 4  # at most a quarter of float16
