"""Softmax attention mixers: full attention (MHA / GQA / MQA) on SDPA, and the shared RoPE +
KV-cache + mask plumbing that sparse patterns reuse (layers/sparse_attention.py)."""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated, Literal

import torch
from torch import nn

from speedlm.cache.kv import FullPolicy, KVCache, KVPolicy
from speedlm.errors import SpeedlmError
from speedlm.layers.dims import ModelDims
from speedlm.layers.flops import Flops, attention_flops, causal_keys
from speedlm.layers.heads import HeadsMixer
from speedlm.layers.mixer import SeqMeta, linear_flops
from speedlm.layers.rope import apply_rope, rope_for, rope_reference
from speedlm.ops.attention import attention, attention_reference
from speedlm.ops.masks import AttentionMask, Full
from speedlm.registry import Range

# how queries and keys carry positions: rotated (RoPE), or not at all ("none": order comes from
# the causal mask and from other layers, as in Jamba's attention layers, which sit among Mamba's)
Positions = Literal["rope", "none"]


class AttentionBase(HeadsMixer):
    """Attention restricted by a pattern (ops/masks.py). Subclasses choose `pattern()`, the
    default KV policy and the mean number of keys a query sees (for FLOPs).

    Options of the projections and positions (subclasses pass on the ones they expose; Qwen2,
    Qwen3 and Qwen3-Next's attention are these options on `attention`):
    - `qkv_bias`, `qk_norm`: see HeadsMixer (biases on q/k/v; per-head RMSNorm of q and k
      before RoPE);
    - `head_dim`: the width of each query, key and value head when it is not d_model / n_heads
      (Qwen3-0.6B: width 1024, 16 heads of 128); RoPE, the KV cache and the FLOPs follow it;
    - `rope_dim`: partial rotary, only the first `rope_dim` channels of each query and key head
      are rotated (half-split within them, frequencies over rope_dim, as transformers' partial_
      rotary_factor); the rest pass through unrotated. Default: the whole head;
    - `output_gate`: y = o_proj(attention(...) * sigmoid(g_proj(x))), a gate per head channel
      from its own bias-free projection `g_proj` (Qwen3-Next's gated attention)."""

    supports_bidirectional = True
    supports_doc_ids = True
    backend: str = "auto"  # sparse-attention backend (ops/dispatch.py)

    @classmethod
    def check_options(cls, dims: ModelDims, kv_heads: int | None = None, positions: str = "rope",
                      head_dim: int | None = None, rope_dim: int | None = None, **options) -> None:
        super().check_options(dims, kv_heads=kv_heads)
        width = dims.head_dim if head_dim is None else head_dim
        if rope_dim is not None:
            if positions != "rope":
                raise SpeedlmError(f"rope_dim={rope_dim} rotates nothing with positions={positions!r}; "
                                   "drop it or use 'rope'")
            if rope_dim % 2 or rope_dim > width:
                raise SpeedlmError(f"rope_dim={rope_dim} must be even and at most head_dim={width}")
        elif positions == "rope" and width % 2:
            raise SpeedlmError(f"head_dim={width} must be even for RoPE (or rotate an even rope_dim of it)")

    def __init__(
        self,
        dims: ModelDims,
        kv_heads: Annotated[int | None, Range(min=1)] = None,
        positions: Positions = "rope",
        qkv_bias: bool = False,
        qk_norm: bool = False,
        head_dim: Annotated[int | None, Range(min=1)] = None,
        rope_dim: Annotated[int | None, Range(min=2)] = None,
        output_gate: bool = False,
    ):
        super().__init__(dims, kv_heads, head_dim, head_dim, qkv_bias=qkv_bias, qk_norm=qk_norm)
        self.head_dim = self.key_dim  # queries, keys and values share one head width
        self.rope_theta = dims.rope_theta
        self.positions = positions
        self.rope_dim = self.head_dim if rope_dim is None else rope_dim
        self.g_proj = nn.Linear(dims.d_model, self.n_heads * self.head_dim, bias=False) if output_gate else None

    def pattern(self):
        return Full()

    def head_patterns(self):
        """[(query head indices, pattern)] when heads use different patterns (a dilation per
        head); each group holds whole KV groups. None: `pattern()` for every head."""
        return None

    def _attend(self, q, k, v, mask: AttentionMask):
        groups = self.head_patterns()
        if groups is None:
            return attention(q, k, v, mask, backend=self.backend)
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        per_kv = self.n_heads // self.kv_heads
        for heads, pattern in groups:
            kv = sorted({h // per_kv for h in heads})
            out[:, heads] = attention(q[:, heads], k[:, kv], v[:, kv], replace(mask, pattern=pattern), backend=self.backend)
        return out

    def default_policy(self) -> KVPolicy:
        return FullPolicy()

    def _rope_table(self, positions, length: int, like: torch.Tensor):
        return rope_for(positions, length, self.rope_dim, self.rope_theta, like.device, like.dtype)

    def rotate_keys(self, k: torch.Tensor, shift: int) -> torch.Tensor:
        """k (B, Hkv, L, Dh) with every key rotated `shift` positions further: what a cache that
        moves keys asks for (RoPE is relative, so rotating by p then by s is rotating by p + s)."""
        return self._rotate(k, *self._rope_table(shift, 1, k))

    def _rotate(self, x, cos, sin):
        if self.positions != "rope":
            return x
        r = self.rope_dim
        if r == x.shape[-1]:
            return apply_rope(x, cos, sin)
        return torch.cat([apply_rope(x[..., :r], cos, sin), x[..., r:]], dim=-1)  # partial rotary

    def _rotate_reference(self, x, positions):
        r = self.rope_dim
        return torch.cat([rope_reference(x[..., :r], positions, self.rope_theta), x[..., r:]], dim=-1)

    # ----- the output gate -----
    def output(self, y_bhtd: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """o_proj of the merged heads, gated by sigmoid(g_proj(x)) with `output_gate` (then the
        mixer's input x is required)."""
        y = self.merge_heads(y_bhtd)
        if self.g_proj is not None:
            y = y * torch.sigmoid(self.g_proj(x))
        return self.o_proj(y)

    def reference_output(self, y_bhtd, x=None):
        if self.g_proj is not None:
            y_bhtd = y_bhtd * torch.sigmoid(self._heads_of(x, self.g_proj.weight, self.n_heads))
        return super().reference_output(y_bhtd)

    def projection_flops(self) -> float:
        return super().projection_flops() + (linear_flops(self.g_proj) if self.g_proj is not None else 0.0)

    def mix(self, x, meta: SeqMeta, cache: KVCache | None = None):
        q, k, v = self.project(x)
        t = x.shape[1]
        pos = meta.query_positions()
        if not meta.causal and cache is not None:  # a frozen prefix (check_call: supports_prefix_cache)
            cos, sin = self._rope_table(pos, t, q)
            q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
            k, v = cache.bidirectional_keys(k, v)
            mask = AttentionMask(Full(), t, k.shape[-2], 0, 0, causal=False)
            return self.output(self._attend(q, k, v, mask), x)
        # the policy's window and marks restrict the pattern: the cache's policy when decoding
        # (sinks, SepLLM on any checkpoint), the mixer's own otherwise (a SepLLM layer)
        policy = cache.policy if cache is not None else self.default_policy()
        if policy.needs_weights:  # eviction by attention scores (cache/scored.py): the weights written out
            cos, sin = self._rope_table(pos, t, q)
            q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
            return self.output(cache.attend(q, k, v, self.head_dim**-0.5), x)
        window = policy.attend_window()  # marks only matter beyond a window (the cache keeps them anyway)
        if cache is not None and t == 1 and policy.next_query_sees_all:
            window = None  # a decoding query sees every slot the policy kept: no mask row to build
        marks = None
        if window is not None or (cache is not None and cache.stores_marks):
            marks = policy.mark(meta.token_ids, pos, t, x.device)
            marks = None if marks is None else marks.expand(x.shape[0], t)
        if cache is not None and policy.pre_rope:
            # keys are cached unrotated and rotated by their slot: positions stay within the cache
            keys = cache.extend(k, v, pos, marks)
            n = keys.k.shape[-2]
            cos, sin = self._rope_table(0, n, q)
            q, k_all = self._rotate(q, cos[n - t :], sin[n - t :]), self._rotate(keys.k, cos, sin)
            q_pos, k_pos, k_mark = cache.mask_terms(keys, pos, t, window)
            mask = AttentionMask(self.pattern(), t, n, q_pos, k_pos, True, window=window, k_mark=k_mark)
            return self.output(self._attend(q, k_all, keys.v, mask), x)
        cos, sin = self._rope_table(pos, t, q)
        q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        if cache is None:
            k_all, v_all, q_pos, k_pos, k_mark = k, v, pos, pos, None if window is None else marks
        else:
            keys = cache.extend(k, v, pos, marks)
            k_all, v_all = keys.k, keys.v
            q_pos, k_pos, k_mark = cache.mask_terms(keys, pos, t, window)
        mask = AttentionMask(
            self.pattern(), t, k_all.shape[-2], q_pos, k_pos, meta.causal, meta.doc_ids, meta.doc_ids,
            window=window, k_mark=k_mark,
        )
        return self.output(self._attend(q, k_all, v_all, mask), x)

    def reference(self, x, meta: SeqMeta, policy: KVPolicy | None = None):
        """Explicit float64-able softmax over a dense mask built from positions, with the
        projections and RoPE computed independently of the fast path. `policy` (default: the
        mixer's own) restricts the keys further: the mask a lossy cache policy emulates."""
        b, t, _ = x.shape
        q, k, v = self.reference_project(x)
        pos = meta.position_tensor(t, x.device)
        if self.positions == "rope":
            q, k = self._rotate_reference(q, pos), self._rotate_reference(k, pos)
        qp, kp = pos[:, :, None], pos[:, None, :]
        idx = torch.arange(t, device=x.device)
        policy = policy or self.default_policy()
        marks = policy.mark(meta.token_ids, pos, t, x.device)
        extra = policy.visible(qp, kp, None if marks is None else marks[:, None, :])

        def allowed_by(pattern):
            allowed = pattern(qp, kp)
            if meta.causal:
                allowed = allowed & (idx[None, :] <= idx[:, None])
            if meta.doc_ids is not None:
                allowed = allowed & (meta.doc_ids[:, :, None] == meta.doc_ids[:, None, :])
            if extra is not None:
                allowed = allowed & extra
            return allowed.expand(b, t, t)

        groups = self.head_patterns()
        if groups is None:
            return self.reference_output(attention_reference(q, k, v, allowed_by(self.pattern())), x)
        per_head = torch.zeros(b, self.n_heads, t, t, dtype=torch.bool, device=x.device)
        for heads, pattern in groups:
            per_head[:, heads] = allowed_by(pattern)[:, None]
        return self.reference_output(attention_reference(q, k, v, per_head), x)

    def init_cache(self, kv_policy: KVPolicy | None = None) -> KVCache:
        policy = kv_policy or self.default_policy()
        if policy.needs_weights and (not isinstance(self.pattern(), Full) or self.head_patterns() is not None):
            raise SpeedlmError(f"{type(policy).__name__} evicts by full attention's weights; {type(self).__name__} "
                               "attends through a sparse pattern")
        return policy.make_cache(self.rotate_keys)

    def state_bytes(self, context_len: int, batch_size: int = 1, bytes_per_elem: int = 2) -> int:
        kept = self.default_policy().retained(context_len)
        return 2 * batch_size * self.kv_heads * self.head_dim * kept * bytes_per_elem

    def flops_breakdown(self, context_len: int, causal: bool = True) -> Flops:
        keys = self._mean_keys(context_len) if causal else self._bidirectional_keys(context_len)
        return Flops(linear=self.projection_flops(), matmul=attention_flops(self.n_heads, keys, self.head_dim, self.head_dim))

    def _bidirectional_keys(self, context_len: int) -> float:
        # a symmetric pattern sees its causal keys on both sides, itself once (full attention: T)
        return min(context_len, 2 * self._mean_keys(context_len) - 1)

    def max_context(self, kv_policy: KVPolicy | None = None) -> int | None:
        # positions beyond the training length are only safe when no query looks that far back
        return None if (kv_policy or self.default_policy()).bounded else self.dims.max_seq_len

    def _mean_keys(self, context_len: int) -> float:
        """Mean keys a causal query sees (its visible pairs, the FLOP convention's unit)."""
        return causal_keys(context_len)


class Attention(AttentionBase):
    """Full softmax attention, causal or bidirectional; kv_heads < n_heads gives GQA, kv_heads
    == 1 MQA. Bidirectional calls can read a frozen prefix (a cache that `serves_bidirectional`)."""

    supports_prefix_cache = True

    def __init__(
        self,
        dims: ModelDims,
        kv_heads: Annotated[int | None, Range(min=1)] = None,
        positions: Positions = "rope",
        qkv_bias: bool = False,
        qk_norm: bool = False,
        head_dim: Annotated[int | None, Range(min=1)] = None,
        rope_dim: Annotated[int | None, Range(min=2)] = None,
        output_gate: bool = False,
    ):
        super().__init__(dims, kv_heads, positions, qkv_bias, qk_norm, head_dim, rope_dim, output_gate)
        self.reset_parameters()
