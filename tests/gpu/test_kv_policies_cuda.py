"""Every lossy KV policy on CUDA: decoding far past the budget (so the policies evict, move
sinks and compact) gives the logits the same model gives on the CPU. Skipped without a GPU;
on a GPU machine: `python -m pytest tests/gpu -v`."""

import pytest
import torch

from speedlm.cache.policies import make_policy
from speedlm.models import CausalLM, ModelConfig
from speedlm.ops.metrics import rel_rms_error

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

POLICIES = {
    "sink": dict(name="sink", window=16, sinks=4),
    "window": dict(name="window", window=16),
    "sepllm": dict(name="sepllm", window=16, sinks=4, separators=(3, 7)),
    "sepllm-capped": dict(name="sepllm", window=16, sinks=4, separators=(3, 7), separator_cache=8, cap=40),
}


@torch.no_grad()
def _decode(model, ids, policy, device):
    model = model.to(device)
    cache = model.init_cache(policy)
    out = [model(ids[:, :20].to(device), cache)]  # a prefill past the window, then token by token
    out += [model(ids[:, i : i + 1].to(device), cache) for i in range(20, ids.shape[1])]
    return torch.cat(out, 1).cpu(), cache


@pytest.mark.parametrize("name", list(POLICIES))
def test_lossy_policies_decode_on_cuda_as_on_the_cpu(name):
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(vocab_size=16, d_model=32, n_layers=2, n_heads=4, max_seq_len=256)).double().eval()
    ids = torch.randint(0, 16, (2, 160))  # batch of two, 160 tokens against a 16-token window
    policy = make_policy(**POLICIES[name])
    cpu, _ = _decode(model, ids, policy, "cpu")
    gpu, cache = _decode(model, ids, policy, "cuda")
    assert rel_rms_error(gpu, cpu) < 1e-10
    assert all(k.device.type == "cuda" for layer in cache.layers for k in layer.tensors())
