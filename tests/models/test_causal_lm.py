import pytest
import torch

from speedlm.errors import SpeedlmError
from speedlm.models import PRESETS, ModelConfig, build_model
from speedlm.models.causal_lm import CausalLM


def test_tied_head_shares_the_embedding_and_counts_once():
    m = build_model("transformer")
    assert m.lm_head.weight is m.embed.weight
    untied = build_model("transformer", tie_embeddings=False)
    assert untied.num_params() - m.num_params() == m.embed.weight.numel()


def test_flops_match_6N_rule_plus_attention_term():
    """For full attention the analytic count is the standard 6N + 12 L d T/2 (nanoGPT/PaLM)."""
    cfg = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, tie_embeddings=False)
    m = CausalLM(cfg)
    n = m.num_params() - m.embed.weight.numel() - sum(p.numel() for n_, p in m.named_parameters() if "norm" in n_)
    t = 128
    expected = 6 * n + 3 * 4 * cfg.n_layers * cfg.d_model * (t + 1) / 2
    assert m.flops_per_token(t) == pytest.approx(expected, rel=1e-9)


def test_window_and_gqa_reduce_the_right_terms():
    full, win = build_model("transformer"), build_model("sliding-window")
    # equal below the window, smaller beyond it
    assert full.flops_per_token(16) == pytest.approx(win.flops_per_token(16))
    assert win.flops_per_token(512) < full.flops_per_token(512)
    assert build_model("gqa").flops_per_token(64) < full.flops_per_token(64)
    # cache promise: KV grows with T, window saturates, linear attention is constant
    assert full.state_bytes(400) == 2 * full.state_bytes(200)
    assert win.state_bytes(400) == win.state_bytes(200)
    lin = build_model("linear-attention")
    assert lin.state_bytes(10) == lin.state_bytes(10_000)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_trains_a_step(preset):
    m = build_model(preset)
    x = torch.randint(0, 256, (2, 40))
    loss = m.loss(x[:, :-1], x[:, 1:])
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.5
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_sequence_longer_than_allowed_is_a_clear_error():
    m = build_model("transformer", max_seq_len=16)
    with pytest.raises(SpeedlmError, match="longer than this model allows"):
        m(torch.zeros(1, 17, dtype=torch.long))
    cache = m.init_cache()
    m(torch.zeros(1, 16, dtype=torch.long), cache)
    with pytest.raises(SpeedlmError, match="max_seq_len=16"):
        m(torch.zeros(1, 1, dtype=torch.long), cache)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_model_chunked_prefill_equals_full_forward(preset):
    """Model level: the caches of every layer chain correctly through uneven chunks."""
    m = build_model(preset).double()
    x = torch.randint(0, 256, (2, 77))
    full = m(x)
    cache, outs = m.init_cache(), []
    for a, b in [(0, 13), (13, 14), (14, 50), (50, 77)]:
        outs.append(m(x[:, a:b], cache))
    assert cache.seen == 77
    err = (torch.cat(outs, 1) - full).norm() / full.norm()
    assert err < 1e-12
