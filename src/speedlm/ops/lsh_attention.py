"""LSH attention (Reformer; Kitaev et al. 2020, arXiv:2001.04451), its decoding form, and the
float64 reference.

Shared-QK attention: each head has one projection; keys are its unit-normalised vectors. Per
hash round a fixed random rotation R hashes every vector to a bucket, argmax([xR; -xR]) (angular
LSH), and a query attends only to keys of its own bucket. Buckets are sorted and split into
chunks of `chunk` keys; a query sees its own chunk and the previous one. Rounds run
independently and are combined by their log-sum-exps, which is attention over the union of
the rounds' keys with multiplicity: a key found in several rounds counts once per round (no
log-count correction for duplicates, as in trax's implementation).

One departure, for causality: chunks are aligned per bucket (each bucket's keys, in order,
fill whole chunks of its own) rather than cut from the concatenated sort order. A key's chunk
then depends only on the tokens before it, so no later token can move an earlier query's
chunk boundary; causal training, prefill and token-by-token decoding see the same keys, and a
decoding step needs only the cached keys, values and bucket ids. In the sort order's terms: a
query at rank r of its bucket sees the bucket's keys of rank (r // chunk - 1) * chunk and
above (up to its own position when causal, up to the end of its chunk otherwise).

A query sees itself only when nothing else is visible (the self logit is set to -1e5, the
paper's), since with shared QK a vector's dot product with its own key dominates.

Cost per round: O(T x 2 chunk) scores after an O(T log T) sort; no T x T mask.
"""

from __future__ import annotations

import torch

SELF_LOGIT = -1e5  # Reformer's value: finite, so a query with no other key still sees itself
_MASKED = -1e9  # padding and other buckets' keys; finite, so empty padding rows stay NaN-free


