"""Multi-scale retention (RetNet, Sun et al. 2023, arXiv:2307.08621).

Each head h has a fixed decay gamma_h = 1 - 2^(-5 - h) (the paper's code), so the heads look
back over ~32, ~64, ~128, ... tokens: the "multi-scale" of the name.

    S_t = gamma_h S_{t-1} + k_t v_t^T,  o_t = S_t^T q_t / sqrt(Dk)      (q, k rotated by xPos/RoPE)
    y   = W_o( swish(W_g x) * GroupNorm_heads(o) )

Values are twice as wide as keys (the paper's d_v = 2 d_k). Three forms compute the same
function: parallel (the (T, T) decay mask D, `gla_parallel`), chunkwise (`gla_chunked`, what
training and prefill run) and recurrent (decoding, and the float64 reference).
"""

from __future__ import annotations

from typing import Annotated

import torch

from speedlm.cache.recurrent import RecurrentState
from speedlm.layers.dims import ModelDims
from speedlm.layers.flops import Flops
from speedlm.layers.mixer import SeqMeta
from speedlm.layers.recurrent_heads import GatedHeadsMixer
from speedlm.layers.rope import apply_rope, rope_for, rope_reference
from speedlm.ops.gla import GLA, gla_parallel, gla_recurrent
from speedlm.registry import Range


def retention_decays(n_heads: int) -> torch.Tensor:
    """log gamma_h for the heads: gamma = 1 - 2^(-5 - arange(H)) as in the paper's code
    (torchscale: `1 - 2 ** (-5 - torch.arange(num_heads))`)."""
    return torch.log1p(-(2.0 ** (-5.0 - torch.arange(n_heads, dtype=torch.float64))))


class MultiScaleRetention(GatedHeadsMixer):
    def __init__(self, dims: ModelDims, value_factor: Annotated[int, Range(min=1)] = 2,
                 chunk_size: Annotated[int, Range(min=1)] = 64):
        super().__init__(dims, key_dim=dims.head_dim, value_dim=value_factor * dims.head_dim, norm="layer",
                         chunk_size=chunk_size)
        # fixed, not learned: a non-persistent buffer, filled by reset_buffers (so meta-device
        # builds and loaders that materialise buffers late get it too)
        self.register_buffer("log_decay", torch.empty(self.n_heads, dtype=torch.float64), persistent=False)
        self.rope_theta = dims.rope_theta
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self.reset_buffers()

    def reset_buffers(self) -> None:
        with torch.no_grad():
            self.log_decay.copy_(retention_decays(self.n_heads).to(self.log_decay.dtype))

    def _gates(self, like: torch.Tensor) -> torch.Tensor:
        b, h, t, _ = like.shape
        return self.log_decay.to(like.dtype).view(1, h, 1, 1).expand(b, h, t, 1)

    def mix(self, x, meta: SeqMeta, cache: RecurrentState | None = None):
        q, k, v = self.project(x)
        t = x.shape[1]
        cos, sin = rope_for(meta.query_positions(), t, self.key_dim, self.rope_theta, x.device, q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        dt = self.recurrence_dtype(x)
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
        init = None if cache is None or cache.state is None else cache.state[0]
        o, state = GLA(q, k, v, self._gates(q), initial_state=init, chunk_size=self.chunk_size)
        if cache is not None:
            cache.state = (state,)
        return self.gated_output(o, x)

    def reference(self, x, meta: SeqMeta):
        q, k, v = self.reference_project(x)
        pos = meta.position_tensor(x.shape[1], x.device)
        q, k = rope_reference(q, pos, self.rope_theta), rope_reference(k, pos, self.rope_theta)
        o, _ = gla_recurrent(q, k, v, self._gates(q))
        return self.reference_gated_output(o, x)

    def parallel(self, x, meta: SeqMeta):
        """The paper's parallel form, (Q K^T * D) V: a third route to the same outputs."""
        q, k, v = self.project(x)
        cos, sin = rope_for(meta.query_positions(), x.shape[1], self.key_dim, self.rope_theta, x.device, q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return self.gated_output(gla_parallel(q, k, v, self._gates(q)), x)

    def flops_breakdown(self, context_len: int, causal: bool = True) -> Flops:
        return Flops(linear=self.projection_flops(), matmul=self.chunked_flops(context_len))

