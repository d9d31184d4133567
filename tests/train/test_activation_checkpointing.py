"""Activation checkpointing and compiled blocks, from outside the model: the same losses and
weights as without them, the blocks really run twice per training step under checkpointing
(recomputed in backward), and the state dict, decoding and validation are untouched."""

import pytest
import torch

from speedlm.models import CausalLM
from speedlm.train import TrainConfig, train


def _run(h, tmp_path, checkpointing: bool, compile: bool = False):
    torch.manual_seed(0)
    model = CausalLM(h.tiny_model_config())
    calls = []
    model.blocks[0].mixer.register_forward_hook(lambda *a: calls.append(1))
    cfg = TrainConfig(steps=3, batch_size=4, seq_len=32, warmup_steps=1, log_every=1, eval_every=0,
                      out_dir=str(tmp_path / str(checkpointing)), activation_checkpointing=checkpointing, compile=compile)
    summary = train(model, cfg, h.StandInStream(h.markov_ids(4000)), progress=False, persist=False)
    return model, [r["loss"] for r in summary["history"]], len(calls)


def test_same_losses_and_weights_with_blocks_recomputed_in_backward(helpers, tmp_path):
    plain, plain_losses, plain_calls = _run(helpers, tmp_path, False)
    ckpt, ckpt_losses, ckpt_calls = _run(helpers, tmp_path, True)
    assert ckpt_losses == plain_losses or max(abs(a - b) for a, b in zip(ckpt_losses, plain_losses)) < 1e-6
    assert ckpt_calls == 2 * plain_calls == 6  # forward, then again in backward, each step
    assert list(ckpt.state_dict()) == list(plain.state_dict())
    for name, p in plain.state_dict().items():
        assert torch.allclose(ckpt.state_dict()[name], p, atol=1e-6), name
    with torch.no_grad():  # decoding and validation take the plain path
        ids = torch.randint(0, 64, (1, 12))
        assert torch.allclose(ckpt(ids), plain(ids), atol=1e-5)


@pytest.mark.slow
def test_compiled_blocks_train_to_the_same_losses(helpers, tmp_path):
    """`compile`: every block under torch.compile (inductor; about 20 s of compiling on CPU)."""
    _, plain_losses, _ = _run(helpers, tmp_path, False)
    compiled, compiled_losses, _ = _run(helpers, tmp_path / "c", False, compile=True)
    assert max(abs(a - b) for a, b in zip(compiled_losses, plain_losses)) < 1e-4
    assert "blocks.0.mixer.q_proj.weight" in compiled.state_dict()  # the module tree is untouched


def _performer(h, interval=1):
    torch.manual_seed(0)
    return CausalLM(h.tiny_model_config(layers={"A": {"mixer": {"name": "performer", "redraw_interval": interval}}}))


def test_performer_redraw_leaves_a_checkpointed_backward_equal_to_the_plain_one(helpers):
    """Redrawing features inside the forward would redraw again when checkpointing recomputes it:
    the backward would differentiate other features than the loss used."""
    from speedlm.train.activation_checkpointing import checkpoint_blocks

    x = torch.randint(0, 64, (2, 24))
    grads = []
    for checkpointing in (False, True):
        model = _performer(helpers)
        if checkpointing:
            checkpoint_blocks(model)
        model.train()
        before = model.blocks[0].mixer.projection.clone()
        model.loss(x[:, :-1], x[:, 1:]).total.backward()
        assert torch.equal(model.blocks[0].mixer.projection, before)  # no forward redraws
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        assert torch.allclose(grads[1][name], g, rtol=1e-6, atol=1e-9), name


def test_performer_redraws_once_per_optimizer_step_the_same_with_checkpointing(helpers, tmp_path):
    runs = []
    for checkpointing in (False, True):
        model = _performer(helpers, interval=2)
        first = model.blocks[0].mixer.projection.clone()
        cfg = TrainConfig(steps=3, batch_size=2, seq_len=16, warmup_steps=1, log_every=1, eval_every=0,
                          out_dir=str(tmp_path / str(checkpointing)), activation_checkpointing=checkpointing)
        summary = train(model, cfg, helpers.StandInStream(helpers.markov_ids(2000)), progress=False, persist=False)
        assert not torch.equal(model.blocks[0].mixer.projection, first)  # redrawn during training
        runs.append((model, [r["loss"] for r in summary["history"]]))
    (plain, plain_losses), (ckpt, ckpt_losses) = runs
    assert max(abs(a - b) for a, b in zip(plain_losses, ckpt_losses)) < 1e-6
    for name, p in plain.state_dict().items():  # weights and the features drawn at each step agree
        assert torch.allclose(ckpt.state_dict()[name], p, atol=1e-6), name


def test_performer_redraw_counts_optimizer_steps_not_forward_calls(helpers):
    from speedlm.layers.step_hooks import after_optimizer_step

    model = CausalLM(helpers.tiny_model_config(layers={"A": {"mixer": {"name": "performer", "redraw_interval": 2}}}))
    mixer = model.blocks[0].mixer
    start = mixer.projection.clone()
    model.train()
    for _ in range(3):
        model(torch.randint(0, 64, (1, 8))).sum().backward()
    assert torch.equal(mixer.projection, start)
    after_optimizer_step(model, 1)
    assert torch.equal(mixer.projection, start)
    after_optimizer_step(model, 2)
    assert not torch.equal(mixer.projection, start)