def lsh_buckets(vectors: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """vectors (B, H, T, D), rotations (R, D, n_buckets / 2) -> bucket ids (B, H, T, R)."""
    rot = torch.einsum("bhtd,rdn->bhtrn", vectors, rotations.to(vectors.dtype))
    return torch.cat([rot, -rot], dim=-1).argmax(dim=-1)


def shared_keys(qk: torch.Tensor) -> torch.Tensor:
    """The keys of shared-QK attention: unit vectors scaled by 1/sqrt(D) (the logit scale)."""
    return torch.nn.functional.normalize(qk, dim=-1) * qk.shape[-1] ** -0.5


def bucket_ranks(buckets: torch.Tensor, n_buckets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """buckets (..., T) -> (rank of each token among the earlier tokens of its bucket (..., T),
    tokens per bucket (..., n_buckets)); through one sort, O(T log T)."""
    t = buckets.shape[-1]
    idx = torch.arange(t, device=buckets.device)
    order = torch.argsort(buckets * t + idx, dim=-1)  # by bucket, then by position
    counts = torch.zeros(*buckets.shape[:-1], n_buckets, dtype=torch.long, device=buckets.device)
    counts.scatter_add_(-1, buckets, torch.ones_like(buckets))
    first = counts.cumsum(-1) - counts  # sorted index of each bucket's first token
    sorted_rank = idx - first.gather(-1, buckets.gather(-1, order))
    return torch.empty_like(buckets).scatter_(-1, order, sorted_rank), counts


def _slot_gather(x: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
    """x (B, H, T + 1, E) (row T: padding) at tok (B, H, R, S) -> (B, H, R, S, E)."""
    b, h, r, s = tok.shape
    flat = tok.reshape(b, h, r * s, 1).expand(-1, -1, -1, x.shape[-1])
    return x.gather(2, flat).view(b, h, r, s, x.shape[-1])


def _with_previous(z: torch.Tensor, fill) -> torch.Tensor:
    """Chunks (..., n, c, E) -> each chunk's previous chunk and itself (..., n, 2c, E)."""
    prev = torch.cat([torch.full_like(z[..., :1, :, :], fill), z[..., :-1, :, :]], dim=-3)
    return torch.cat([prev, z], dim=-2)


def _combine_rounds(out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Per-round outputs (B, H, R, T, E) and log-sum-exps (B, H, R, T) -> (B, H, T, E)."""
    w = torch.softmax(lse, dim=2)
    return (out * w[..., None]).sum(2)


def lsh_attention(qk: torch.Tensor, v: torch.Tensor, buckets: torch.Tensor, n_buckets: int, chunk: int,
                  causal: bool = True) -> torch.Tensor:
    """Chunked LSH attention over one whole sequence: qk (B, H, T, D) shared query/key vectors
    (after RoPE), v (B, H, T, Dv), buckets (B, H, T, R) -> (B, H, T, Dv)."""
    b, h, t, d = qk.shape
    bk = buckets.transpose(-1, -2)  # (B, H, R, T)
    r = bk.shape[2]
    rank, counts = bucket_ranks(bk, n_buckets)
    padded = -(-counts // chunk) * chunk  # every bucket fills whole chunks
    slot = (padded.cumsum(-1) - padded).gather(-1, bk) + rank  # (B, H, R, T)
    s = int(padded.sum(-1).max())
    tok = torch.full((b, h, r, s), t, dtype=torch.long, device=qk.device)
    tok.scatter_(-1, slot, torch.arange(t, device=qk.device).expand(b, h, r, t))

    pad = lambda z: torch.cat([z, z.new_zeros(b, h, 1, z.shape[-1])], dim=2)  # noqa: E731
    n = s // chunk
    q_s = _slot_gather(pad(qk), tok).view(b, h, r, n, chunk, d)
    k_s = _with_previous(_slot_gather(pad(shared_keys(qk)), tok).view(b, h, r, n, chunk, d), 0.0)
    v_s = _with_previous(_slot_gather(pad(v), tok).view(b, h, r, n, chunk, -1), 0.0)
    bucket_s = torch.cat([bk, bk.new_full((b, h, r, 1), -1)], dim=-1).gather(-1, tok).view(b, h, r, n, chunk, 1)
    tok_q = tok.view(b, h, r, n, chunk, 1)
    tok_k = _with_previous(tok_q, t).transpose(-1, -2)  # (B, H, R, n, 1, 2c)
    bucket_k = _with_previous(bucket_s, -1).transpose(-1, -2)

    logits = torch.einsum("bhrncd,bhrnkd->bhrnck", q_s, k_s)
    visible = (bucket_k == bucket_s) & (tok_k < t)  # same bucket, not padding
    if causal:
        visible = visible & (tok_k <= tok_q)
    logits = logits.masked_fill(~visible, _MASKED).masked_fill(tok_k == tok_q, SELF_LOGIT)
    lse = torch.logsumexp(logits, dim=-1)
    out_s = torch.einsum("bhrnck,bhrnke->bhrnce", torch.exp(logits - lse[..., None]), v_s)
    # back to token order: each token's result in each round
    out = out_s.reshape(b, h, r, s, -1).gather(3, slot[..., None].expand(-1, -1, -1, -1, out_s.shape[-1]))
    return _combine_rounds(out, lse.reshape(b, h, r, s).gather(3, slot))


def lsh_attention_decode(q: torch.Tensor, keys: torch.Tensor, v: torch.Tensor, buckets: torch.Tensor,
                         n_buckets: int, chunk: int) -> torch.Tensor:
    """The last Tq tokens' queries q (B, H, Tq, D) against every key so far: keys (B, H, N, D)
    (`shared_keys`), v (B, H, N, Dv), buckets (B, H, N, R) -> (B, H, Tq, Dv). The same keys the
    chunked form selects, found from the ranks: O(Tq x N) comparisons, for decoding and
    chunked prefill."""
    tq, nk = q.shape[-2], keys.shape[-2]
    bk = buckets.transpose(-1, -2)  # (B, H, R, N)
    rank, _ = bucket_ranks(bk, n_buckets)
    qi = torch.arange(nk - tq, nk, device=q.device)
    q_bucket, q_rank = bk[..., qi, None], rank[..., qi, None]  # (B, H, R, Tq, 1)
    j = torch.arange(nk, device=q.device)
    visible = (bk[..., None, :] == q_bucket) & (j <= qi[:, None]) & (rank[..., None, :] >= (q_rank // chunk - 1) * chunk)
    logits = torch.einsum("bhqd,bhkd->bhqk", q, keys)[:, :, None].expand_as(visible)
    logits = logits.masked_fill(~visible, _MASKED).masked_fill(j == qi[:, None], SELF_LOGIT)
    lse = torch.logsumexp(logits, dim=-1)
    out = torch.einsum("bhrqk,bhke->bhrqe", torch.exp(logits - lse[..., None]), v)
    return _combine_rounds(out, lse)


def lsh_attention_reference(qk: torch.Tensor, v: torch.Tensor, buckets: torch.Tensor, chunk: int,
                            causal: bool = True) -> torch.Tensor:
    """Naive form for tests: per round, the dense mask of the rule (same bucket, rank window,
    causality), ranks counted directly, the self logit, one softmax; rounds by log-sum-exp."""
    t = qk.shape[-2]
    keys = torch.nn.functional.normalize(qk, dim=-1) / qk.shape[-1] ** 0.5
    logits = torch.einsum("bhqd,bhkd->bhqk", qk, keys)
    idx = torch.arange(t, device=qk.device)
    eye = idx[:, None] == idx[None, :]
    outs, lses = [], []
    for r in range(buckets.shape[-1]):
        bk = buckets[..., r]  # (B, H, T)
        same = bk[..., :, None] == bk[..., None, :]
        rank = (same & (idx[None, :] < idx[:, None])).sum(-1)  # earlier tokens in the same bucket
        qc, kc = (rank // chunk)[..., :, None], (rank // chunk)[..., None, :]
        allowed = same & ((kc == qc) | (kc == qc - 1))
        if causal:
            allowed = allowed & (idx[None, :] <= idx[:, None])
        lg = torch.where(allowed, logits, torch.full_like(logits, -float("inf")))
        lg = torch.where(eye & allowed, torch.full_like(lg, SELF_LOGIT), lg)
        lse = torch.logsumexp(lg, dim=-1)
        outs.append(torch.softmax(lg, dim=-1) @ v)
        lses.append(lse)
    return _combine_rounds(torch.stack(outs, 2), torch.stack(lses, 2))
