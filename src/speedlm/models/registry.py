"""The built-in parts, registered by name: mixers, FFNs and block kinds.

Registering a part is all it takes for the contract suite, configs, `speedlm list` and
`speedlm bench` to cover it. The registry mechanics live in `speedlm.registry`.
"""

from __future__ import annotations

from speedlm.layers.adaptive_span import AdaptiveSpanAttention
from speedlm.layers.attention import Attention
from speedlm.layers.base_conv import BaseConv
from speedlm.layers.based import BasedLinearAttention
from speedlm.layers.block import PreNormBlock
from speedlm.layers.conformer import ConformerBlock
from speedlm.layers.block_topk import BlockTopkAttention
from speedlm.layers.deltanet import DeltaNet, GatedDeltaNet
from speedlm.layers.ffn import NoFFN
from speedlm.layers.forgetting_attention import ForgettingAttention
from speedlm.layers.gla import GatedLinearAttention
from speedlm.layers.hgrn import HGRN
from speedlm.layers.hgrn2 import HGRN2
from speedlm.layers.hyena import Hyena
from speedlm.layers.hymba import Hymba
from speedlm.layers.linear_attention import LinearAttention
from speedlm.layers.linformer import Linformer
from speedlm.layers.lite_transformer import LiteTransformerLSRA
from speedlm.layers.longformer import LongformerAttention
from speedlm.layers.mamba import Mamba
from speedlm.layers.mamba2 import Mamba2
from speedlm.layers.mla import MultiHeadLatentAttention
from speedlm.layers.mlstm import MLSTM
from speedlm.layers.moh import MixtureOfHeadsAttention
from speedlm.layers.nsa import NativeSparseAttention
from speedlm.layers.mlp import SwiGLU
from speedlm.layers.mod import MoDBlock
from speedlm.layers.moe import MoE
from speedlm.layers.parallel_hybrid import ParallelHybrid
from speedlm.layers.performer import Performer
from speedlm.layers.reformer import LSHAttention
from speedlm.layers.transformer_xl import TransformerXLAttention
from speedlm.layers.ttt import TTTLinear
from speedlm.layers.retnet import MultiScaleRetention
from speedlm.layers.rwkv7 import RWKV7
from speedlm.layers.sepllm import SepLLMAttention
from speedlm.layers.sparse_attention import DilatedWindowAttention, LogSparseAttention, SlidingWindowAttention
from speedlm.models.causal_lm import CausalLM
from speedlm.models.diffusion import DiffusionLM
from speedlm.models.encoder import Encoder
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

register_model(
    "classify",
    Encoder,
    family="bidirectional encoder",
    description="sequence classification: a feature or token front-end, bidirectional mixers, mean or class-token "
    "pooling, a linear head",
    paper="Devlin et al. 2019, BERT (arXiv:1810.04805); Dosovitskiy et al. 2021, ViT (arXiv:2010.11929)",
)

