"""A Llama-style transformer written out in float64 from the model's weights, independently of
the library (no SDPA, no RoPE helper, no mixer code): the model-level check that the pieces are
wired as the papers describe, not only that each fast op equals its own reference."""

import math

import pytest
import torch

from speedlm.models import ModelConfig, build_model
from speedlm.ops.metrics import rel_rms_error


def rms_norm(x, w, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rotate(x, pos, theta):
    """x (T, H, Dh): the pair (x[i], x[i + Dh/2]) is the complex number x[i] + j x[i + Dh/2],
    multiplied by exp(j * pos * theta^(-2i/Dh))."""
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half], x[..., half:])
    freqs = torch.tensor([theta ** (-2 * i / x.shape[-1]) for i in range(half)], dtype=torch.float64)
    rot = torch.exp(1j * pos[:, None, None].double() * freqs)
    z = z * rot
    return torch.cat([z.real, z.imag], -1)


def transformer_logits(sd, cfg, ids, window=None, kv_heads=None):
    """One sequence ids (T,) -> logits (T, V), following the Llama recipe step by step."""
    t = ids.shape[0]
    h, dh = cfg.n_heads, cfg.d_model // cfg.n_heads
    hkv = kv_heads or h
    pos = torch.arange(t)
    x = sd["embed.weight"][ids]
    for i in range(cfg.n_layers):
        p = f"blocks.{i}."
        a = rms_norm(x, sd[p + "mixer_norm.weight"], cfg.norm_eps)
        q = (a @ sd[p + "mixer.q_proj.weight"].T).view(t, h, dh)
        k = (a @ sd[p + "mixer.k_proj.weight"].T).view(t, hkv, dh)
        v = (a @ sd[p + "mixer.v_proj.weight"].T).view(t, hkv, dh)
        q, k = rotate(q, pos, cfg.rope_theta), rotate(k, pos, cfg.rope_theta)
        out = torch.zeros(t, h, dh, dtype=torch.float64)
        for head in range(h):
            kh = head // (h // hkv)  # the shared key/value head of this query head
            for qi in range(t):
                keys = [j for j in range(qi + 1) if window is None or qi - j < window]
                scores = torch.stack([q[qi, head] @ k[j, kh] for j in keys]) / math.sqrt(dh)
                probs = torch.softmax(scores, 0)
                out[qi, head] = sum(pr * v[j, kh] for pr, j in zip(probs, keys))
        x = x + out.reshape(t, h * dh) @ sd[p + "mixer.o_proj.weight"].T
        f = rms_norm(x, sd[p + "ffn_norm.weight"], cfg.norm_eps)
        gate, up = f @ sd[p + "ffn.gate.weight"].T, f @ sd[p + "ffn.up.weight"].T
        x = x + (gate * torch.sigmoid(gate) * up) @ sd[p + "ffn.down.weight"].T
    return rms_norm(x, sd["norm.weight"], cfg.norm_eps) @ sd["lm_head.weight"].T


@pytest.mark.parametrize(
    "mixer,window,kv_heads",
    [({"name": "attention"}, None, None), ({"name": "attention", "kv_heads": 1}, None, 1),
     ({"name": "sliding_window", "window": 5}, 5, None)],
    ids=["mha", "mqa", "sliding-window"],
)
def test_model_equals_an_independent_float64_transformer(mixer, window, kv_heads):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, d_model=16, n_layers=2, n_heads=4, ffn_hidden=24, layers={"A": {"mixer": mixer}})
    model = build_model(cfg).double()
    with torch.no_grad():  # weights far from init, so every term matters
        for prm in model.parameters():
            prm.add_(torch.randn_like(prm) * 0.3)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 50, (2, 13))
    logits = model(ids)
    for row in range(2):
        ref = transformer_logits(sd, cfg, ids[row], window, kv_heads)
        assert rel_rms_error(logits[row], ref) < 1e-12
