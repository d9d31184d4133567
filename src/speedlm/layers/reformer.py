"""Reformer's LSH attention (Kitaev et al. 2020, arXiv:2001.04451) as a mixer: one shared
query/key projection per head, RoPE, `n_hashes` rounds of angular LSH into `n_buckets`
buckets, chunked attention to the own and previous chunk of a bucket (ops/lsh_attention.py).

The random rotations are a fixed buffer (drawn at initialisation, saved with the weights, never
trained), so a checkpoint decodes with the buckets it was trained with. The cache keeps every
key, value and bucket id (LSH attention can reach any earlier key of its bucket): a lossy KV
policy cannot apply, so the keys live in a plain token buffer and such a policy is refused.

Reversible residual layers and the chunked FFN, the paper's other two parts, are model options
(`reversible`, `ffn_chunks` in ModelConfig; models/reversible.py).
"""

from __future__ import annotations

from typing import Annotated

import torch
from torch import nn

from speedlm.cache.buffer import TokenBuffer
from speedlm.cache.kv import FullPolicy
from speedlm.errors import SpeedlmError
from speedlm.layers.dims import ModelDims
from speedlm.layers.flops import Flops, attention_flops
from speedlm.layers.mixer import Mixer, SeqMeta, linear_flops
from speedlm.layers.rope import apply_rope, rope_for, rope_reference
from speedlm.ops.lsh_attention import lsh_attention, lsh_attention_decode, lsh_attention_reference, lsh_buckets, shared_keys
from speedlm.registry import Range


class LSHAttention(Mixer):
    supports_bidirectional = True
    supports_doc_ids = False  # a bucket's chunks would run across documents
    residual_out = ("o_proj",)

    @classmethod
    def check_options(cls, dims: ModelDims, n_buckets: int = 32, **options) -> None:
        if n_buckets % 2:
            raise SpeedlmError(f"n_buckets must be even (angular LSH hashes to argmax over [xR, -xR]), got {n_buckets}")

    def __init__(
        self,
        dims: ModelDims,
        n_hashes: Annotated[int, Range(min=1)] = 2,
        n_buckets: Annotated[int, Range(min=2)] = 32,
        chunk: Annotated[int, Range(min=1)] = 64,
    ):
        super().__init__(dims)
        self.n_heads, self.head_dim = dims.n_heads, dims.head_dim
        self.n_hashes, self.n_buckets, self.chunk = n_hashes, n_buckets, chunk
        self.rope_theta = dims.rope_theta
        inner = self.n_heads * self.head_dim
        self.qk_proj = nn.Linear(dims.d_model, inner, bias=False)
        self.v_proj = nn.Linear(dims.d_model, inner, bias=False)
        self.o_proj = nn.Linear(inner, dims.d_model, bias=False)
        self.register_buffer("rotations", torch.empty(n_hashes, self.head_dim, n_buckets // 2))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        with torch.no_grad():
            self.rotations.normal_()

    # ----- fast path -----
    def _heads(self, y):
        b, t, _ = y.shape
        return y.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)

    def mix(self, x, meta: SeqMeta, cache: TokenBuffer | None = None):
        b, t, _ = x.shape
        qk, v = self._heads(self.qk_proj(x)), self._heads(self.v_proj(x))
        cos, sin = rope_for(meta.query_positions(), t, self.head_dim, self.rope_theta, x.device, x.dtype)
        qk = apply_rope(qk, cos, sin)
        buckets = lsh_buckets(qk, self.rotations)
        if cache is None or cache.length == 0:
            y = lsh_attention(qk, v, buckets, self.n_buckets, self.chunk, causal=meta.causal)
            if cache is not None:
                cache.extend(shared_keys(qk), v, buckets.to(torch.int32), positions=meta.query_positions())
        else:  # decoding / chunked prefill: the new queries against every cached key
            (keys, values, ids), _ = cache.extend(shared_keys(qk), v, buckets.to(torch.int32), positions=meta.query_positions())
            y = lsh_attention_decode(qk, keys, values, ids.long(), self.n_buckets, self.chunk)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))

    # ----- reference -----
    def reference(self, x, meta: SeqMeta, policy=None):
        b, t, d = x.shape
        heads = lambda w: torch.einsum("btd,hed->bhte", x, w.view(self.n_heads, -1, d))  # noqa: E731
        pos = meta.position_tensor(t, x.device)
        qk = rope_reference(heads(self.qk_proj.weight), pos, self.rope_theta)
        v = heads(self.v_proj.weight)
        rot = self.rotations.to(qk.dtype)
        proj = torch.einsum("bhtd,rdn->bhtrn", qk, rot)
        buckets = torch.cat([proj, -proj], -1).argmax(-1)
        y = lsh_attention_reference(qk, v, buckets, self.chunk, causal=meta.causal)
        return torch.einsum("bhte,dhe->btd", y, self.o_proj.weight.view(d, self.n_heads, self.head_dim))

    # ----- what the model asks -----
    def init_cache(self, kv_policy=None) -> TokenBuffer:
        if kv_policy is not None and not isinstance(kv_policy, FullPolicy):
            raise SpeedlmError(
                f"reformer keeps every key (an LSH bucket can reach any earlier one); a {type(kv_policy).__name__} cannot apply"
            )
        return TokenBuffer(FullPolicy(), n_entries=3)  # keys, values, bucket ids (int32)

    def state_bytes(self, context_len: int, batch_size: int = 1, bytes_per_elem: int = 2) -> int:
        per_token = self.n_heads * (2 * self.head_dim * bytes_per_elem + 4 * self.n_hashes)
        return batch_size * context_len * per_token

    def flops_breakdown(self, context_len: int, causal: bool = True) -> Flops:
        """The efficient algorithm is the chunked band of each hash round: a query's candidates
        are its bucket's keys in its own chunk and the previous one (chunks aligned per bucket,
        ops/lsh_attention.py). Its visible pairs, which this counts, are those keys: same bucket,
        rank from the previous chunk's start up to itself (causal) or to its own chunk's end
        (bidirectional), itself included. The buckets are data: counted as the rotations spread
        them in expectation, n_buckets buckets as even as T tokens allow. The band's pairs of
        other buckets, and the band's padding, are masked work (executed / counted shows them)."""
        n, c = context_len, min(self.chunk, max(context_len, 1))

        def pairs(size: int) -> float:  # summed over the ranks of one bucket of `size` tokens
            rank = torch.arange(size, device="cpu")
            start = torch.clamp((torch.div(rank, c, rounding_mode="floor") - 1) * c, min=0)
            end = rank if causal else torch.clamp((torch.div(rank, c, rounding_mode="floor") + 1) * c - 1, max=size - 1)
            return float((end - start + 1).sum())

        size, larger = divmod(n, self.n_buckets)
        keys = (larger * pairs(size + 1) + (self.n_buckets - larger) * pairs(size)) / max(n, 1)
        hashing = 2.0 * self.n_heads * self.head_dim * (self.n_buckets // 2) * self.n_hashes  # x R per round
        attend = attention_flops(self.n_heads, keys * self.n_hashes, self.head_dim, self.head_dim)
        return Flops(linear=linear_flops(self.qk_proj, self.v_proj, self.o_proj), matmul=hashing + attend)

    def max_context(self, kv_policy=None) -> int | None:
        return self.dims.max_seq_len
