"""Named architectures in three sizes. A preset is a description, a paper and a function from
size to `ModelConfig`; the schema knows nothing about presets.

Names are `ARCH-SIZE` (e.g. `gqa-small`); a bare `ARCH` means `ARCH-tiny`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from speedlm.errors import SpeedlmError
from speedlm.models.config import ModelConfig

# d_model, n_layers, n_heads, max_seq_len, sliding window
SIZES = {
    "tiny": dict(d_model=64, n_layers=2, n_heads=4, max_seq_len=512, window=32),
    "small": dict(d_model=256, n_layers=6, n_heads=8, max_seq_len=1024, window=128),
    "base": dict(d_model=768, n_layers=12, n_heads=12, max_seq_len=2048, window=512),
}


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    paper: str
    make: Callable[[dict], dict]  # size dict -> ModelConfig fields (pattern, layers, ...)


def _delta_chunk(size: dict) -> int:
    """The delta rule's chunk: 64 tokens (fla's) for heads of 32 or more channels; 32 for the
    16-channel heads of `tiny`, where the C x C intra-chunk work outweighs the per-chunk state
    products (measured on CPU: a gated-deltanet-tiny training step 250 vs 307 ms at 16 x 256)."""
    return 32 if size["d_model"] // size["n_heads"] <= 16 else 64


def _mamba2_head_dim(size: dict) -> int:
    """Mamba-2's 64-channel heads, narrower where d_inner = 2 d_model has fewer channels than
    n_heads x 64 (tiny: 128 channels, 4 heads of 32)."""
    return min(64, 2 * size["d_model"] // size["n_heads"])


def _falcon_h1_mixer(size: dict) -> dict:
    """Falcon-H1's small models' proportions (0.5B, 1.5B): SSM channels 1.5 x the width in heads of
    64 (32 in tiny, for 3 of them), key/value heads a quarter of the attention heads; d_state 128,
    or half the width where that is less (tiny: 32)."""
    d = size["d_model"]
    return {"name": "parallel_hybrid", "kv_heads": max(1, size["n_heads"] // 4), "d_inner": 3 * d // 2,
            "ssm_head_dim": 32 if d <= 64 else 64, "d_state": min(128, d // 2)}


def _jamba_layers(size: dict) -> int:
    """Jamba's block is 8 layers (attention in the fifth): the smallest multiple of 8 that is at
    least the size's depth."""
    return max(8, -(-size["n_layers"] // 8) * 8)


def _quarter_ffn(size: dict) -> int:
    """A fine-grained expert: a quarter of the dense FFN's hidden width (8/3 d, multiple of 64),
    rounded up to a multiple of 16."""
    dense = -(-(8 * size["d_model"] // 3) // 64) * 64
    return -(-(dense // 4) // 16) * 16


def _widening_windows(size: dict) -> list[int]:
    """Per-layer windows from half the size's window in the first layer to twice it in the last
    (lower layers are the more local ones)."""
    n, w = size["n_layers"], size["window"]
    return [round(w / 2 * 4 ** (i / max(1, n - 1))) for i in range(n)]


def _linformer_k(size: dict) -> int:
    """Linformer's projected length: 8 rows for tiny (short non-text inputs: 16 image patches),
    a sixteenth of max_seq_len for small, an eighth for base (the paper's k = 256 at n = 2048)."""
    return {512: 8, 1024: 64}.get(size["max_seq_len"], size["max_seq_len"] // 8)


def _reformer_chunk(size: dict) -> int:
    """The paper's chunk of 64 keys, or the size's window where that is shorter."""
    return min(64, size["window"])


def _cfg(size: dict, **fields) -> ModelConfig:
    base = {k: size[k] for k in ("d_model", "n_layers", "n_heads", "max_seq_len")}
    base.update(fields)
    return ModelConfig(**base)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "transformer",
            "Llama-style decoder: multi-head causal attention (SDPA/FlashAttention), RoPE, SwiGLU, RMSNorm",
            "Vaswani et al. 2017 (arXiv:1706.03762); Touvron et al. 2023 (arXiv:2302.13971)",
            lambda s: dict(pattern="A", layers={"A": {"mixer": {"name": "attention"}}}),
        ),
        Preset(
            "mla",
            "multi-head latent attention (DeepSeek-V2): a 4 x head_dim latent and a head_dim / 2 RoPE key per token "
            "are the whole KV cache; decoding attends over the latents with W_UK and W_UV absorbed",
            "DeepSeek-AI 2024, DeepSeek-V2: A Strong, Economical, and Efficient Mixture-of-Experts Language Model "
            "(arXiv:2405.04434)",
            lambda s: dict(pattern="A", layers={"A": {"mixer": {"name": "mla"}}}),
        ),
        Preset(
            "moh",
            "mixture-of-heads attention: a quarter of the heads shared, half of the others routed per token (tiny: "
            "2 of 4 heads active, small: 5 of 8), outputs a gate-weighted sum; attention only for routed pairs",
            "Jin et al. 2024, MoH: Multi-Head Attention as Mixture-of-Head Attention (arXiv:2410.11842)",
            lambda s: dict(pattern="A", layers={"A": {"mixer": {"name": "moh"}}}),
        ),
        Preset(
            "fox",
            "Forgetting Transformer (FoX, LLaMA form): softmax attention with a data-dependent forget gate per head "
            "in the logits, no positional encoding; SDPA with the bias as one more key channel",
            "Lin et al. 2025, Forgetting Transformer: Softmax Attention with a Forget Gate (arXiv:2503.02130)",
            lambda s: dict(pattern="F", layers={"F": {"mixer": {"name": "forgetting_attention"}}}),
        ),
        Preset(
            "gqa",
            "grouped-query attention: n_heads / 4 shared key-value heads",
            "Ainslie et al. 2023, GQA (arXiv:2305.13245)",
            lambda s: dict(pattern="A", layers={"A": {"mixer": {"name": "attention", "kv_heads": max(1, s["n_heads"] // 4)}}}),
        ),
        Preset(
            "mqa",
            "multi-query attention: one key-value head shared by all query heads",
            "Shazeer 2019, Fast Transformer Decoding (arXiv:1911.02150)",
            lambda s: dict(pattern="A", layers={"A": {"mixer": {"name": "attention", "kv_heads": 1}}}),
        ),
        Preset(
            "sliding-window",
            "sliding-window attention on FlexAttention block masks; O(window) KV cache",
            "Beltagy et al. 2020, Longformer (arXiv:2004.05150); Jiang et al. 2023, Mistral 7B (arXiv:2310.06825)",
            lambda s: dict(pattern="S", layers={"S": {"mixer": {"name": "sliding_window", "window": s["window"]}}}),
        ),
        Preset(
            "dilated-window",
            "dilated sliding window: the size's window of keys per query at dilations 1, 2, 4, 8 across the heads "
            "(reach up to 8x the window at the cost of the window); O(reach) KV cache",
            "Beltagy et al. 2020, Longformer: The Long-Document Transformer (arXiv:2004.05150)",
            lambda s: dict(
                pattern="W",
                layers={"W": {"mixer": {"name": "dilated_window", "window": s["window"],
                                        "dilation": [2 ** (4 * h // s["n_heads"]) for h in range(s["n_heads"])]}}},
            ),
        ),
        Preset(
            "longformer",
            "Longformer: the size's sliding window plus 4 global prefix tokens with their own projections (every query "
            "sees them, they see everything before them); O(window) cache",
            "Beltagy et al. 2020, Longformer: The Long-Document Transformer (arXiv:2004.05150)",
            lambda s: dict(pattern="G", layers={"G": {"mixer": {"name": "longformer", "window": s["window"], "global_tokens": 4}}}),
        ),
        Preset(
            "adaptive-span",
            "Adaptive Attention Span: each head learns its span (up to the size's max_seq_len) through a soft ramp of 32 "
            "tokens, from 0 as in the paper, shrunk by a span penalty; attention and KV cache follow the longest span",
            "Sukhbaatar et al. 2019, Adaptive Attention Span in Transformers (arXiv:1905.07799)",
            lambda s: dict(pattern="P", layers={"P": {"mixer": {"name": "adaptive_span", "max_span": s["max_seq_len"], "ramp": 32}}}),
        ),
        Preset(
            "block-topk",
            "MoBA block top-k attention: blocks of half the size's window; each query sees 3 blocks (MoBA's top-k: "
            "its own, and the 2 earlier blocks whose mean key scores highest against it); full KV cache plus block key "
            "sums",
            "Lu et al. 2025, MoBA: Mixture of Block Attention for Long-Context LLMs (arXiv:2502.13189)",
            lambda s: dict(pattern="B", layers={"B": {"mixer": {"name": "block_topk", "block_size": s["window"] // 2, "top_k": 3}}}),
        ),
        Preset(
            "nsa",
            "native sparse attention: mean-pooled key blocks, the top-n blocks they rank (first, previous and own "
            "always) and a sliding window, gated per head; GQA with a quarter of the KV heads (base: the paper's "
            "64-token blocks, 16 selected, window 512)",
            "Yuan et al. 2025, Native Sparse Attention: Hardware-Aligned and Natively Trainable Sparse Attention "
            "(arXiv:2502.11089)",
            lambda s: dict(pattern="N", layers={"N": {"mixer": {
                "name": "nsa", "kv_heads": max(1, s["n_heads"] // 4), "window": s["window"],
                "block_size": {64: 16, 256: 32}.get(s["d_model"], 64), "top_n": {64: 4, 256: 8}.get(s["d_model"], 16)}}}),
        ),
        Preset(
            "logsparse",
            "LogSparse: each query sees a local window of 4 and then keys at power-of-two distances (O(log T) keys), "
            "with convolutional queries and keys (kernel 3)",
            "Li et al. 2019, Enhancing the Locality and Breaking the Memory Bottleneck of Transformer on Time Series "
            "Forecasting (arXiv:1907.00235)",
            lambda s: dict(pattern="L", layers={"L": {"mixer": {"name": "logsparse", "local": 4, "conv_kernel": 3}}}),
        ),
        Preset(
            "reformer",
            "Reformer: LSH attention (shared QK, 2 hash rounds, chunks of 64 keys or the size's window, T / chunk "
            "buckets), reversible residual layers (activation memory flat in depth) and an FFN in 4 chunks",
            "Kitaev et al. 2020, Reformer: The Efficient Transformer (arXiv:2001.04451)",
            lambda s: dict(
                pattern="R",
                layers={"R": {"mixer": {"name": "reformer", "n_hashes": 2, "chunk": _reformer_chunk(s),
                                        "n_buckets": s["max_seq_len"] // _reformer_chunk(s)}}},
                reversible=True,
                ffn_chunks=4,
            ),
        ),
        Preset(
            "transformer-xl",
            "Transformer-XL: segments of a quarter of the size's max_seq_len, a memory of as many positions before each "
            "(train with --segments to carry it across windows), relative positions with u and v biases; reach "
            "mem_len x layers",
            "Dai et al. 2019, Transformer-XL: Attentive Language Models Beyond a Fixed-Length Context (arXiv:1901.02860)",
            lambda s: dict(pattern="X", layers={"X": {"mixer": {"name": "transformer_xl", "mem_len": s["max_seq_len"] // 4,
                                                                "segment": s["max_seq_len"] // 4}}}),
        ),
        Preset(
            "linformer",
            "Linformer encoder (bidirectional, objective classify): keys and values projected along the sequence to "
            "k rows shared by the heads (k = 8 / 64 / 256 for tiny / small / base), O(T k)",
            "Wang et al. 2020, Linformer: Self-Attention with Linear Complexity (arXiv:2006.04768)",
            lambda s: dict(pattern="F", objective="classify", num_classes=2,
                           layers={"F": {"mixer": {"name": "linformer", "k": _linformer_k(s)}}}),
        ),
        Preset(
            "conformer",
            "Conformer: macaron half-step SwiGLU FFNs around self-attention (RoPE) and a convolution module (GLU, "
            "depthwise conv of 15, or 7 in tiny, LayerNorm, Swish); causal conv and conv-state cache as a language "
            "model, centred as an encoder",
            "Gulati et al. 2020, Conformer: Convolution-augmented Transformer for Speech Recognition (arXiv:2005.08100)",
            lambda s: dict(pattern="C", layers={"C": {"mixer": {"name": "attention"},
                                                      "block": {"name": "conformer", "kernel": 7 if s["d_model"] <= 64 else 15}}}),
        ),
        Preset(
            "lite-transformer",
            "Lite Transformer: long-short range attention in every layer (half the channels through attention, half "
            "through GLU + a lightweight convolution of 7 taps shared by 4 channel groups), SwiGLU FFN",
            "Wu et al. 2020, Lite Transformer with Long-Short Range Attention (arXiv:2004.11886)",
            lambda s: dict(pattern="L", layers={"L": {"mixer": {"name": "lite_transformer", "kernel": 7, "conv_heads": 4}}}),
        ),
        Preset(
            "mdlm",
            "masked diffusion LM (MDLM / LLaDA): a bidirectional Llama-style transformer (RoPE, SwiGLU) denoising a "
            "mask token, NELBO training, generation by parallel unmasking (speedlm generate --steps)",
            "Sahoo et al. 2024, Simple and Effective Masked Diffusion Language Models (arXiv:2406.07524); Nie et al. "
            "2025, Large Language Diffusion Models (arXiv:2502.09992)",
            lambda s: dict(pattern="A", objective="diffusion", layers={"A": {"mixer": {"name": "attention"}}}),
        ),
        Preset(
            "linear-attention",
            "causal linear attention (elu+1 features), chunked training, O(1) matrix-state cache",
            "Katharopoulos et al. 2020, Transformers are RNNs (arXiv:2006.16236)",
            lambda s: dict(pattern="L", layers={"L": {"mixer": {"name": "linear_attention"}}}),
        ),
        Preset(
            "linear-hybrid",
            "inter-layer hybrid: linear attention layers interleaved with sliding-window attention",
            "Arora et al. 2024, Based (arXiv:2402.18668)",
            lambda s: dict(
                pattern="LS",
                layers={
                    "L": {"mixer": {"name": "linear_attention"}},
                    "S": {"mixer": {"name": "sliding_window", "window": s["window"]}},
                },
            ),
        ),
        Preset(
            "performer",
            "Performer: FAVOR+ positive orthogonal random features (m = Dh ln Dh), causal prefix sums",
            "Choromanski et al. 2020, Rethinking Attention with Performers (arXiv:2009.14794)",
            lambda s: dict(pattern="P", layers={"P": {"mixer": {"name": "performer"}}}),
        ),
        Preset(
            "based",
            "Based: gated short convolutions, Taylor-feature linear attention and 64-token sliding-window attention, "
            "interleaved (tiny: 3 layers, window 32)",
            "Arora et al. 2024, Simple linear attention language models balance the recall-throughput tradeoff "
            "(arXiv:2402.18668)",
            lambda s: dict(
                n_layers=3 if s["n_layers"] == 2 else s["n_layers"],
                pattern="CLS",
                layers={
                    "C": {"mixer": {"name": "base_conv", "kernel": 3}},
                    "L": {"mixer": {"name": "based", "feature_dim": 16}},
                    "S": {"mixer": {"name": "sliding_window", "window": min(64, s["window"])}},
                },
            ),
        ),
        Preset(
            "retnet",
            "RetNet: multi-scale retention with fixed per-head decays, group norm and swish gate",
            "Sun et al. 2023, Retentive Network (arXiv:2307.08621)",
            lambda s: dict(pattern="R", layers={"R": {"mixer": {"name": "retnet"}}}),
        ),
        Preset(
            "gla",
            "GLA: gated linear attention, data-dependent per-channel decay and output gate",
            "Yang et al. 2023, Gated Linear Attention Transformers with Hardware-Efficient Training (arXiv:2312.06635)",
            lambda s: dict(pattern="G", layers={"G": {"mixer": {"name": "gla"}}}),
        ),
        Preset(
            "deltanet",
            "DeltaNet: delta-rule linear attention with L2-normalised q/k, beta gate and short convolutions",
            "Yang et al. 2024, Parallelizing Linear Transformers with the Delta Rule over Sequence Length (arXiv:2406.06484)",
            lambda s: dict(pattern="D", layers={"D": {"mixer": {"name": "deltanet", "chunk_size": _delta_chunk(s)}}}),
        ),
        Preset(
            "gated-deltanet",
            "Gated DeltaNet: the delta rule with a Mamba-2-style data-dependent decay and an output gate",
            "Yang et al. 2024, Gated Delta Networks: Improving Mamba2 with Delta Rule (arXiv:2412.06464)",
            lambda s: dict(pattern="D", layers={"D": {"mixer": {"name": "gated_deltanet", "chunk_size": _delta_chunk(s)}}}),
        ),
        Preset(
            "hgrn",
            "HGRN: element-wise gated linear recurrence with forget-gate lower bounds rising with depth",
            "Qin et al. 2023, Hierarchically Gated Recurrent Neural Network for Sequence Modeling (arXiv:2311.04823)",
            lambda s: dict(pattern="H", layers={"H": {"mixer": {"name": "hgrn"}}}),
        ),
        Preset(
            "hgrn2",
            "HGRN2: HGRN's gated recurrence with outer-product state expansion (head_dim x head_dim per head)",
            "Qin et al. 2024, HGRN2: Gated Linear RNNs with State Expansion (arXiv:2404.07904)",
            lambda s: dict(pattern="H", layers={"H": {"mixer": {"name": "hgrn2"}}}),
        ),
        Preset(
            "xlstm",
            "xLSTM (7B form): mLSTM layers (matrix memory, exponential input gate, normaliser and stabiliser) with "
            "SwiGLU FFNs",
            "Beck et al. 2024, xLSTM: Extended Long Short-Term Memory (arXiv:2405.04517); Beck et al. 2025, xLSTM 7B "
            "(arXiv:2503.13427)",
            lambda s: dict(pattern="X", layers={"X": {"mixer": {"name": "mlstm"}}}),
        ),
        Preset(
            "rwkv7",
            "RWKV-7 Goose: token-shifted time mixing with the generalised delta rule (vector decay, vector in-context "
            "learning rate), SwiGLU channel mixing",
            "Peng et al. 2025, RWKV-7 \"Goose\" with Expressive Dynamic State Evolution (arXiv:2503.14456)",
            lambda s: dict(pattern="R", layers={"R": {"mixer": {"name": "rwkv7"}}}),
        ),
        Preset(
            "ttt-linear",
            "TTT-Linear: each layer's state is a linear model trained on the sequence by mini-batch gradient descent "
            "(mini-batches of 16), read by the queries; SwiGLU FFNs",
            "Sun et al. 2024, Learning to (Learn at Test Time): RNNs with Expressive Hidden States (arXiv:2407.04620)",
            lambda s: dict(pattern="T", layers={"T": {"mixer": {"name": "ttt_linear"}}}),
        ),
        Preset(
            "mamba",
            "Mamba: selective state-space layers (no FFN, twice the depth), chunk-parallel scan, O(1) conv + SSM state",
            "Gu & Dao 2023, Mamba: Linear-Time Sequence Modeling with Selective State Spaces (arXiv:2312.00752)",
            lambda s: dict(n_layers=2 * s["n_layers"], pattern="M", layers={"M": {"mixer": {"name": "mamba"}, "ffn": "none"}}),
        ),
        Preset(
            "mamba2",
            "Mamba-2: SSD layers with one decay per head and 64-dim states (no FFN, twice the depth), chunked in matmuls",
            "Dao & Gu 2024, Transformers are SSMs: Generalized Models and Efficient Algorithms Through Structured State "
            "Space Duality (arXiv:2405.21060)",
            lambda s: dict(
                n_layers=2 * s["n_layers"],
                pattern="M",
                layers={"M": {"mixer": {"name": "mamba2", "head_dim": _mamba2_head_dim(s)}, "ffn": "none"}},
            ),
        ),
        Preset(
            "jamba",
            "Jamba: one attention layer per eight (the fifth, GQA without positional encoding), Mamba with RMS-normed "
            "dt, B, C elsewhere; MoE FFNs (16 experts, top-2, softmax weights not renormalised) on every other layer, "
            "dense SwiGLU on the rest; 8 layers at tiny and small",
            "Lieber et al. 2024, Jamba: A Hybrid Transformer-Mamba Language Model (arXiv:2403.19887)",
            lambda s: dict(
                n_layers=_jamba_layers(s),
                pattern="MEMEAEME",
                layers={
                    "M": {"mixer": {"name": "mamba", "inner_norms": True}},
                    "E": {"mixer": {"name": "mamba", "inner_norms": True},
                          "ffn": {"name": "moe", "experts": 16, "top_k": 2, "renormalize": False}},
                    "A": {"mixer": {"name": "attention", "kv_heads": max(1, s["n_heads"] // 4), "positions": "none"}},
                },
            ),
        ),
        Preset(
            "mixtral",
            "Mixtral: grouped-query attention with a Mixture-of-Experts FFN in every layer (8 SwiGLU experts, top-2, "
            "weights renormalised over the two; dropless)",
            "Jiang et al. 2024, Mixtral of Experts (arXiv:2401.04088)",
            lambda s: dict(
                pattern="A",
                layers={"A": {"mixer": {"name": "attention", "kv_heads": max(1, s["n_heads"] // 4)}}},
                ffn={"name": "moe", "experts": 8, "top_k": 2},
            ),
        ),
        Preset(
            "deepseek-moe",
            "DeepSeekMoE: fine-grained experts (16 of a quarter of the FFN width, top-4, softmax weights not "
            "renormalised) beside 2 always-on shared experts, attention in every layer",
            "Dai et al. 2024, DeepSeekMoE: Towards Ultimate Expert Specialization in Mixture-of-Experts Language Models "
            "(arXiv:2401.06066)",
            lambda s: dict(
                pattern="A",
                layers={"A": {"mixer": {"name": "attention"}}},
                ffn={"name": "moe", "experts": 16, "top_k": 4, "shared": 2, "hidden": _quarter_ffn(s), "renormalize": False},
            ),
        ),
        Preset(
            "samba",
            "Samba: Mamba, MLP, sliding-window attention, MLP, repeated (every mixer followed by a SwiGLU FFN)",
            "Ren et al. 2024, Samba: Simple Hybrid State Space Models for Efficient Unlimited Context Language Modeling "
            "(arXiv:2406.07522)",
            lambda s: dict(
                pattern="MS",
                layers={"M": {"mixer": {"name": "mamba"}}, "S": {"mixer": {"name": "sliding_window", "window": s["window"]}}},
            ),
        ),
        Preset(
            "hymba",
            "Hymba: attention and Mamba heads in parallel in every layer, sliding-window attention except the first, "
            "middle and last layers",
            "Dong et al. 2024, Hymba: A Hybrid-head Architecture for Small Language Models (arXiv:2411.13676)",
            lambda s: dict(pattern="H", layers={"H": {"mixer": {"name": "hymba", "window": s["window"]}}}),
        ),
        Preset(
            "falcon-h1",
            "Falcon-H1: attention and Mamba-2 heads in parallel in every layer on the same input, their outputs "
            "summed (no extra projection), then a SwiGLU FFN; Mamba-2 gets 1.5x the width in channels, GQA a quarter "
            "of the heads",
            "Zuo et al. 2025, Falcon-H1: A Family of Hybrid-Head Language Models Redefining Efficiency and Performance "
            "(arXiv:2507.22448)",
            lambda s: dict(pattern="F", layers={"F": {"mixer": _falcon_h1_mixer(s)}}),
        ),
        Preset(
            "sepllm",
            "SepLLM: attention to the initial tokens, the separators (punctuation, newline, space) and a local "
            "window, trained from scratch; KV cache and cost follow the kept keys",
            "Chen et al. 2024, SepLLM: Accelerate LLMs by Compressing One Segment into One Separator (arXiv:2412.12094)",
            lambda s: dict(pattern="P", layers={"P": {"mixer": {"name": "sepllm", "window": s["window"]}}}),
        ),
        Preset(
            "sepllm-hybrid",
            "SepLLM with full attention in the first and last layers and the window widening with depth",
            "Chen et al. 2024, SepLLM (arXiv:2412.12094), the hybrid-layer variant",
            lambda s: dict(
                pattern="P",
                layers={"P": {"mixer": {"name": "sepllm", "window": _widening_windows(s), "full_layers": "first_last"}}},
            ),
        ),
        Preset(
            "mod",
            "Mixture-of-Depths transformer: every other block routed, 12.5% of the tokens pass through it (top-k in "
            "training, the router's sigmoid > 0.5 at inference), the rest ride the residual",
            "Raposo et al. 2024, Mixture-of-Depths (arXiv:2404.02258)",
            lambda s: dict(
                pattern="AR",
                layers={"A": {"mixer": {"name": "attention"}},
                        "R": {"mixer": {"name": "attention"}, "block": {"name": "mod", "capacity": 0.125}}},
            ),
        ),
        Preset(
            "mod-mamba",
            "Mixture-of-Depths on Mamba: every other Mamba layer routed at 12.5% capacity, with the stop-gradient "
            "predictor as the causal rule",
            "Raposo et al. 2024, Mixture-of-Depths (arXiv:2404.02258); Gu & Dao 2023, Mamba (arXiv:2312.00752)",
            lambda s: dict(
                n_layers=2 * s["n_layers"],
                pattern="MR",
                layers={
                    "M": {"mixer": {"name": "mamba"}, "ffn": "none"},
                    "R": {"mixer": {"name": "mamba"}, "ffn": "none",
                          "block": {"name": "mod", "capacity": 0.125, "causal_rule": "predictor"}},
                },
            ),
        ),
        Preset(
            "hyena",
            "Hyena: order-2 implicit long convolutions (positional-MLP filters, decay window) and gates, FFT "
            "convolution, SwiGLU FFN; exact decoding from cached inputs (O(context) state)",
            "Poli et al. 2023, Hyena Hierarchy: Towards Larger Convolutional Language Models (arXiv:2302.10866)",
            lambda s: dict(pattern="Y", layers={"Y": {"mixer": {"name": "hyena"}}}),
        ),
        Preset(
            "striped-hyena",
            "StripedHyena: Hyena and grouped-query attention layers alternating, each with a SwiGLU FFN",
            "Poli et al. 2023, StripedHyena (Together AI); Ku et al. 2024, Mechanistic Design and Scaling of Hybrid "
            "Architectures (arXiv:2403.17844)",
            lambda s: dict(
                pattern="YA",
                layers={"Y": {"mixer": {"name": "hyena"}}, "A": {"mixer": {"name": "attention", "kv_heads": max(1, s["n_heads"] // 4)}}},
            ),
        ),
    ]
}


def split_preset_name(name: str) -> tuple[str, str]:
    arch, _, size = name.rpartition("-")
    if arch in PRESETS and size in SIZES:
        return arch, size
    if name in PRESETS:
        return name, "tiny"
    raise SpeedlmError(
        f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))} "
        f"with an optional size suffix -{'/-'.join(SIZES)} (see `speedlm list`)"
    )


def preset_config(name: str, **overrides) -> ModelConfig:
    arch, size = split_preset_name(name)
    s = SIZES[size]
    fields = PRESETS[arch].make(s)
    fields.update(overrides)
    return _cfg(s, **fields)


def presets_for(objective: str) -> list[str]:
    """The presets whose models have this objective ("ar": language models; "classify": encoders)."""
    return [name for name in PRESETS if preset_config(name).objective == objective]
