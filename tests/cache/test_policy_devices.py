"""Every index a KV policy or the token buffer builds lives on the cache's device: a CPU index
into CUDA buffers is an error once a lossy policy starts evicting (the sinks policy built its
slot indices with a bare `torch.arange`). Checked on any machine by watching the factory calls
made while caches run past their budgets: each must name its device. `tests/gpu` runs the same
policies on CUDA."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

from speedlm.cache import KVCache, TokenBuffer
from speedlm.cache.kv import PrefixWindowPolicy, SinkPolicy, WindowPolicy
from speedlm.cache.sepllm import SepLLMPolicy
from speedlm.layers.rope import apply_rope, rope_for
from speedlm.layers.transformer_xl import SegmentMemoryPolicy
from support.parts import SinkWindowPolicy

_FACTORIES = {torch.arange, torch.zeros, torch.ones, torch.empty, torch.full, torch.tensor, torch.as_tensor,
              torch.linspace, torch.eye, torch.rand, torch.randn, torch.randint}


class _DevicelessFactories(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FACTORIES and kwargs.get("device") is None:
            self.calls.append(func.__name__)
        return func(*args, **kwargs)


POLICIES = {
    "window": WindowPolicy(5),
    "sinks": SinkPolicy(2, 5),
    "sinks-original-positions": SinkWindowPolicy(2, 5),
    "prefix-window": PrefixWindowPolicy(3, 5),
    "sepllm": SepLLMPolicy((1,), initial=2, window=4),
    "sepllm-capped": SepLLMPolicy((1,), initial=1, window=3, separator_cache=3, cap=8, shift_positions=True),
    "segment-memory": SegmentMemoryPolicy(segment=4, memory=3),
}


@pytest.mark.parametrize("explicit", [False, True], ids=["int-positions", "tensor-positions"])
@pytest.mark.parametrize("name", list(POLICIES))
@torch.no_grad()
def test_policies_and_buffers_build_their_indices_on_the_cache_device(name, explicit):
    policy = POLICIES[name]
    cache = KVCache(policy, rotate=lambda k, p: apply_rope(k, *rope_for(p, 1, 4, 10000.0, k.device, k.dtype)))
    ids = torch.tensor([[(7 * i) % 10 for i in range(240)]])  # separator id 1 every tenth token
    calls, pos = [], 0
    for t in (3, 1, 1, 5, 1, 2, 1, 1, 6, 1, 1, 1) * 10:  # the inputs, made outside the watched region
        # (past the training-free SepLLM cache's batch of stale slots, so it compacts too)
        at = torch.arange(pos, pos + t, device="cpu")[None] if explicit else pos
        marks = policy.mark(ids[:, pos : pos + t], pos, t, "cpu") if policy.marks_keys else None
        calls.append((torch.randn(1, 2, t, 4), torch.randn(1, 2, t, 4), at, marks))
        pos += t
    with _DevicelessFactories() as mode:
        for k, v, at, marks in calls:
            cache.extend(k, v, at, marks)
        cache.entries()
    assert cache.length < pos  # the policy evicted: its selections ran
    assert mode.calls == [], f"{name}: factory calls without a device: {mode.calls}"


@torch.no_grad()
def test_a_plain_token_buffer_builds_no_deviceless_tensors():
    buf = TokenBuffer(SinkPolicy(1, 3), n_entries=1)
    inputs = [(torch.randn(1, 1, 2), i) for i in range(10)]
    with _DevicelessFactories() as mode:
        for x, i in inputs:
            buf.extend(x, positions=i)
        buf.entries()
    assert mode.calls == [] and buf.length == 3
