"""Mixture-of-Depths (speedlm/layers/mod.py): routing in training and by the causal rule at
inference, positions of the selected tokens, caches of routed tokens only, the auxiliary losses
and the agreement metric, capacity in the FLOPs."""

import math

import pytest
import torch

from speedlm.layers.context import AuxLosses
from speedlm.layers.dims import ModelDims
from speedlm.layers.mixer import SeqMeta
from speedlm.layers.mod import MoDBlock
from speedlm.models import build_model
from speedlm.ops.metrics import rel_rms_error

DIMS = ModelDims(d_model=32, n_heads=4, max_seq_len=128, ffn_hidden=48, n_layers=2)
ATTN = {"name": "attention"}
SWIGLU = {"name": "swiglu"}


def block(**options):
    torch.manual_seed(4)
    return MoDBlock(DIMS, ATTN, SWIGLU, **options).double()


def x_of(t, b=2, seed=0):
    return torch.randn(b, t, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def test_capacity_one_is_the_unrouted_block_scaled_by_the_router_weight():
    blk, x = block(capacity=1.0), x_of(23)
    gate = torch.sigmoid(x @ blk.router.weight[0])[..., None]
    expected = x + gate * (blk.inner(x, SeqMeta()) - x)
    assert rel_rms_error(blk(x, SeqMeta()), expected) < 1e-14


def test_training_routes_the_top_k_tokens_with_their_original_positions():
    blk, x = block(capacity=0.25), x_of(40)
    seen = {}

    def spy(module, args):
        seen["n"], seen["pos"] = args[0].shape[1], args[1].positions

    handle = blk.inner.register_forward_pre_hook(spy)
    out = blk(x, SeqMeta(start=0))
    handle.remove()
    logits = x @ blk.router.weight[0]
    top = logits.topk(10, dim=-1).indices.sort(-1).values
    assert seen["n"] == 10 and torch.equal(seen["pos"], top)  # ceil(0.25 * 40), at their own positions
    untouched = torch.ones(2, 40, dtype=torch.bool).scatter(1, top, False)
    assert torch.equal(out[untouched], x[untouched]) and not torch.equal(out[~untouched], x[~untouched])
    tiny = block(capacity=0.001)
    assert (tiny(x_of(5), SeqMeta()) != x_of(5)).any(-1).sum(-1).tolist() == [1, 1]  # at least one token


@pytest.mark.parametrize("rule", ["aux", "predictor"])
def test_decoding_equals_the_parallel_forward_under_the_causal_rule(rule):
    blk, x = block(capacity=0.125, causal_rule=rule).eval(), x_of(37)
    with torch.no_grad():
        full = blk(x, SeqMeta())
        cache = blk.init_cache()
        steps = [blk(x[:, :9], SeqMeta(0), cache)] + [blk(x[:, i : i + 1], SeqMeta(i), cache) for i in range(9, 37)]
    assert rel_rms_error(torch.cat(steps, 1), full) < 1e-12
    decide = blk.causal_decision(x, x @ blk.router.weight[0])
    assert cache.counts == decide.sum(-1).tolist()  # the caches hold the routed tokens only
    assert cache.nbytes() == sum(blk.inner.state_bytes(n, 1, 8) for n in cache.counts)


def test_decoding_one_token_at_a_time_never_nans_when_nothing_is_routed():
    blk = block().eval()
    with torch.no_grad():
        blk.router.weight.fill_(0.0)
        blk.router.weight[0, 0] = 50.0  # route only tokens whose first channel is positive
        x = x_of(30, b=1)
        x[0, :12, 0] = -1.0  # nothing routed for the first 12 steps: an empty cache
        cache = blk.init_cache()
        outs = [blk(x[:, i : i + 1], SeqMeta(i), cache) for i in range(30)]
    y = torch.cat(outs, 1)
    assert torch.isfinite(y).all() and torch.equal(y[:, :12], x[:, :12])
    assert cache.counts[0] == int((x[0, :, 0] > 0).sum())


def test_aux_losses_and_the_agreement_metric():
    x = x_of(32)
    aux = AuxLosses()
    blk = block(causal_rule="aux", aux_coef=1.0)
    blk(x, SeqMeta(aux=aux))
    assert set(aux.parts) == {"mod_router"} and aux.parts["mod_router"].requires_grad
    assert 0.0 <= aux.metrics["mod_agreement"].item() <= 1.0
    aux = AuxLosses()
    pred = block(causal_rule="predictor", aux_coef=1.0)
    pred(x, SeqMeta(aux=aux))
    loss = aux.parts["mod_predictor"]
    model_params = [p for n, p in pred.named_parameters() if not n.startswith("predictor")]
    grads = torch.autograd.grad(loss, model_params, allow_unused=True)
    assert all(g is None for g in grads)  # the predictor's loss never reaches the model
    assert all(g is not None for g in torch.autograd.grad(loss, list(pred.predictor.parameters())))


def test_the_model_logs_the_router_loss_and_agreement_and_flops_follow_capacity(tmp_path):
    import numpy as np

    from speedlm.data.dataset import TokenStream
    from speedlm.train import TrainConfig, train

    mod, dense = build_model("mod"), build_model("transformer")
    # every other block at 12.5%: well under the dense model's FLOPs
    assert mod.flops_per_token(512) < 0.75 * dense.flops_per_token(512)
    ids = np.random.default_rng(0).integers(0, 256, 20000).astype(np.uint8)
    cfg = TrainConfig(steps=2, batch_size=2, seq_len=32, eval_every=2, eval_batches=1, warmup_steps=1,
                      save_every=0, log_every=1, device="cpu", out_dir=str(tmp_path / "mod"))
    rec = train(mod, cfg, TokenStream(ids), ids[:4000], progress=False)["history"][-1]
    assert rec["loss/mod_router"] > 0 and 0 <= rec["metric/mod_agreement"] <= 1
    assert rec["loss"] == pytest.approx(rec["loss/lm"] + rec["loss/mod_router"], rel=1e-5)  # metrics are not losses
    assert math.isfinite(rec["val_loss"])


@torch.no_grad()
def test_routed_caches_report_their_kv_slots_so_the_kv_ratio_counts_mod_layers():
    """A MoD layer's KV cache holds only the routed tokens; the model cache's KV slots list it
    beside the plain attention layers (generate's and stream's KV ratio read that list)."""
    model = build_model("mod-tiny").eval()
    with torch.no_grad():
        model.blocks[1].router.weight.copy_(torch.randn_like(model.blocks[1].router.weight))
    ids = torch.randint(0, model.config.vocab_size, (2, 30))
    cache = model.init_cache()
    assert cache.kv_slots() == [0, 0]  # before any call: one entry per attention layer
    model(ids, cache)
    routed = cache.layers[1].counts
    assert 0 < sum(routed) < 60
    assert cache.kv_slots() == [30, sum(routed) / 2]  # the MoD layer: the mean over the rows
