"""SepLLM attention (Chen et al. 2024, arXiv:2412.12094): each query sees the first `initial`
tokens, every separator token before it (punctuation, newline, tab, space: they come to
summarise the segment they close) and a local window of `window` tokens, itself included.

The mask is SepLLM's KV policy (cache/sepllm.py) applied to full attention, computed from the
token ids in `SeqMeta`: training, prefill and decoding all run the window + marked-keys form
(ops/marked_attention.py), whose cost follows the keys each query uses, and the cache keeps
exactly those keys (initial + separators + window - 1), so decoding equals the masked forward.

Options for the paper's variants: `window` per layer (a list, one per layer), and
`full_layers="first"` / `"first_last"` to keep full attention in those layers. Separator ids
come from the model config (recorded from the tokenizer at training time), else the byte
tokenizer's.
"""

from __future__ import annotations

from typing import Annotated, Literal

from speedlm.cache.kv import FullPolicy
from speedlm.cache.sepllm import TYPICAL_SEPARATOR_RATE, SepLLMPolicy
from speedlm.errors import SpeedlmError
from speedlm.layers.attention import AttentionBase
from speedlm.layers.dims import ModelDims
from speedlm.ops.masks import window_mean_keys
from speedlm.registry import Range
from speedlm.separators import BYTE_SEPARATORS


def layer_window(dims: ModelDims, window: int | list[int]) -> int:
    return window[dims.layer_idx] if isinstance(window, (list, tuple)) else window


class SepLLMAttention(AttentionBase):
    supports_bidirectional = False
    data_dependent_state = True

    @classmethod
    def check_options(cls, dims: ModelDims, window=64, kv_heads=None, **options) -> None:
        super().check_options(dims, kv_heads=kv_heads)
        if isinstance(window, (list, tuple)):
            if len(window) != dims.n_layers:
                raise SpeedlmError(f"sepllm: a per-layer window list needs {dims.n_layers} entries, got {len(window)}")
            if any(not isinstance(w, int) or isinstance(w, bool) or w < 1 for w in window):
                raise SpeedlmError(f"sepllm: every window must be an integer >= 1, got {window}")
        elif not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise SpeedlmError(f"sepllm: window must be an integer >= 1 or a list of them, got {window!r}")

    def __init__(
        self,
        dims: ModelDims,
        window: int | list[int] = 64,
        initial: Annotated[int, Range(min=0)] = 4,
        full_layers: Literal["none", "first", "first_last"] = "none",
        kv_heads: Annotated[int | None, Range(min=1)] = None,
        separators: list[int] | None = None,
    ):
        super().__init__(dims, kv_heads)
        full = {"none": set(), "first": {0}, "first_last": {0, dims.n_layers - 1}}[full_layers]
        self.full = dims.layer_idx in full
        self.window = layer_window(dims, window)
        self.initial = initial
        ids = separators or dims.separators or BYTE_SEPARATORS
        self.policy = FullPolicy() if self.full else SepLLMPolicy(tuple(ids), initial, self.window)
        self.reset_parameters()

    def default_policy(self):
        return self.policy

    def _mean_keys(self, context_len: int) -> float:
        if self.full:
            return super()._mean_keys(context_len)
        n, w = context_len, self.window
        local = window_mean_keys(n, w)
        far = max(0, n - w)  # queries i >= w see the separators among their first i - w + 1 keys
        return local + min(self.initial, n) + TYPICAL_SEPARATOR_RATE * far * (far + 1) / 2 / n
