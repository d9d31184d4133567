"""Every registered mixer on CUDA, through whatever backend its dispatch picks there (SDPA's flash
kernel, compiled FlexAttention for every sparse pattern, fla's and mamba-ssm's kernels where
installed, the torch forms elsewhere) == its float64 reference on the CPU: outputs causal and
bidirectional, input gradients, and cached decoding in pieces. And every registered MoE FFN with
`torch._grouped_mm` on CUDA == the per-expert loop. Skipped without a GPU; `make gpu-check`
runs it."""

import os

import pytest
import torch

from layers.test_contract import BIDIRECTIONAL, CAUSAL, DECODING, ENTRIES, ids_of, meta, run_in_pieces
from speedlm.layers.dims import ModelDims
from speedlm.ops.metrics import rel_rms_error

# SPEEDLM_GPU_TEST_DEVICE=cpu runs the same checks on the CPU: a dry run of this file where no GPU is
DEVICE = os.environ.get("SPEEDLM_GPU_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")

T = 75  # not a multiple of any chunk or block size
# the contract suite's sizes with 16-wide heads: FlexAttention's CUDA kernels want head dims >= 16
DIMS = ModelDims(d_model=64, n_heads=4, max_seq_len=128)


def make(name, dtype=torch.float64):
    torch.manual_seed(1)
    entry = ENTRIES[name]
    return entry.cls(DIMS, **entry.contract_spec).to(dtype)


def x_of(t, b=2):
    return torch.randn(b, t, DIMS.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(t))

TOL = 2e-3  # float32 with TF32 matmuls off; fla's Triton kernels accumulate in float32


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # noqa: E501 (no-ops on the CPU)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _pair(name):
    ref = make(name)  # float64, CPU
    gpu = make(name, torch.float32).to(DEVICE)
    return ref, gpu


@pytest.mark.parametrize("name", CAUSAL)
def test_causal_mixer_on_cuda_equals_its_float64_reference_with_gradients(name):
    ref, gpu = _pair(name)
    x, ids = x_of(T), ids_of(T)
    expected = ref.reference(x, meta(ids))
    xg = x.float().to(DEVICE).requires_grad_()
    out = gpu(xg, meta(ids.to(DEVICE)))
    assert rel_rms_error(out.double().cpu(), expected) < TOL, name
    xr = x.clone().requires_grad_()
    g = torch.randn_like(expected)
    (grad_ref,) = torch.autograd.grad((ref(xr, meta(ids)) * g).sum(), xr)
    (grad,) = torch.autograd.grad((out * g.float().to(DEVICE)).sum(), xg)
    assert rel_rms_error(grad.double().cpu(), grad_ref) < TOL, name


@pytest.mark.parametrize("name", BIDIRECTIONAL)
def test_bidirectional_mixer_on_cuda_equals_its_float64_reference(name):
    ref, gpu = _pair(name)
    x, ids = x_of(T), ids_of(T)
    expected = ref.reference(x, meta(ids, causal=False))
    with torch.no_grad():
        out = gpu(x.float().to(DEVICE), meta(ids.to(DEVICE), causal=False))
    assert rel_rms_error(out.double().cpu(), expected) < TOL, name


@pytest.mark.parametrize("name", DECODING)
def test_cached_decoding_on_cuda_equals_the_float64_forward(name):
    ref, gpu = _pair(name)
    x, ids = x_of(T), ids_of(T)
    expected = ref.reference(x, meta(ids))
    with torch.no_grad():
        out, _ = run_in_pieces(gpu, x.float().to(DEVICE), ids.to(DEVICE), [30, 31, 32, 50])  # prefill, single tokens, a chunk
    assert rel_rms_error(out.double().cpu(), expected) < TOL, name


@pytest.mark.parametrize("k", [1, 2])
def test_moe_grouped_mm_on_cuda_equals_the_float64_reference_with_gradients(k):
    from ops.test_moe import weights
    from speedlm.ops import moe
    from speedlm.ops.moe import moe_swiglu, moe_swiglu_reference, route_topk

    n, d, h, e = 300, 64, 96, 8
    x = torch.randn(n, d, dtype=torch.float64)
    rw, experts, _ = route_topk(torch.randn(n, e, dtype=torch.float64), k)
    ws = weights(e, d, h, torch.float64)
    ref_in = [x.clone().requires_grad_(), *(w.clone().requires_grad_() for w in ws)]
    ref = moe_swiglu_reference(ref_in[0], rw, experts, *ref_in[1:])
    if DEVICE == "cuda":
        assert moe.resolve_backend("auto", torch.device("cuda"), torch.float32) == "grouped_mm", \
            "torch._grouped_mm did not probe as working on this GPU"
    elif not moe._grouped_mm_works(torch.device(DEVICE), torch.float32):
        pytest.skip(f"torch._grouped_mm does not run on {DEVICE}")
    gpu_in = [t.float().to(DEVICE).requires_grad_() for t in (x, *ws)]
    out, _ = moe_swiglu(gpu_in[0], rw.float().to(DEVICE), experts.to(DEVICE), *gpu_in[1:], backend="grouped_mm")
    assert rel_rms_error(out.double().cpu(), ref) < 1e-4
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad((out * g.float().to(DEVICE)).sum(), gpu_in), torch.autograd.grad((ref * g).sum(), ref_in)):
        assert rel_rms_error(a.double().cpu(), b) < 1e-4


def test_the_registry_has_something_to_check():
    assert len(CAUSAL) >= 20 and all(n in ENTRIES for n in DECODING)
