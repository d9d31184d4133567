"""LSH attention (ops/lsh_attention.py): the chunked form and the decoding form against the
naive dense-mask reference, the one-bucket case against plain shared-QK attention, and the
bucket rule itself."""

import pytest
import torch

from speedlm.ops.lsh_attention import (
    SELF_LOGIT,
    bucket_ranks,
    lsh_attention,
    lsh_attention_decode,
    lsh_attention_reference,
    lsh_buckets,
    shared_keys,
)
from speedlm.ops.metrics import rel_rms_error


def qkv(t, d=8, h=2, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, t, d, dtype=torch.float64, generator=g),
            torch.randn(b, h, t, d, dtype=torch.float64, generator=g))


def rotations(rounds, d, n_buckets, seed=1):
    return torch.randn(rounds, d, n_buckets // 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def test_one_bucket_one_chunk_is_dense_shared_qk_attention_with_the_self_mask():
    qk, v = qkv(29)
    buckets = torch.zeros(2, 2, 29, 1, dtype=torch.long)
    keys = shared_keys(qk)
    logits = qk @ keys.transpose(-1, -2)
    eye = torch.eye(29, dtype=torch.bool)
    logits = logits.masked_fill(eye, SELF_LOGIT)
    for causal in (True, False):
        lg = logits.masked_fill(~torch.ones(29, 29, dtype=torch.bool).tril(), -float("inf")) if causal else logits
        dense = torch.softmax(lg, -1) @ v
        assert rel_rms_error(lsh_attention(qk, v, buckets, 2, 64, causal=causal), dense) < 1e-12
    # a query sees itself only when nothing else is there: the first token's output is its own value
    first = lsh_attention(qk, v, buckets, 2, 64)[:, :, 0]
    assert rel_rms_error(first, v[:, :, 0]) < 1e-14


@pytest.mark.parametrize("t", [31, 67])
@pytest.mark.parametrize("causal", [True, False])
def test_chunked_form_equals_the_dense_mask_reference_with_rounds_and_gradients(t, causal):
    qk, v = qkv(t, seed=t)
    qk.requires_grad_(True), v.requires_grad_(True)
    buckets = lsh_buckets(qk.detach(), rotations(3, 8, 6))
    fast = lsh_attention(qk, v, buckets, 6, 4, causal=causal)
    ref = lsh_attention_reference(qk, v, buckets, 4, causal=causal)
    assert rel_rms_error(fast, ref) < 1e-12
    g = torch.randn_like(fast)
    for a, b in zip(torch.autograd.grad((fast * g).sum(), [qk, v]), torch.autograd.grad((ref * g).sum(), [qk, v])):
        assert torch.isfinite(a).all() and rel_rms_error(a, b) < 1e-10


def test_decoding_form_sees_the_same_keys_as_the_chunked_form():
    qk, v = qkv(53, seed=3)
    buckets = lsh_buckets(qk, rotations(2, 8, 4))
    full = lsh_attention(qk, v, buckets, 4, 5)
    keys = shared_keys(qk)
    steps = [lsh_attention_decode(qk[:, :, i : i + 1], keys[:, :, : i + 1], v[:, :, : i + 1], buckets[:, :, : i + 1], 4, 5)
             for i in range(53)]
    assert rel_rms_error(torch.cat(steps, 2), full) < 1e-12
    tail = lsh_attention_decode(qk[:, :, 40:], keys, v, buckets, 4, 5)  # a chunk of queries at once
    assert rel_rms_error(tail, full[:, :, 40:]) < 1e-12


def test_ranks_count_the_earlier_tokens_of_the_same_bucket():
    buckets = torch.tensor([[2, 0, 2, 2, 1, 0, 2]])
    rank, counts = bucket_ranks(buckets, 3)
    assert rank.tolist() == [[0, 0, 1, 2, 0, 1, 3]]
    assert counts.tolist() == [[2, 1, 4]]


def test_a_query_sees_only_its_bucket_and_its_own_and_previous_chunk():
    qk, v = qkv(40, h=1, b=1, seed=5)
    buckets = (torch.arange(40) % 2)[None, None, :, None]  # two interleaved buckets
    out = lsh_attention(qk, v, buckets, 2, 3)
    # query 39 (bucket 1, rank 19, chunk 6) sees bucket-1 keys of rank 15..19: positions 31..39 odd
    v2 = v.clone()
    v2[:, :, 38] += 1.0  # the other bucket
    v2[:, :, 29] += 1.0  # its bucket, rank 14: two chunks back
    assert torch.equal(lsh_attention(qk, v2, buckets, 2, 3)[:, :, 39], out[:, :, 39])
    v2[:, :, 31] += 1.0  # rank 15: the previous chunk
    assert not torch.equal(lsh_attention(qk, v2, buckets, 2, 3)[:, :, 39], out[:, :, 39])


def test_angular_hash_is_invariant_to_scale_and_nearby_vectors_share_buckets():
    qk, _ = qkv(64, d=16, seed=7)
    rot = rotations(4, 16, 8)
    b = lsh_buckets(qk, rot)
    assert torch.equal(b, lsh_buckets(3.0 * qk, rot))
    near = lsh_buckets(qk + 1e-3 * torch.randn_like(qk), rot)
    far = lsh_buckets(torch.randn_like(qk), rot)
    assert (near == b).float().mean() > 0.9 > 0.5 > (far == b).float().mean()
