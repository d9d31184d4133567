"""CUDA paths, checked against the same float64 references as the CPU forms. Skipped without a
GPU (the suite never depends on one); on a GPU machine: `python -m pytest tests/gpu -v`."""

import pytest
import torch

from speedlm.ops.attention import attention_reference, causal_mask, causal_sdpa
from speedlm.ops.masks import AttentionMask, SlidingWindow
from speedlm.ops.metrics import rel_rms_error
from speedlm.ops.sparse_attention import SPARSE_ATTENTION, flex_sparse_attention, sparse_attention_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _qkv(h, hkv, tq, tk, dtype, grad=False):
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=dtype).requires_grad_(grad)  # noqa: E731
    return mk(2, h, tq, 64), mk(2, hkv, tk, 64), mk(2, hkv, tk, 64)


@pytest.mark.parametrize("hkv", [8, 2, 1], ids=["mha", "gqa", "mqa"])
def test_sdpa_flash_bf16_matches_float64_reference(hkv):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = _qkv(8, hkv, 1000, 1000, torch.bfloat16)
    ref = attention_reference(q.double(), k.double(), v.double(), causal_mask(1000, 1000, "cuda"))
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # fails loudly if flash cannot run these inputs
        out = causal_sdpa(q, k, v)
    assert rel_rms_error(out, ref) < 1e-2


def test_compiled_flex_forward_and_backward_match_reference():
    q, k, v = _qkv(8, 2, 1000, 1000, torch.float32, grad=True)
    mask = AttentionMask(SlidingWindow(256), 1000, 1000, 0, 0)
    out = flex_sparse_attention(q, k, v, mask)
    ref = sparse_attention_reference(q.double(), k.double(), v.double(), mask)
    assert rel_rms_error(out, ref) < 1e-3  # tf32-level
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * g.double()).sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        assert rel_rms_error(a, b) < 1e-3


def test_flex_with_per_row_documents_matches_reference_and_is_what_auto_picks():
    """Packed documents give a per-row mask: flex builds a batched BlockMask from it."""
    q, k, v = _qkv(8, 2, 700, 700, torch.float32, grad=True)
    doc = (torch.arange(700, device="cuda")[None] >= torch.tensor([[300], [450]], device="cuda")).long()
    mask = AttentionMask(SlidingWindow(128), 700, 700, 0, 0, True, doc, doc)
    assert SPARSE_ATTENTION.choose(q, k, v, mask, None) == "flex"
    out = flex_sparse_attention(q, k, v, mask)
    ref = sparse_attention_reference(q.double(), k.double(), v.double(), mask)
    assert rel_rms_error(out, ref) < 1e-3


def test_bf16_linear_attention_state_stays_float32_on_cuda():
    from speedlm.models import build_model

    m = build_model("linear-attention").cuda().bfloat16()
    cache = m.init_cache()
    m(torch.randint(0, 256, (1, 20), device="cuda"), cache)
    assert all(s.dtype == torch.float32 for s in cache.layers[0].state)


def test_training_step_under_bf16_autocast(tmp_path):
    import numpy as np

    from speedlm.data import TokenStream
    from speedlm.models import build_model
    from speedlm.train import TrainConfig, train

    ids = np.random.RandomState(0).randint(0, 256, 50_000).astype(np.uint8)
    for preset in ("transformer-tiny", "sliding-window-tiny", "linear-attention-tiny"):
        cfg = TrainConfig(steps=5, batch_size=4, seq_len=256, warmup_steps=1, eval_every=0, eval_batches=2,
                          save_every=0, device="cuda", out_dir=str(tmp_path / preset))
        summary = train(build_model(preset), cfg, TokenStream(ids), ids[:5000], progress=False)
        assert np.isfinite(summary["loss"]) and summary["mfu"] > 0


def test_cached_greedy_generation_on_cuda():
    from speedlm.generate import generate
    from speedlm.models import build_model, presets_for

    for preset in presets_for("ar"):
        torch.manual_seed(0)
        m = build_model(preset).cuda()
        with torch.no_grad():
            m.embed.weight.mul_(20)  # sharpen the random model: no near-ties for greedy to flip on
        prompt = torch.randint(0, 256, (2, 45), device="cuda")
        assert torch.equal(generate(m, prompt, 20).ids, generate(m, prompt, 20, use_cache=False).ids)
