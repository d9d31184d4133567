"""The `moe` FFN (speedlm/layers/moe.py) in models: routed dispatch equals the dense reference,
its auxiliary losses reach the loss and the trainer's metrics, capacity applies in training
only, and the accounting counts active parameters and FLOPs."""

import pytest
import torch

from speedlm.layers.dims import ModelDims
from speedlm.layers.mixer import SeqMeta
from speedlm.layers.moe import MoE
from speedlm.layers.context import AuxLosses
from speedlm.models import build_model, preset_config
from speedlm.ops.moe import moe_swiglu_reference

DIMS = ModelDims(d_model=32, n_heads=4, max_seq_len=128, ffn_hidden=48, n_layers=2)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize(
    "top_k, shared, renormalize", [(1, 0, True), (2, 0, True), (3, 2, True), (2, 0, False), (1, 0, False)]
)
def test_moe_ffn_equals_its_dense_reference(top_k, shared, renormalize):
    f = MoE(DIMS, experts=6, top_k=top_k, hidden=16, shared=shared, renormalize=renormalize).double()
    x = torch.randn(3, 19, 32, dtype=torch.float64)
    flat = x.reshape(-1, 32)
    _, weights, experts, probs = f.route(flat)
    if top_k == 1 or not renormalize:  # the chosen experts' softmax probabilities as they are (Switch, Jamba)
        assert torch.equal(weights, probs.gather(1, experts)) and (weights.sum(-1) < 1).all()
    else:  # Mixtral: renormalised over the chosen experts
        assert torch.allclose(weights.sum(-1), torch.ones(len(flat), dtype=weights.dtype))
    ref = moe_swiglu_reference(flat, weights, experts, f.w_gate, f.w_up, f.w_down).view_as(x)
    if f.shared is not None:
        ref = ref + f.shared(x)
    assert rel(f(x, SeqMeta()), ref) < 1e-12
    if top_k == 1:  # Switch: the raw probability, so the router gets the LM gradient
        f(x, SeqMeta()).square().sum().backward()
        assert f.router.weight.grad.abs().sum() > 0


def test_auxiliary_losses_are_named_weighted_and_summed_over_layers():
    """Each layer's balance term 0.01 * E * sum_i f_i P_i (f over the N * k assignments) and z
    term 0.001 * mean logsumexp^2, recomputed from the router inputs each MoE layer saw and
    summed over the layers. Catches a wrong coefficient, a layer counted twice or dropped, or
    a loss computed from the renormalised top-k weights instead of the full softmax."""
    model = build_model(preset_config("mixtral-tiny"))
    ids = torch.randint(0, 256, (2, 33))
    inputs = []
    hooks = [b.ffn.register_forward_pre_hook(lambda m, args: inputs.append((m, args[0].detach()))) for b in model.blocks]
    loss = model.loss(ids[:, :-1], ids[:, 1:])
    for h in hooks:
        h.remove()
    assert set(loss.parts) == {"lm", "moe_balance", "moe_z"} and len(inputs) == 2
    balance = z = 0.0
    for ffn, x in inputs:
        logits = x.reshape(-1, x.shape[-1]).double() @ ffn.router.weight.double().t()  # (N, 8)
        probs = torch.softmax(logits, -1)
        chosen = probs.topk(2, -1).indices  # top-2 of 8
        f = torch.stack([(chosen == i).sum() for i in range(8)]) / chosen.numel()
        balance += 0.01 * 8 * (f * probs.mean(0)).sum().item()
        z += 0.001 * torch.logsumexp(logits, -1).pow(2).mean().item()
    assert loss.parts["moe_balance"].item() == pytest.approx(balance, rel=1e-5)
    assert loss.parts["moe_z"].item() == pytest.approx(z, rel=1e-5)
    assert loss.total.item() == pytest.approx(sum(v.item() for v in loss.parts.values()), rel=1e-6)
    grads = torch.autograd.grad(loss.parts["moe_balance"], [b.ffn.router.weight for b in model.blocks])
    assert all(g.abs().sum() > 0 for g in grads)  # the balance loss trains the routers


