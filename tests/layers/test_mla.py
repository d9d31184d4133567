"""Multi-head latent attention (layers/mla.py): the absorbed form equals the expanded one, the
layer equals transformers' DeepseekV3Attention on the same weights, the cache holds only the
latent and the RoPE key, and impossible options are one-line config errors."""

import pytest
import torch

from speedlm.errors import SpeedlmError
from speedlm.layers.dims import ModelDims
from speedlm.layers.mixer import SeqMeta
from speedlm.layers.mla import MultiHeadLatentAttention
from speedlm.layers.rope import apply_rope, rope_for
from speedlm.models.config import ModelConfig
from speedlm.ops.masks import AttentionMask, Full
from speedlm.ops.metrics import rel_rms_error

DIMS = ModelDims(d_model=32, n_heads=4, max_seq_len=128)


def _layer(**options):
    torch.manual_seed(0)
    m = MultiHeadLatentAttention(DIMS, **{"kv_rank": 12, "rope_dim": 4, **options}).double()
    with torch.no_grad():  # gains away from 1, so that a path that skips a norm fails
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("options", [{}, {"q_rank": 16, "nope_dim": 6, "v_dim": 10}])
@pytest.mark.parametrize("tq", [1, 5, 23])
def test_absorbed_equals_expanded(options, tq):
    m = _layer(**options)
    x = torch.randn(2, 23, 32, dtype=torch.float64)
    t = x.shape[1]
    q_nope, q_rope = m._queries(x)
    c, k_rope = m._latents(x)
    cos, sin = rope_for(0, t, m.rope_dim, m.rope_theta, x.device, x.dtype)
    q_rope, k_rope = apply_rope(q_rope, cos, sin), apply_rope(k_rope, cos, sin)
    expanded = m._expanded(q_nope, q_rope, c, k_rope, AttentionMask(Full(), t, t, 0, 0, True))
    absorbed = m._absorbed(q_nope[:, :, -tq:], q_rope[:, :, -tq:], c, k_rope)
    assert rel_rms_error(absorbed, expanded[:, :, -tq:]) < 1e-12


@pytest.mark.parametrize("q_rank", [None, 16])
def test_equals_transformers_deepseek_v3_attention_on_the_same_weights(q_rank):
    pytest.importorskip("transformers")
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

    m = _layer(q_rank=q_rank, nope_dim=6, v_dim=10)
    cfg = DeepseekV3Config(hidden_size=32, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=q_rank,
                           kv_lora_rank=12, qk_rope_head_dim=4, qk_nope_head_dim=6, v_head_dim=10,
                           rope_interleave=False, rms_norm_eps=DIMS.norm_eps, attention_bias=False,
                           rope_parameters={"rope_type": "default", "rope_theta": DIMS.rope_theta})
    cfg._attn_implementation = "eager"
    hf = DeepseekV3Attention(cfg, layer_idx=0).double().eval()
    names = {"kv_a_proj_with_mqa": "kv_a_proj", "kv_a_layernorm": "kv_a_norm", "q_a_layernorm": "q_a_norm"}
    state = {}
    for key in hf.state_dict():
        module, leaf = key.rsplit(".", 1)
        state[key] = m.state_dict()[f"{names.get(module, module)}.{leaf}"]
    hf.load_state_dict(state)
    x = torch.randn(2, 19, 32, dtype=torch.float64)
    cos, sin = rope_for(0, 19, 4, DIMS.rope_theta, x.device, x.dtype)
    cos, sin = torch.cat([cos, cos], -1)[None], torch.cat([sin, sin], -1)[None]  # transformers' layout
    causal = torch.full((19, 19), float("-inf"), dtype=torch.float64).triu(1)[None, None]
    expected, _ = hf(x, (cos, sin), causal)
    # DeepseekV3RMSNorm normalises in float32 whatever the input: float32 agreement, not float64
    assert rel_rms_error(m(x, SeqMeta()), expected) < 1e-6


def test_the_cache_holds_the_latent_and_the_rope_key_only():
    m = _layer()
    x = torch.randn(1, 10, 32, dtype=torch.float64)
    cache = m.init_cache()
    m(x, SeqMeta(), cache)
    c, k_rope = cache.entries()
    assert c.shape == (1, 1, 10, 12) and k_rope.shape == (1, 1, 10, 4)
    assert m.state_bytes(10, bytes_per_elem=8) == c.numel() * 8 + k_rope.numel() * 8
    # against a KV cache of the same heads: 2 x 4 heads x 8 channels = 64 numbers a token, here 16
    assert m.state_bytes(4096) * 4 == 2 * 4 * 8 * 4096 * 2


def _config(**mixer):
    return ModelConfig(d_model=32, n_layers=1, n_heads=4, vocab_size=64, max_seq_len=64, pattern="M",
                       layers={"M": {"mixer": {"name": "mla", **mixer}}})


@pytest.mark.parametrize("mixer,message", [
    ({"kv_rank": 48}, "kv_rank=48 is larger than d_model=32"),
    ({"q_rank": 40}, "q_rank=40 is larger than d_model=32"),
    ({"rope_dim": 3}, "rope_dim=3 must be even"),
])
def test_impossible_ranks_are_config_errors(mixer, message):
    with pytest.raises(SpeedlmError, match=message):
        _config(**mixer).validate()


def test_a_lossy_kv_policy_is_refused_in_one_line():
    from speedlm.cache.kv import WindowPolicy

    with pytest.raises(SpeedlmError, match="mla caches latents"):
        _layer().init_cache(WindowPolicy(8))
