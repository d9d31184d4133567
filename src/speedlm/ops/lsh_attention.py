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

Cost per round: O(T x 3 chunk) scores after an O(T log T) sort (blocks of sorted queries
against a band of sorted keys, see `lsh_attention`); no T x T mask.
"""

from __future__ import annotations

import torch

from speedlm.ops.chunking import band_windows

SELF_LOGIT = -1e5  # Reformer's value: finite, so a query with no other key still sees itself
# keys a query may not see: -inf, not a large finite value, since exp of a large negative number
# takes a slow path on CPU (5-10x per element); every row keeps a finite entry (itself, or a
# padding slot paired with itself), so no row is all -inf
_MASKED = float("-inf")


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


def _combine_rounds(out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Per-round outputs (B, H, R, T, E) and log-sum-exps (B, H, R, T) -> (B, H, T, E)."""
    w = torch.softmax(lse, dim=2)
    return (out * w[..., None]).sum(2)


def lsh_attention(qk: torch.Tensor, v: torch.Tensor, buckets: torch.Tensor, n_buckets: int, chunk: int,
                  causal: bool = True) -> torch.Tensor:
    """Chunked LSH attention over one whole sequence: qk (B, H, T, D) shared query/key vectors
    (after RoPE), v (B, H, T, Dv), buckets (B, H, T, R) -> (B, H, T, Dv).

    In the sort order (by bucket, then position) a query at rank r of its bucket sees a
    contiguous run of the sorted keys: from rank (r // chunk - 1) * chunk of its bucket to
    itself (causal), or to the end of its chunk (bidirectional), so within 2 chunk - 1 sorted
    places before it (and chunk - 1 after). Blocks of `chunk` sorted queries therefore read one
    band of 3 chunk - 1 (4 chunk - 2) sorted keys, masked by bucket and rank: O(T x chunk) per
    round whatever the buckets' sizes, with no padding of buckets to whole chunks."""
    b, h, t, d = qk.shape
    bk = buckets.transpose(-1, -2)  # (B, H, R, T)
    r = bk.shape[2]
    rank, _ = bucket_ranks(bk, n_buckets)
    order = torch.argsort(bk * t + torch.arange(t, device=qk.device), dim=-1)  # (B, H, R, T) sorted -> token
    c = min(chunk, t)
    nb = -(-t // c)
    before, size = 2 * c - 1, (3 * c - 1) if causal else (4 * c - 2)

    def sort(z):  # (B, H, T, E) -> (B, H, R, T, E) in each round's order
        return z[:, :, None].expand(-1, -1, r, -1, -1).gather(3, order[..., None].expand(-1, -1, -1, -1, z.shape[-1]))

    def queries(z, fill):  # (B, H, R, T, E) -> (B, H, R, nb, c, E)
        return torch.nn.functional.pad(z, (0, 0, 0, nb * c - t), value=fill).view(b, h, r, nb, c, z.shape[-1])

    def band(z, fill):  # (B, H, R, T, E) -> (B, H, R, nb, size, E)
        return band_windows(z, before, size, c, nb, fill)

    meta = torch.stack([order, bk.gather(-1, order), rank.gather(-1, order)], dim=-1)  # token, bucket, rank
    q_meta, k_meta = queries(meta, -1), band(meta, -1)
    q_tok, q_bucket, q_rank = (q_meta[..., n, None] for n in range(3))  # (B, H, R, nb, c, 1)
    k_tok, k_bucket, k_rank = (k_meta[..., None, :, n] for n in range(3))  # (B, H, R, nb, 1, size)
    q_s = queries(sort(qk), 0.0)
    logits = torch.einsum("bhrncd,bhrnkd->bhrnck", q_s, band(sort(shared_keys(qk)), 0.0))
    visible = (k_bucket == q_bucket) & (k_tok >= 0) & (k_rank >= (q_rank // c - 1) * c)
    if causal:
        visible = visible & (k_tok <= q_tok)
    else:
        visible = visible & (k_rank < (q_rank // c + 1) * c)
    logits = torch.where(k_tok == q_tok, SELF_LOGIT, logits.masked_fill(~visible, _MASKED))
    lse = torch.logsumexp(logits, dim=-1)
    out_s = torch.einsum("bhrnck,bhrnke->bhrnce", torch.exp(logits - lse[..., None]), band(sort(v), 0.0))
    # back to token order: each token's result in each round
    inverse = torch.argsort(order, dim=-1)
    out = out_s.reshape(b, h, r, nb * c, -1)[..., :t, :].gather(3, inverse[..., None].expand(-1, -1, -1, -1, v.shape[-1]))
    return _combine_rounds(out, lse.reshape(b, h, r, nb * c)[..., :t].gather(3, inverse))


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
