"""The built-in parts, registered by name: mixers, FFNs and block kinds.

Registering a part is all it takes for the contract suite, configs, `speedlm list` and
`speedlm bench` to cover it. The registry mechanics live in `speedlm.registry`.
"""

from __future__ import annotations

from speedlm.layers.attention import Attention
from speedlm.layers.block import PreNormBlock
from speedlm.layers.ffn import NoFFN
from speedlm.layers.linear_attention import LinearAttention
from speedlm.layers.mlp import SwiGLU
from speedlm.layers.sparse_attention import SlidingWindowAttention
from speedlm.models.causal_lm import CausalLM
from speedlm.registry import BLOCKS, FFNS, MIXERS, MODELS, Entry

__all__ = ["BLOCKS", "FFNS", "MIXERS", "MODELS", "Entry", "register_block", "register_ffn", "register_mixer", "register_model"]

register_mixer = MIXERS.register
register_ffn = FFNS.register
register_block = BLOCKS.register
register_model = MODELS.register

# ----- model classes, by objective -----
register_model(
    "ar",
    CausalLM,
    family="decoder-only language model",
    description="autoregressive next-token prediction through causal mixers and their caches",
    paper="Radford et al. 2019 (GPT-2)",
)

# ----- mixers -----
register_mixer(
    "attention",
    Attention,
    family="efficient full attention",
    description="softmax attention on SDPA (FlashAttention kernels on GPU); kv_heads gives GQA / MQA",
    paper="Vaswani et al. 2017 (arXiv:1706.03762); GQA: Ainslie et al. 2023 (arXiv:2305.13245); "
    "MQA: Shazeer 2019 (arXiv:1911.02150)",
    contract_spec={"kv_heads": 2},
)
register_mixer(
    "sliding_window",
    SlidingWindowAttention,
    family="static sparse attention",
    description="sliding-window attention on FlexAttention block masks, O(window) KV cache",
    paper="Beltagy et al. 2020, Longformer (arXiv:2004.05150); Jiang et al. 2023, Mistral 7B (arXiv:2310.06825)",
    contract_spec={"window": 7, "kv_heads": 2},
)
register_mixer(
    "linear_attention",
    LinearAttention,
    family="linear attention",
    description="linear attention with elu+1 features, chunked parallel form, float32 matrix-state cache",
    paper="Katharopoulos et al. 2020, Transformers are RNNs (arXiv:2006.16236)",
    contract_spec={"chunk_size": 16},
)

# ----- FFNs -----
register_ffn(
    "swiglu",
    SwiGLU,
    family="dense FFN",
    description="gated MLP down(silu(gate x) * up x); hidden defaults to the model's ffn_hidden",
    paper="Shazeer 2020, GLU Variants Improve Transformer (arXiv:2002.05202)",
    contract_spec={"hidden": 48},
)
register_ffn(
    "none",
    NoFFN,
    family="no FFN",
    description="no feed-forward sublayer (for mixers with their own expansion, e.g. Mamba)",
    paper="-",
)

# ----- blocks -----
register_block(
    "prenorm",
    PreNormBlock,
    family="residual block",
    description="x + mixer(norm x), then x + ffn(norm x)",
    paper="Radford et al. 2019 (GPT-2); Xiong et al. 2020, On Layer Normalization in the Transformer (arXiv:2002.04745)",
)
