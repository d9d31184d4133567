"""The MoE balance loss (speedlm/ops/moe.py) against Hugging Face's Mixtral
`load_balancing_loss_func` on random routers. Here, beside the other transformers tests, because
importing Mixtral's modeling module alone costs ~8 s."""

import pytest
import torch

pytest.importorskip("transformers")
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func  # noqa: E402

from speedlm.ops.moe import balance_loss, route_topk  # noqa: E402


@pytest.mark.parametrize("k", [1, 2, 3])
def test_balance_loss_matches_transformers_load_balancing_loss_func(k):
    """Both are Switch's E * sum_i f_i P_i; Hugging Face counts f_i per token (sum_i f_i = k), we
    per assignment (sum_i f_i = 1, so a balanced router scores 1): equal for top-1, k times ours
    for top-k. Catches a drift from the reference implementation (ties are measure-zero here)."""
    logits = torch.randn(37, 6, generator=torch.Generator().manual_seed(k))
    _, experts, probs = route_topk(logits, k)
    hf = load_balancing_loss_func((logits,), num_experts=6, top_k=k)
    assert hf.item() == pytest.approx(k * balance_loss(probs, experts).item(), rel=1e-5)
