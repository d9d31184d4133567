"""A batch decodes under a lossy KV policy as its rows would alone. Rows share one selection of
cache slots; without a cap each row's window and marks mask what is not its own (SepLLM's
separators, the sinks), so the union changes nothing. A capped (streaming) SepLLM cache shows
every cached key and rotates keys by their slot, so a shared selection would mix the rows: it
refuses to compress a batch of more than one row (the review found rows 0.35 apart in logits)."""

import pytest
import torch

from speedlm.cache.policies import make_policy
from speedlm.errors import SpeedlmError
from speedlm.models import CausalLM, ModelConfig
from speedlm.ops.metrics import rel_rms_error

SEPARATORS = (3, 7)


def _model():
    torch.manual_seed(0)
    return CausalLM(ModelConfig(vocab_size=16, d_model=32, n_layers=2, n_heads=4, max_seq_len=256)).double().eval()


@torch.no_grad()
def _decode(model, ids, policy):
    cache = model.init_cache(policy)
    out = [model(ids[:, :10], cache)] + [model(ids[:, i : i + 1], cache) for i in range(10, ids.shape[1])]
    return torch.cat(out, 1)


def _ids(t):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 16, (2, t), generator=g)
    ids[1, ::5] = 3  # the rows' separators differ in number and place
    return ids


@pytest.mark.parametrize(
    "options",
    [
        dict(name="sepllm", window=8, sinks=2, separators=SEPARATORS),
        dict(name="sink", window=8, sinks=2),
        dict(name="window", window=8),
        dict(name="sepllm", window=8, sinks=2, separators=SEPARATORS, separator_cache=4, cap=200),  # never full
    ],
    ids=["sepllm", "sink", "window", "sepllm-capped-below-the-cap"],
)
def test_a_batch_decodes_as_its_rows_alone(options):
    model, ids = _model(), _ids(90)
    policy = make_policy(**options)
    batch = _decode(model, ids, policy)
    for r in range(2):
        assert rel_rms_error(batch[r : r + 1], _decode(model, ids[r : r + 1], policy)) < 1e-12


def test_a_capped_sepllm_cache_refuses_to_compress_a_batch_and_streams_one_row():
    model, ids = _model(), _ids(90)
    policy = make_policy("sepllm", window=8, sinks=2, separators=SEPARATORS, separator_cache=4, cap=20)
    with pytest.raises(SpeedlmError, match="one row at a time"):
        _decode(model, ids, policy)
    one = _decode(model, ids[1:], policy)  # a single row streams past the cap
    assert one.shape == (1, 90, 16) and torch.isfinite(one).all()
