import pytest
import torch

from speedlm.errors import SpeedlmError
from speedlm.models import presets_for, ModelConfig, build_model
from speedlm.models.causal_lm import CausalLM
from speedlm.ops.metrics import rel_rms_error


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


@pytest.mark.parametrize("preset", presets_for("ar"))
def test_every_preset_trains_a_step(preset):
    m = build_model(preset)
    x = torch.randint(0, 256, (2, 40))
    loss = m.loss(x[:, :-1], x[:, 1:]).total
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


@pytest.mark.parametrize("preset", ["sliding-window", "linear-attention", "linear-hybrid"])
def test_models_with_bounded_caches_generate_past_max_seq_len(preset):
    """Context limits belong to mixers: a window or a recurrent state never looks further back
    than it can, so only full attention keeps the max_seq_len limit."""
    from speedlm.generate import generate

    m = build_model(preset, max_seq_len=16)
    assert m.max_context() is None and m.init_cache().max_context is None
    out = generate(m, torch.zeros(1, 4, dtype=torch.long), 40)
    assert out.ids.shape == (1, 44)
    hybrid = build_model("transformer", max_seq_len=16)
    assert hybrid.max_context() == 16


def test_a_bounded_kv_policy_lifts_the_limit_of_full_attention():
    from speedlm.cache import WindowPolicy

    m = build_model("transformer", max_seq_len=16)
    cache = m.init_cache(kv_policy=WindowPolicy(8))
    assert cache.max_context is None
    for i in range(30):
        m(torch.zeros(1, 1, dtype=torch.long), cache)
    assert cache.layers[0].length == 7 and cache.seen == 30


def test_each_module_initialises_itself_and_the_model_scales_residual_outputs():
    """GPT-2 init with residual scaling, done by the modules (not by parameter names), also
    when the model is built on the meta device and initialised afterwards."""
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=128, n_layers=8, n_heads=4, vocab_size=512)
    m = CausalLM(cfg)
    std = cfg.init_std
    block = m.blocks[0]
    assert block.mixer.q_proj.weight.std().item() == pytest.approx(std, rel=0.05)
    assert block.mixer.o_proj.weight.std().item() == pytest.approx(std / 4, rel=0.05)  # 1/sqrt(2 * 8)
    assert block.ffn.down.weight.std().item() == pytest.approx(std / 4, rel=0.05)
    assert m.embed.weight.std().item() == pytest.approx(std, rel=0.05)
    assert torch.equal(block.mixer_norm.weight, torch.ones(128))

    with torch.device("meta"):
        lazy = CausalLM(cfg)
    lazy.to_empty(device="cpu")
    lazy.reset_parameters()
    for (name, a), (_, b) in zip(m.named_parameters(), lazy.named_parameters()):
        assert torch.isfinite(b).all(), name
        assert b.std().item() == pytest.approx(a.std().item(), rel=0.1, abs=1e-6), name
    assert lazy.lm_head.weight is lazy.embed.weight


def test_loss_returns_total_and_named_parts():
    from speedlm.models.registry import MIXERS
    from support.parts import AuxPenalty

    MIXERS.register("test_aux", AuxPenalty, family="test", description="test", paper="-")
    try:
        m = build_model(ModelConfig(n_layers=2, layers={"A": {"mixer": {"name": "test_aux", "coef": 0.25}}}))
        x = torch.randint(0, 256, (2, 20))
        total, parts = m.loss(x[:, :-1], x[:, 1:])
        assert set(parts) == {"lm", "penalty"}
        assert torch.allclose(total, parts["lm"] + parts["penalty"])
        assert parts["penalty"] > 0
        plain = build_model("transformer")
        total, parts = plain.loss(x[:, :-1], x[:, 1:])
        assert set(parts) == {"lm"} and torch.equal(total, parts["lm"])
    finally:
        MIXERS.unregister("test_aux")


@pytest.mark.parametrize("preset", ["transformer", "gqa", "linear-hybrid"])
def test_foundation_checkpoints_load_and_give_the_same_logits(preset):
    """Checkpoints written by the foundation (commit f9ec2e3: `mixers` configs, the old Block)
    load through the checkpoint loader and give the float64 logits it computed, to float64
    rounding: the fixture was written on an Intel CPU and BLAS sums in another order on others
    (an AMD EPYC gives 1.4e-16 relative error for attention), and the chunked linear-attention
    form now carries its state chunk by chunk with the normaliser as a value channel (issue 7)."""
    from pathlib import Path

    from safetensors.torch import load_file

    from speedlm.checkpoint import load_pretrained

    here = Path(__file__).parent.parent / "fixtures" / "foundation"
    expected = load_file(here / "expected.safetensors")
    model = load_pretrained(here / preset, tokenizer=False).model.double()
    with torch.no_grad():
        logits = model(expected["input_ids"])
    assert rel_rms_error(logits, expected[f"logits.{preset}"]) < 1e-15


