"""`CausalLM.context_reach` asks the blocks, and each block adds what its own parts look back
(Conformer's causal convolution) to its mixer's reach (a window, a BaseConv's kernel,
LogSparse's restart and convolutions). Checked against the model itself: the furthest any
output's gradient reaches back into the input (the model used to ask only the mixers, and missed
the convolutions)."""

import pytest
import torch

from speedlm.models import CausalLM, ModelConfig


def _config(layers, pattern="A", n_layers=2):
    return ModelConfig(vocab_size=16, d_model=32, n_layers=n_layers, n_heads=4, max_seq_len=128, pattern=pattern,
                       layers=layers)


CASES = {
    "sliding-window": ({"A": {"mixer": {"name": "sliding_window", "window": 5}}}, "A", 2 * 4),
    "conformer-window": (
        {"A": {"mixer": {"name": "sliding_window", "window": 5}, "block": {"name": "conformer", "kernel": 3}}}, "A",
        2 * (4 + 2),
    ),
    "base-conv-and-window": (
        {"C": {"mixer": {"name": "base_conv", "kernel": 3}}, "S": {"mixer": {"name": "sliding_window", "window": 4}}},
        "CS", 2 + 3,
    ),
    # within a segment of 8 the furthest key is 4 back (powers of two), plus the convolution
    "logsparse-restart-conv": ({"A": {"mixer": {"name": "logsparse", "local": 2, "restart": 8, "conv_kernel": 3}}}, "A", 4 + 2),
    "full-attention": ({"A": {"mixer": {"name": "attention"}}}, "A", None),
}


def _measured_reach(model, t=40):
    """How far back any position's output depends on the input, from the gradients."""
    ids = torch.randint(0, 16, (1, t))
    x = model.embed.weight[ids].detach().requires_grad_(True)
    model.embed.forward = lambda _ids: x  # feed the leaf through the model's own forward
    out = model(ids)[0]
    furthest = 0
    for p in range(t):
        (g,) = torch.autograd.grad(out[p].pow(2).sum(), x, retain_graph=True)
        reached = (g[0].abs().sum(-1) > 0).nonzero()[:, 0]
        furthest = max(furthest, p - int(reached.min()))
    return furthest


@pytest.mark.parametrize("name", list(CASES))
def test_context_reach_is_what_the_model_depends_on(name):
    layers, pattern, expected = CASES[name]
    torch.manual_seed(0)
    model = CausalLM(_config(layers, pattern, n_layers=1 if name.startswith("logsparse") else 2)).double().eval()
    assert model.context_reach() == expected
    assert _measured_reach(model) == (39 if expected is None else expected)


def test_mixture_of_depths_reaches_as_far_as_its_inner_block():
    layers = {"A": {"mixer": {"name": "sliding_window", "window": 5}, "block": {"name": "mod", "inner": "conformer"}}}
    model = CausalLM(_config(layers))
    assert [b.reach() for b in model.blocks] == [4 + 14, 4 + 14]  # the conformer's default kernel 15
