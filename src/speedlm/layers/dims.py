from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelDims:
    """Model-wide sizes every part (mixer, FFN, block) receives, plus where the part sits.
    Part-specific options come from its spec.

    layer_idx / n_layers: for rules that depend on depth (per-layer decay bounds, full attention
    in the first/middle/last layer). max_seq_len: the training length (implicit filters, position
    tables, the context limit of full attention). init_std: the std of the default N(0, std)
    initialisation; the model scales residual output projections by 1/sqrt(2 n_layers) on top.
    separators: the tokenizer's separator ids (data/separators.py), for mixers that look at
    tokens (SepLLM); None: the byte tokenizer's.
    """

    d_model: int
    n_heads: int
    rope_theta: float = 10000.0
    max_seq_len: int = 1024
    layer_idx: int = 0
    n_layers: int = 1
    ffn_hidden: int | None = None  # default: 8/3 * d_model rounded up to a multiple of 64
    norm_eps: float = 1e-6
    init_std: float = 0.02
    separators: tuple[int, ...] | None = None
    ffn_chunks: int = 1  # the FFN runs over this many pieces of the sequence (Reformer's chunked FFN)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        return -(-(8 * self.d_model // 3) // 64) * 64