register_model(
    "diffusion",
    DiffusionLM,
    family="masked diffusion language model",
    description="bidirectional denoiser over a mask token: NELBO training (t per row, mask with probability t, "
    "1/t-weighted cross-entropy), parallel unmasking at generation",
    paper="Sahoo et al. 2024, MDLM (arXiv:2406.07524); Nie et al. 2025, LLaDA (arXiv:2502.09992)",
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
    "dilated_window",
    DilatedWindowAttention,
    family="static sparse attention",
    description="dilated sliding window: keys at distances 0, d, ..., (window - 1) d, a dilation per head; "
    "runs as d sliding windows on residue classes, O(T * window)",
    paper="Beltagy et al. 2020, Longformer: The Long-Document Transformer (arXiv:2004.05150)",
    contract_spec={"window": 5, "dilation": [1, 1, 3, 3], "kv_heads": 2},
)
register_mixer(
    "logsparse",
    LogSparseAttention,
    family="static sparse attention",
    description="LogSparse: self and keys at power-of-two distances (O(log T) keys) after a dense local window; "
    "restart variant; convolutional queries/keys (conv_kernel)",
    paper="Li et al. 2019, Enhancing the Locality and Breaking the Memory Bottleneck of Transformer on Time Series "
    "Forecasting (arXiv:1907.00235)",
    contract_spec={"local": 2, "conv_kernel": 3, "kv_heads": 2},
)
register_mixer(
    "longformer",
    LongformerAttention,
    family="static sparse attention",
    description="Longformer: a sliding window plus global tokens (a prefix by rule, or chosen positions when "
    "bidirectional) with their own projections; O(globals + window) cache",
    paper="Beltagy et al. 2020, Longformer: The Long-Document Transformer (arXiv:2004.05150)",
    contract_spec={"window": 7, "global_tokens": 3, "kv_heads": 2},
)
register_mixer(
    "sepllm",
    SepLLMAttention,
    family="static sparse attention",
    description="SepLLM: each query sees the initial tokens, every separator before it and a local window; "
    "cost and KV cache follow those keys; optional full attention in the first/last layers, per-layer windows",
    paper="Chen et al. 2024, SepLLM: Accelerate LLMs by Compressing One Segment into One Separator (arXiv:2412.12094)",
    contract_spec={"window": 5, "initial": 2, "kv_heads": 2, "separators": list(range(0, 256, 4))},
)
register_mixer(
    "block_topk",
    BlockTopkAttention,
    family="dynamic sparse attention",
    description="MoBA block top-k: each query sees top_k blocks, its own and the top_k - 1 earlier blocks whose mean "
    "key scores highest (hard gate, later block on ties); O(T top_k block_size); full KV cache plus running block key sums",
    paper="Lu et al. 2025, MoBA: Mixture of Block Attention for Long-Context LLMs (arXiv:2502.13189)",
    contract_spec={"block_size": 5, "top_k": 3, "kv_heads": 2},
)
register_mixer(
    "nsa",
    NativeSparseAttention,
    family="dynamic sparse attention",
    description="native sparse attention: mean-pooled key blocks, the top-n blocks they rank (first, previous and own "
    "always), and a sliding window, mixed by sigmoid gates; O(T (T / block + top_n block + window)), no T x T mask",
    paper="Yuan et al. 2025, Native Sparse Attention: Hardware-Aligned and Natively Trainable Sparse Attention "
    "(arXiv:2502.11089)",
    contract_spec={"block_size": 8, "top_n": 3, "window": 9, "kv_heads": 2},
)
register_mixer(
    "reformer",
    LSHAttention,
    family="dynamic sparse attention",
    description="Reformer LSH attention: shared QK, n_hashes rounds of angular LSH, bucket sort, chunks attend to "
    "their own and previous chunk (aligned per bucket, so causal and decodable), self-mask, rounds by log-sum-exp",
    paper="Kitaev et al. 2020, Reformer: The Efficient Transformer (arXiv:2001.04451)",
    contract_spec={"n_hashes": 2, "n_buckets": 4, "chunk": 4},
)
register_mixer(
    "adaptive_span",
    AdaptiveSpanAttention,
    family="dynamic sparse attention",
    description="adaptive attention span: a learned span per head as a soft ramp mask on the distance (renormalised "
    "softmax), span penalty as an auxiliary loss; attention and KV cache trimmed to the current reach",
    paper="Sukhbaatar et al. 2019, Adaptive Attention Span in Transformers (arXiv:1905.07799)",
    # heads with different spans (one at the max_span cap, fractional ones on the ramp): reach 24 < T
    contract_spec={"max_span": 24, "ramp": 4, "init_span": [1.0, 0.5, 0.1, 0.35], "kv_heads": 2},
)
register_mixer(
    "transformer_xl",
    TransformerXLAttention,
    family="memory attention",
    description="Transformer-XL: segment-level recurrence (a memory of mem_len positions before each segment, the "
    "cache that training's segment mode carries detached) and relative positions with the u and v biases; O(mem_len + segment) cache",
    paper="Dai et al. 2019, Transformer-XL: Attentive Language Models Beyond a Fixed-Length Context (arXiv:1901.02860)",
    contract_spec={"mem_len": 6, "segment": 8, "kv_heads": 2},
)
register_mixer(
    "linformer",
    Linformer,
    family="low-rank attention",
    description="Linformer: keys and values projected along the sequence to k rows by learned E, F (per head, "
    "shared by the heads, or one for both); O(T k); bidirectional only",
    paper="Wang et al. 2020, Linformer: Self-Attention with Linear Complexity (arXiv:2006.04768)",
    contract_spec={"k": 8, "sharing": "none", "kv_heads": 2},
)
register_mixer(
    "lite_transformer",
    LiteTransformerLSRA,
    family="conv + attention",
    description="Lite Transformer LSRA: half the channels through self-attention (half the heads), half through "
    "GLU + a lightweight (softmax-normalised, head-shared) or dynamic (per-position) convolution; causal or centred",
    paper="Wu et al. 2020, Lite Transformer with Long-Short Range Attention (arXiv:2004.11886); Wu et al. 2019, "
    "Pay Less Attention with Lightweight and Dynamic Convolutions (arXiv:1901.10430)",
    contract_spec={"kernel": 3, "conv": "dynamic", "conv_heads": 2, "kv_heads": 1},
)
register_mixer(
    "mla",
    MultiHeadLatentAttention,
    family="efficient full attention",
    description="multi-head latent attention: keys and values decompressed from one low-rank latent per token plus "
    "a decoupled RoPE key shared by the heads; the cache holds the latent and the RoPE key, decoding absorbs W_UK "
    "into the query and W_UV into the output",
    paper="DeepSeek-AI 2024, DeepSeek-V2: A Strong, Economical, and Efficient Mixture-of-Experts Language Model "
    "(arXiv:2405.04434)",
    contract_spec={"kv_rank": 12, "rope_dim": 4},
)
register_mixer(
    "moh",
    MixtureOfHeadsAttention,
    family="efficient full attention",
    description="mixture-of-heads attention: shared heads always on, top-k routed heads per token, the output a "
    "gate-weighted sum of the heads used; attention runs only for routed (token, head) pairs; balance loss",
    paper="Jin et al. 2024, MoH: Multi-Head Attention as Mixture-of-Head Attention (arXiv:2410.11842)",
    contract_spec={"shared": 1, "top_k": 2, "block_size": 8},
)
register_mixer(
    "forgetting_attention",
    ForgettingAttention,
    family="efficient full attention",
    description="softmax attention with a data-dependent forget gate per head added to the logits (cumulative log "
    "gates), no positional encoding; SDPA with the bias as one more key channel, never a T x T mask",
    paper="Lin et al. 2025, Forgetting Transformer: Softmax Attention with a Forget Gate (arXiv:2503.02130)",
    contract_spec={"block_size": 16, "kv_heads": 2},
)
register_mixer(
    "linear_attention",
    LinearAttention,
    family="linear attention",
    description="linear attention with elu+1 features, chunked parallel form, float32 matrix-state cache",
    paper="Katharopoulos et al. 2020, Transformers are RNNs (arXiv:2006.16236)",
    contract_spec={"chunk_size": 16},
)
register_mixer(
    "performer",
    Performer,
    family="linear attention",
    description="FAVOR+ positive orthogonal random features, causal prefix sums with a causal stabiliser; optional redraw",
    paper="Choromanski et al. 2020, Rethinking Attention with Performers (arXiv:2009.14794)",
    contract_spec={"chunk_size": 16, "features": 24},
)
register_mixer(
    "based",
    BasedLinearAttention,
    family="linear attention",
    description="linear attention with a 2nd-order Taylor feature map on a 16-dim projection (pairs with SWA and BaseConv)",
    paper="Arora et al. 2024, Simple linear attention language models balance the recall-throughput tradeoff (arXiv:2402.18668)",
    contract_spec={"chunk_size": 16, "feature_dim": 4},
)
register_mixer(
    "base_conv",
    BaseConv,
    family="long convolution",
    description="gated short convolution (W_p x) * conv_k(W_c x); decode state: the last k - 1 inputs",
    paper="Arora et al. 2023, Zoology (arXiv:2312.04927); Based (arXiv:2402.18668)",
    contract_spec={"kernel": 3},
)
register_mixer(
    "retnet",
    MultiScaleRetention,
    family="linear attention",
    description="multi-scale retention: fixed per-head decays, xPos/RoPE, group norm, swish gate; parallel, chunkwise, recurrent",
    paper="Sun et al. 2023, Retentive Network (arXiv:2307.08621)",
    contract_spec={"chunk_size": 16},
)
register_mixer(
    "gla",
    GatedLinearAttention,
    family="linear attention",
    description="gated linear attention: data-dependent per-channel decay (low-rank gate, tau 16), output gate",
    paper="Yang et al. 2023, Gated Linear Attention Transformers with Hardware-Efficient Training (arXiv:2312.06635)",
    contract_spec={"chunk_size": 16},
)
register_mixer(
    "deltanet",
    DeltaNet,
    family="linear attention",
    description="delta rule: L2-normalised q/k, beta gate, short conv; chunked through the WY/UT triangular solve",
    paper="Yang et al. 2024, Parallelizing Linear Transformers with the Delta Rule over Sequence Length (arXiv:2406.06484)",
    contract_spec={"chunk_size": 16},
)
register_mixer(
    "gated_deltanet",
    GatedDeltaNet,
    family="linear attention",
    description="delta rule with a Mamba-2-style data-dependent decay and an output gate",
    paper="Yang et al. 2024, Gated Delta Networks: Improving Mamba2 with Delta Rule (arXiv:2412.06464)",
    contract_spec={"chunk_size": 16},
)
register_mixer(
    "hgrn",
    HGRN,
    family="linear RNN",
    description="element-wise gated linear recurrence; forget-gate lower bound rising with depth",
    paper="Qin et al. 2023, Hierarchically Gated Recurrent Neural Network for Sequence Modeling (arXiv:2311.04823)",
    contract_spec={"chunk_size": 16},
)
register_mixer(
    "hgrn2",
    HGRN2,
    family="linear RNN",
    description="HGRN with outer-product state expansion: forget gate as decay, its complement as key, swish query; "
    "chunked as per-channel gated linear attention",
    paper="Qin et al. 2024, HGRN2: Gated Linear RNNs with State Expansion (arXiv:2404.07904)",
    contract_spec={"chunk_size": 16},
)
register_mixer(
    "mlstm",
    MLSTM,
    family="linear RNN",
    description="xLSTM's matrix-memory LSTM: exponential input gate, sigmoid forget gate, normaliser and stabiliser "
    "states; chunked with a per-query stabiliser; sigmoid output gate",
    paper="Beck et al. 2024, xLSTM: Extended Long Short-Term Memory (arXiv:2405.04517)",
    contract_spec={"chunk_size": 16},
)
register_mixer(
    "rwkv7",
    RWKV7,
    family="linear RNN",
    description="RWKV-7 time mixing: token shift, the generalised delta rule with vector decay and vector in-context "
    "learning rate (diagonal-plus-rank-one transition), chunked through one triangular solve per chunk",
    paper="Peng et al. 2025, RWKV-7 \"Goose\" with Expressive Dynamic State Evolution (arXiv:2503.14456)",
    contract_spec={"chunk_size": 16, "decay_rank": 8, "a_rank": 8, "gate_rank": 8},
)
register_mixer(
    "ttt_linear",
    TTTLinear,
    family="test-time training",
    description="TTT-Linear: the hidden state is a linear model x + LN(x W + c) per head, trained on the sequence "
    "by mini-batch gradient descent on a reconstruction loss; dual form per mini-batch",
    paper="Sun et al. 2024, Learning to (Learn at Test Time): RNNs with Expressive Hidden States (arXiv:2407.04620)",
    contract_spec={"mini_batch": 4},
)
register_mixer(
    "hyena",
    Hyena,
    family="long convolution",
    description="implicit long filters (positional MLP with sine activations, decay window) interleaved with gates; "
    "FFT convolution, exact decoding from all cached inputs (O(context) state)",
    paper="Poli et al. 2023, Hyena Hierarchy: Towards Larger Convolutional Language Models (arXiv:2302.10866)",
    contract_spec={"filter_order": 16, "emb_dim": 5},
)