def test_capacity_drops_tokens_in_training_and_never_at_inference():
    f = MoE(DIMS, experts=4, top_k=1, hidden=16, capacity_factor=0.5).double()
    with torch.no_grad():
        f.router.weight[0] += 5 * f.router.weight[0].sign()  # a router that prefers one expert
    x = torch.randn(2, 40, 32, dtype=torch.float64)
    train_out = f(x, SeqMeta())
    dropped = train_out.abs().amax(-1) == 0
    assert dropped.any() and not dropped.all()
    f.eval()
    eval_out = f(x, SeqMeta())
    assert (eval_out.abs().amax(-1) > 0).all()  # dropless: cached decoding equals the full forward
    one_by_one = torch.cat([f(x[:, i : i + 1], SeqMeta(i)) for i in range(40)], 1)
    assert rel(one_by_one, eval_out) < 1e-12


def test_accounting_counts_active_parameters_and_flops():
    model = build_model(preset_config("mixtral-tiny"))
    d, h = 64, model.config.hidden_dim
    expert = 3 * d * h
    total, active = model.num_params(), model.num_active_params()
    assert total - active == 2 * (8 - 2) * expert  # six idle experts in each of the two layers
    dense = build_model(preset_config("gqa-tiny"))
    # per layer: the router and a second expert more than the dense SwiGLU
    extra = model.flops_per_token(128) - dense.flops_per_token(128)
    assert extra == pytest.approx(3.0 * 2 * (2 * d * 8 + 6.0 * d * h))


def test_trainer_logs_the_moe_losses(tmp_path):
    import numpy as np

    from speedlm.data.dataset import TokenStream
    from speedlm.train import TrainConfig, train

    ids = np.random.default_rng(0).integers(0, 256, 20000).astype(np.uint8)
    cfg = TrainConfig(steps=3, batch_size=2, seq_len=32, eval_every=3, eval_batches=1, warmup_steps=1,
                      save_every=0, log_every=1, device="cpu", out_dir=str(tmp_path / "moe"))
    summary = train(build_model(preset_config("deepseek-moe-tiny")), cfg, TokenStream(ids), ids[:4000], progress=False)
    rec = summary["history"][-1]
    assert rec["loss/moe_balance"] > 0 and rec["loss/moe_z"] > 0
    assert rec["loss"] == pytest.approx(rec["loss/lm"] + rec["loss/moe_balance"] + rec["loss/moe_z"], rel=1e-5)


def test_expert_choice_takes_each_experts_best_tokens_and_is_refused_in_causal_models():
    from speedlm.errors import SpeedlmError
    from speedlm.models import ModelConfig
    from speedlm.ops.moe import expert_choice_swiglu

    f = MoE(DIMS, experts=4, top_k=2, hidden=16, routing="expert").double()
    x = torch.randn(2, 15, 32, dtype=torch.float64)
    flat = x.reshape(-1, 32)
    _, _, _, probs = f.route(flat)
    y, chosen = expert_choice_swiglu(flat, probs, 8, f.w_gate, f.w_up, f.w_down, rows=2)
    assert chosen.view(2, 15, 4).sum(1).tolist() == [[8] * 4] * 2  # per row, each expert: ceil(15 * 2 / 4) = 8
    for r in range(2):  # ... the ones of that row that score it highest
        for e in range(4):
            row = probs.view(2, 15, 4)[r, :, e]
            assert set(chosen.view(2, 15, 4)[r, :, e].nonzero()[:, 0].tolist()) == set(row.topk(8).indices.tolist())
    alone = f(x[1:], SeqMeta(causal=False))  # a row routes the same whatever shares its batch
    assert rel(alone, f(x, SeqMeta(causal=False))[1:]) < 1e-12
    dense = torch.where(chosen, probs, torch.zeros_like(probs))
    h = torch.nn.functional.silu(torch.einsum("nd,edh->neh", flat, f.w_gate)) * torch.einsum("nd,edh->neh", flat, f.w_up)
    ref = torch.einsum("ne,ned->nd", dense, torch.einsum("neh,ehd->ned", h, f.w_down))
    assert rel(y, ref) < 1e-12
    aux = AuxLosses()
    out = f(x, SeqMeta(causal=False, aux=aux))
    assert rel(out.reshape(-1, 32), ref) < 1e-12 and set(aux.parts) == {"moe_z"}  # balanced by construction
    with pytest.raises(SpeedlmError, match="expert-choice"):
        f(x, SeqMeta())
    with pytest.raises(SpeedlmError, match="expert-choice routing .*objective='ar' is causal"):
        ModelConfig(layers={"A": {"mixer": {"name": "attention"}, "ffn": {"name": "moe", "routing": "expert"}}}).validate()