@pytest.mark.parametrize("preset", presets_for("ar"))
def test_model_chunked_prefill_equals_full_forward(preset):
    """Model level: the caches of every layer chain correctly through uneven chunks (in eval
    mode, where routed blocks (MoD) use their causal rule, as generation does)."""
    m = build_model(preset).double().eval()
    x = torch.randint(0, 256, (2, 77))
    full = m(x)
    cache, outs = m.init_cache(), []
    for a, b in [(0, 13), (13, 14), (14, 50), (50, 77)]:
        outs.append(m(x[:, a:b], cache))
    assert cache.seen == 77
    err = (torch.cat(outs, 1) - full).norm() / full.norm()
    assert err < 1e-12


def test_the_model_asks_blocks_for_caches_state_and_flops():
    """A block kind with state of its own (a conv in front of the mixer): the model's cache,
    state bytes and FLOPs include it, and cached decoding equals the full forward, so the model
    never reaches past a block into its mixer."""
    from speedlm.models.registry import BLOCKS
    from support.parts import ConvPreNormBlock

    BLOCKS.register("test_conv_prenorm", ConvPreNormBlock, family="test", description="test", paper="-")
    try:
        torch.manual_seed(0)
        m = build_model(ModelConfig(n_layers=2, d_model=32, block={"name": "test_conv_prenorm", "kernel": 4})).double()
    finally:
        BLOCKS.unregister("test_conv_prenorm")
    conv_state = 3 * 32 * 8  # kernel - 1 inputs of width 32, float64
    assert m.state_bytes(50, bytes_per_elem=8) == sum(b.mixer.state_bytes(50, 1, 8) + conv_state for b in m.blocks)
    conv_flops = 2.0 * 32 * 4
    no_conv = build_model(ModelConfig(n_layers=2, d_model=32))
    assert m.flops_per_token(50, training=False) == pytest.approx(no_conv.flops_per_token(50, training=False) + 2 * conv_flops)
    ids = torch.randint(0, 256, (1, 30))
    with torch.no_grad():
        full = m(ids)
        cache = m.init_cache()
        steps = torch.cat([m(ids[:, :9], cache)] + [m(ids[:, i : i + 1], cache) for i in range(9, 30)], dim=1)
    assert all(set(c.parts) == {"conv", "mixer"} for c in cache.layers)
    assert cache.nbytes() == m.state_bytes(30, bytes_per_elem=8)
    assert (steps - full).abs().max() < 1e-10


def test_module_specific_initialisation_survives_the_model():
    """A long-conv filter that decays with lag and a short conv's U(-1/sqrt(K), 1/sqrt(K)) weights
    stay as their modules made them, through CausalLM's construction and its reset_parameters
    (a model that overwrote every matrix by name with N(0, 0.02) would erase both)."""
    from speedlm.models.registry import MIXERS
    from support.parts import LongConv

    MIXERS.register("test_long_conv", LongConv, family="test", description="test", paper="-")
    try:
        cfg = ModelConfig(n_layers=2, d_model=32, max_seq_len=64, pattern="LG",
                          layers={"L": {"mixer": {"name": "test_long_conv"}}, "G": {"mixer": {"name": "base_conv", "kernel": 4}}})
        for m in (build_model(cfg), build_model(cfg)):
            m.reset_parameters()
            long_filter, conv = m.blocks[0].mixer.filter, m.blocks[1].mixer.conv.weight
            assert long_filter[:, 0].std() > 0.5 and long_filter[:, 50:].abs().max() < 0.05  # exp(-0.1 lag) decay
            assert conv.abs().max() <= 0.5 and conv.std() > 0.2  # U(-1/2, 1/2), std 0.29
    finally:
        MIXERS.unregister("test_long_conv")


def test_checkpoints_build_the_model_class_their_objective_names(tmp_path):
    """Inference loading and resuming both go through build_model: a model class registered for
    another objective comes back as that class, not as a hard-coded CausalLM."""
    from speedlm.checkpoint import load_pretrained
    from speedlm.models.registry import MODELS
    from speedlm.train import TrainConfig, load_checkpoint, train

    class TaggedLM(CausalLM):
        pass

    MODELS.register("test_tagged", TaggedLM, family="test", description="test", paper="-")
    try:
        model = build_model(ModelConfig(n_layers=1, d_model=32, max_seq_len=32, objective="test_tagged"))
        assert type(model) is TaggedLM

        class Stream:
            def batch(self, step, batch_size, seq_len, seed=0):
                x = torch.randint(0, 256, (batch_size, seq_len + 1), generator=torch.Generator().manual_seed(step))
                return x[:, :-1], x[:, 1:]

        cfg = TrainConfig(steps=1, batch_size=2, seq_len=16, warmup_steps=0, eval_every=0, save_every=0,
                          device="cpu", out_dir=str(tmp_path / "run"))
        train(model, cfg, Stream(), progress=False)
        loaded = load_pretrained(tmp_path / "run", tokenizer=False).model
        assert type(loaded) is TaggedLM
        assert type(load_checkpoint(tmp_path / "run").build_model()) is TaggedLM
        for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
            assert torch.equal(a, b)
    finally:
        MODELS.unregister("test_tagged")