register_mixer(
    "mamba",
    Mamba,
    family="state space",
    description="selective SSM: input-dependent delta, B, C, S4D-real A, short conv, SiLU gate; chunk-parallel scan; "
    "optional RMSNorms on dt, B, C (Jamba)",
    paper="Gu & Dao 2023, Mamba: Linear-Time Sequence Modeling with Selective State Spaces (arXiv:2312.00752)",
    contract_spec={"d_state": 4, "chunk_size": 16},
)
register_mixer(
    "mamba2",
    Mamba2,
    family="state space",
    description="Mamba-2 SSD: scalar decay per head, grouped B/C, gated RMSNorm; chunked SSD in matrix products",
    paper="Dao & Gu 2024, Transformers are SSMs: Generalized Models and Efficient Algorithms Through Structured "
    "State Space Duality (arXiv:2405.21060)",
    contract_spec={"d_state": 6, "head_dim": 16, "n_groups": 2, "chunk_size": 16},
)

register_mixer(
    "hymba",
    Hymba,
    family="hybrid heads",
    description="attention heads and Mamba heads in parallel on the same input, each normalised and scaled, averaged; "
    "sliding-window attention except in the first, middle and last layers",
    paper="Dong et al. 2024, Hymba: A Hybrid-head Architecture for Small Language Models (arXiv:2411.13676)",
    contract_spec={"window": 7, "kv_heads": 2, "full_attention": False, "d_state": 4, "chunk_size": 16},
)
register_mixer(
    "parallel_hybrid",
    ParallelHybrid,
    family="hybrid heads",
    description="attention heads and Mamba-2 heads in parallel on the same input, their outputs summed (Falcon-H1; "
    "its muP multipliers live in the weights); KV cache + conv and SSM state",
    paper="Zuo et al. 2025, Falcon-H1: A Family of Hybrid-Head Language Models Redefining Efficiency and Performance "
    "(arXiv:2507.22448)",
    contract_spec={"kv_heads": 2, "d_state": 6, "d_inner": 48, "ssm_head_dim": 12, "n_groups": 2, "chunk_size": 16},
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
    "moe",
    MoE,
    family="sparse FFN",
    description="Mixture-of-Experts SwiGLU: float32 router, token-choice top-k (renormalised, or the raw softmax "
    "weights), optional shared (of their own width, sigmoid-gated: Qwen2-MoE) and "
    "fine-grained experts, Switch balance + z-loss, capacity with token dropping in training; sorted grouped dispatch",
    paper="Shazeer et al. 2017 (arXiv:1701.06538); Jiang et al. 2024, Mixtral (arXiv:2401.04088); Dai et al. 2024, "
    "DeepSeekMoE (arXiv:2401.06066)",
    contract_spec={"experts": 4, "top_k": 2, "hidden": 16, "shared": 1, "shared_hidden": 24, "shared_gate": True},
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
register_block(
    "conformer",
    ConformerBlock,
    family="conv + attention",
    description="Conformer: half-step FFN, the layer's mixer (self-attention), a convolution module (pointwise, GLU, "
    "depthwise conv, LayerNorm, Swish, pointwise; centred in encoders, causal with a conv-state cache in LMs), "
    "half-step FFN, final norm",
    paper="Gulati et al. 2020, Conformer: Convolution-augmented Transformer for Speech Recognition (arXiv:2005.08100)",
)
register_block(
    "mod",
    MoDBlock,
    family="conditional depth",
    description="Mixture-of-Depths around an inner block: a router picks ceil(capacity * T) tokens per row (top-k in "
    "training, a causal rule at inference), only they pass through the block, scaled by sigmoid(router)",
    paper="Raposo et al. 2024, Mixture-of-Depths: Dynamically allocating compute in transformer-based language models "
    "(arXiv:2404.02258)",
)