def test_router_logits_stay_float32_under_autocast_and_empty_inputs_add_no_nan():
    f = MoE(DIMS, experts=4, top_k=2, hidden=16)
    x = torch.randn(2, 9, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, *_ = f.route(x.reshape(-1, 32))
    assert logits.dtype == torch.float32
    aux = AuxLosses()
    y = f(torch.zeros(2, 0, 32), SeqMeta(aux=aux))
    assert y.shape == (2, 0, 32) and not aux.parts


def test_shared_expert_of_its_own_width_with_a_sigmoid_gate():
    """Qwen2-MoE's shared expert: a SwiGLU `shared_hidden` wide (not `shared` experts wide), its
    output scaled per token by sigmoid(w . x); counted in the active parameters and FLOPs."""
    f = MoE(DIMS, experts=6, top_k=2, hidden=16, shared=1, shared_hidden=40, shared_gate=True).double()
    assert f.shared.gate.out_features == 40 and f.shared_gate.weight.shape == (1, 32)
    x = torch.randn(3, 19, 32, dtype=torch.float64)
    flat = x.reshape(-1, 32)
    _, weights, experts, _ = f.route(flat)
    routed = moe_swiglu_reference(flat, weights, experts, f.w_gate, f.w_up, f.w_down).view_as(x)
    s = f.shared
    shared = s.down(torch.nn.functional.silu(s.gate(x)) * s.up(x))
    gate = torch.sigmoid(x @ f.shared_gate.weight.t())  # (3, 19, 1): one scalar per token
    assert rel(f(x, SeqMeta()), routed + gate * shared) < 1e-12
    assert rel(f(x, SeqMeta()), routed + shared) > 1e-3  # the gate matters
    ungated = MoE(DIMS, experts=6, top_k=2, hidden=16, shared=1, shared_hidden=40)
    assert f.num_active_params() - ungated.num_active_params() == 32
    assert ungated.num_active_params() == 6 * 32 + 2 * 3 * 32 * 16 + 3 * 32 * 40
    assert f.flops_breakdown().total - ungated.flops_breakdown().total == 2 * 32


def test_shared_gate_and_width_flops_match_the_counter():
    from torch.utils.flop_counter import FlopCounterMode

    f = MoE(DIMS, experts=6, top_k=2, hidden=16, shared=1, shared_hidden=40, shared_gate=True).eval()
    x = torch.randn(2, 21, 32)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        f(x, SeqMeta())
    assert counter.get_total_flops() / 42 == pytest.approx(f.flops_breakdown().visible, rel=1e-12)


@pytest.mark.parametrize("options, name", [({"shared_gate": True}, "shared_gate"),
                                           ({"shared_hidden": 32}, "shared_hidden")])
def test_shared_expert_options_need_a_shared_expert(options, name):
    from speedlm.errors import SpeedlmError
    from speedlm.models import ModelConfig

    with pytest.raises(SpeedlmError, match=name):
        ModelConfig(layers={"A": {"mixer": {"name": "attention"}, "ffn": {"name": "moe", **options}}}).validate()
