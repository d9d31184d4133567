"""Reversible residual layers and the chunked FFN (models/reversible.py, ModelConfig's
`reversible` and `ffn_chunks`): the recomputing backward gives ordinary autograd's gradients,
activation memory does not grow with depth, decoding equals the forward, and what cannot be
reversible is refused."""

import functools

import pytest
import torch

from speedlm.errors import SpeedlmError
from speedlm.models import ModelConfig, build_model
from speedlm.models import stack
from speedlm.models.reversible import reversible_forward
from speedlm.ops.metrics import rel_rms_error

REFORMER = {"name": "reformer", "n_hashes": 2, "n_buckets": 4, "chunk": 4}


def model(mixer=None, n_layers=3, **fields):
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_heads=4, n_layers=n_layers, max_seq_len=128,
                      layers={"A": {"mixer": mixer or {"name": "attention"}}}, **fields)
    return build_model(cfg).double()


def ids(t=37, b=2):
    return torch.randint(0, 256, (b, t), generator=torch.Generator().manual_seed(t))


def grads(m, x):
    m.zero_grad()
    m.loss(x[:, :-1], x[:, 1:]).total.backward()
    return [p.grad.clone() for p in m.parameters()]


@pytest.mark.parametrize("mixer", [None, REFORMER])
def test_recomputing_backward_equals_ordinary_autograd(mixer, monkeypatch):
    m, x = model(mixer, reversible=True, ffn_chunks=3), ids()
    fast = grads(m, x)
    monkeypatch.setattr(stack, "reversible_forward", functools.partial(reversible_forward, recompute=False))
    slow = grads(m, x)
    assert all(torch.isfinite(g).all() for g in fast)
    for a, b in zip(fast, slow):
        assert rel_rms_error(a, b) < 1e-10


def test_chunked_ffn_is_the_same_function():
    x = ids()
    whole, chunked = model(), model(ffn_chunks=4)
    chunked.load_state_dict(whole.state_dict())
    assert rel_rms_error(chunked(x), whole(x)) < 1e-13


def _saved_bytes(m, x) -> int:
    """Bytes autograd keeps for the backward pass of one loss (what activation memory is)."""
    seen = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            seen[(t.data_ptr(), t.shape)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m.loss(x[:, :-1], x[:, 1:])
    return sum(seen.values())


def test_reversible_activation_memory_does_not_grow_with_depth():
    x = ids(65)
    rev = [_saved_bytes(model(REFORMER, n_layers=n, reversible=True), x) for n in (2, 4, 8)]
    plain = [_saved_bytes(model(REFORMER, n_layers=n), x) for n in (2, 4, 8)]
    assert rev[0] == rev[1] == rev[2]
    assert plain[2] > plain[1] > plain[0] > rev[0]


@torch.no_grad()
def test_reversible_models_decode_as_their_forward():
    m, x = model(REFORMER, reversible=True), ids(30)
    full = m(x)
    cache = m.init_cache()
    steps = [m(x[:, :9], cache)] + [m(x[:, i : i + 1], cache) for i in range(9, 30)]
    assert rel_rms_error(torch.cat(steps, 1), full) < 1e-12


def test_what_cannot_be_reversible_is_refused_in_one_line():
    with pytest.raises(SpeedlmError, match="reversible layers need blocks"):
        ModelConfig(layers={"A": {"mixer": "attention", "block": "mod"}}, reversible=True).validate()
    with pytest.raises(SpeedlmError, match="ffn_chunks must be a positive integer"):
        ModelConfig(ffn_chunks=0).validate()
    with pytest.raises(SpeedlmError, match="MoE adds auxiliary losses"):
        model(n_layers=2, reversible=True, ffn={"name": "moe", "experts": 4, "top_k": 2})
    # Performer redraws between optimizer steps, not in a forward: a recomputed forward is the same
    model({"name": "performer", "redraw_interval": 10}, reversible=True)
    with pytest.raises(SpeedlmError, match="not position-wise"):
        model(ffn={"name": "moe", "experts": 4, "top_k": 2}, ffn_chunks=2)
    # a part that adds a loss at run time without declaring it is still refused, in one line
    from speedlm.layers.ffn import FFN

    class Noisy(FFN):
        def forward(self, x, meta):
            if meta.aux is not None:
                meta.aux.add("noise", x.sum() * 0)
            return x * 0

        def flops_per_token(self):
            return 0.0

    m = model(n_layers=2, reversible=True)
    m.blocks[0].ffn = Noisy(m.blocks[0].dims)
    with pytest.raises(SpeedlmError, match="cannot carry auxiliary losses"):
        m.loss(ids()[:, :-1], ids()[:, 1:])


def test_recompute_runs_under_the_forward_autocast(monkeypatch):
    m, x = model(REFORMER, reversible=True, ffn_chunks=2), ids()
    m.float()
    seen = []
    ffn = m.blocks[0].ffn
    inner = ffn.forward
    monkeypatch.setattr(ffn, "forward", lambda *a: seen.append(torch.is_autocast_enabled("cpu")) or inner(*a))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = grads(m, x)
    assert len(seen) == 4 and all(seen)  # 2 pieces forward, 2 recomputed in backward: all under autocast
    monkeypatch.undo()
    monkeypatch.setattr(stack, "reversible_forward", functools.partial(reversible_forward, recompute=False))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        slow = grads(m, x)
    for a, b in zip(fast, slow):
        assert rel_rms_error(a, b) < 5e-3  # bf16 rounding: the two backward passes sum in different orders
