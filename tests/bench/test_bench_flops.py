"""`speedlm bench flops` and `executed_flops_per_token`: FlopCounterMode sees CPU SDPA (by the
analytic count's rule), a measured step leaves the model as it was, and the table compares the
counted with the executed FLOPs per token per preset and layer kind."""

import json

import pytest
import torch
import torch.nn.functional as F

from speedlm.bench.common import text_token_ids
from speedlm.bench.flops import executed_flops_per_token, flop_counter, run_flops_bench
from speedlm.cli import main
from speedlm.models import build_model


def test_sdpa_is_counted_on_cpu_causally_by_visible_pairs():
    q, k, v = (torch.randn(2, 4, 50, 8, requires_grad=True) for _ in range(3))
    with flop_counter() as fc:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    pairs = 2 * 4 * 50 * 51 // 2
    assert fc.get_total_flops() == 2 * pairs * (8 + 8)
    with flop_counter() as fc:
        out.sum().backward()
    assert fc.get_total_flops() == 2 * pairs * (3 * 8 + 2 * 8)  # torch's backward formula, at the same pairs
    with flop_counter() as fc:  # an explicit mask: every pair is computed
        F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(50, 50, dtype=torch.bool).tril())
    assert fc.get_total_flops() == 2 * 2 * 4 * 50 * 50 * 16


def test_executed_flops_leave_the_model_as_it_was():
    torch.manual_seed(0)
    model = build_model("mod").eval()
    ids = text_token_ids((2, 64))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = torch.random.get_rng_state()
    train = executed_flops_per_token(model, ids, training=True)
    infer = executed_flops_per_token(model, ids, training=False)
    assert not model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert torch.equal(torch.random.get_rng_state(), state)
    # a dense transformer's training step: 3x the forward's matrix products, attention's backward 2.5x its forward
    dense = build_model("transformer")
    counted = dense.flops_per_token(64, training=True)
    assert counted < executed_flops_per_token(dense, ids) < 1.1 * counted
    assert executed_flops_per_token(dense, ids, training=False) == pytest.approx(dense.flops_per_token(64, training=False))
    # training routes ceil(capacity T) tokens by top-k, as counted; inference routes by the causal
    # rule (a fresh router: about half the tokens), which the count at capacity does not follow
    assert train == pytest.approx(model.flops_per_token(64, training=True), rel=0.03)
    assert infer > model.flops_per_token(64, training=False)


def test_bench_flops_compares_counted_and_executed_per_layer_kind(tmp_path):
    result = run_flops_bench(["transformer-tiny", "mod-tiny", "mamba-tiny"], lengths=[64], out_dir=str(tmp_path))
    rows = {r["preset"]: r for r in result["results"]}
    assert all(r["analytic_sum_matches"] for r in rows.values())
    assert set(rows["mod-tiny"]["parts"]) == {"attention", "mod(attention)", "model"}
    assert rows["transformer-tiny"]["parts"]["model"]["ratio"] == pytest.approx(1.0)  # the LM head
    mamba = rows["mamba-tiny"]
    assert mamba["visible"] < mamba["counted"]  # its scan is elementwise: not what the counter sees
    assert 1.0 <= mamba["ratio"] < 1.05  # the hand-written scan backward adds a few bmm
    saved = json.loads((tmp_path / "bench_flops.json").read_text())
    assert saved["meta"]["training"] and len(saved["results"]) == 3
    assert "| mod-tiny | 64 |" in (tmp_path / "bench_flops.md").read_text()


def test_bench_flops_command(tmp_path, capsys):
    assert main(["bench", "flops", "--presets", "linformer", "--lengths", "32", "--inference", "--out", str(tmp_path)]) == 0
    assert "| linformer | 32 |" in capsys.readouterr().out
    assert main(["bench", "flops", "--presets", "nope", "--out", str(tmp_path)]) == 2
