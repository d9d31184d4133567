"""The FFT long convolution == its naive reference: outputs in float64 and float32 at odd
lengths, no circular wrap-around, chaining through an explicit history, and gradients."""

import pytest
import torch

from speedlm.ops.long_conv import direct_causal_conv_reference, fft_causal_conv, fft_size, long_conv_step
from speedlm.ops.metrics import rel_rms_error

B, D = 2, 3


def _inputs(t, dtype=torch.float64, taps=None):
    g = torch.Generator().manual_seed(t)
    u = torch.randn(B, t, D, dtype=torch.float64, generator=g)
    # a slowly decaying filter, so that distant inputs matter
    h = torch.randn(D, taps or t, dtype=torch.float64, generator=g) * torch.exp(-0.01 * torch.arange(taps or t))
    bias = torch.randn(D, dtype=torch.float64, generator=g)
    return u.to(dtype), h.to(dtype), bias.to(dtype)


def test_fft_size_is_a_5_smooth_number_at_least_n():
    for n in [1, 2, 7, 74, 150, 2046, 4097]:
        m = fft_size(n)
        assert n <= m <= 2 * n
        r = m
        for p in (2, 3, 5):
            while r % p == 0:
                r //= p
        assert r == 1, m
    assert fft_size(74) == 75 and fft_size(2046) == 2048


@pytest.mark.parametrize("t", [1, 37, 200, 1023])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fft_equals_direct_float64_and_float32(t, with_bias):
    u, h, bias = _inputs(t, taps=t + 5)  # filters may be longer than the sequence
    bias = bias if with_bias else None
    ref = direct_causal_conv_reference(u, h, bias)
    assert rel_rms_error(fft_causal_conv(u, h, bias), ref) < 1e-12
    y32 = fft_causal_conv(u.float(), h.float(), None if bias is None else bias.float())
    assert y32.dtype == torch.float32 and rel_rms_error(y32, ref) < 1e-5


def test_bfloat16_computes_in_float32_and_casts_back():
    u, h, bias = _inputs(200)
    y = fft_causal_conv(u.bfloat16(), h.bfloat16(), bias.bfloat16())
    assert y.dtype == torch.bfloat16
    assert rel_rms_error(y, direct_causal_conv_reference(u, h, bias)) < 2e-2


@pytest.mark.parametrize("t", [37, 200])
def test_no_circular_wrap_around(t):
    """An impulse at the last input leaves every earlier output unchanged; a circular
    convolution of size T would have wrapped it onto all of them."""
    u, h, _ = _inputs(t)
    u2 = u.clone()
    u2[:, -1] += 1.0
    y, y2 = fft_causal_conv(u, h), fft_causal_conv(u2, h)
    assert (y2[:, :-1] - y[:, :-1]).abs().max() < 1e-12
    assert (y2[:, -1] - y[:, -1]).abs().min() > 1e-3  # h[:, 0] * 1.0 at the impulse itself
    # what the padding prevents: the same spectra multiplied at size T
    def circular(x):
        return torch.fft.irfft(torch.fft.rfft(x.transpose(1, 2), n=t) * torch.fft.rfft(h, n=t), n=t)

    assert (circular(u2) - circular(u))[..., :-1].abs().max() > 1e-3


@pytest.mark.parametrize("t,cut", [(37, 18), (200, 1), (1023, 700)])
def test_history_chains(t, cut):
    u, h, bias = _inputs(t)
    whole = fft_causal_conv(u, h, bias)
    first = fft_causal_conv(u[:, :cut], h, bias)
    second = fft_causal_conv(u[:, cut:], h, bias, history=u[:, :cut])
    assert rel_rms_error(torch.cat([first, second], dim=1), whole) < 1e-12
    # a decoding step reads the filter reversed, as a slice (no copy of the history)
    rev = h.flip(-1)
    m = rev.shape[-1]
    one = long_conv_step(u[:, cut : cut + 1], h[:, 0], rev[:, m - 1 - cut : m - 1], bias, history=u[:, :cut])
    assert rel_rms_error(one, whole[:, cut : cut + 1]) < 1e-12


@pytest.mark.parametrize("t", [1, 37, 200])
def test_gradients_equal_the_direct_form(t):
    u, h, bias = (x.requires_grad_(True) for x in _inputs(t))
    g = torch.randn(B, t, D, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    fast = torch.autograd.grad((fft_causal_conv(u, h, bias) * g).sum(), [u, h, bias])
    ref = torch.autograd.grad((direct_causal_conv_reference(u, h, bias) * g).sum(), [u, h, bias])
    for a, b in zip(fast, ref):
        assert rel_rms_error(a, b) < 1e-10
