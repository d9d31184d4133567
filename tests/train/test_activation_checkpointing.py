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
