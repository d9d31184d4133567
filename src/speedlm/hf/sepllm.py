"""Training-free SepLLM and StreamingLLM on Hugging Face Llama-family models (Llama, Mistral,
Qwen2), through the library's public extension points, without editing its files:

- a registered attention function (`AttentionInterface`, name `ATTENTION`) that runs speedlm's
  own attention op under the policy's rule: the first tokens, the separators and a local window
  (SepLLM, Chen et al. 2024, arXiv:2412.12094), or the first tokens and a window (attention
  sinks, Xiao et al. 2023, arXiv:2309.17453);
- a custom `transformers.Cache`, `PolicyCache`, whose layers are speedlm `KVCache`s under the
  same speedlm policies (cache/kv.py, cache/sepllm.py) that `speedlm generate --attention` uses;
- a forward pre-hook on the decoder (a PyTorch extension point) that hands the cache the call's
  token ids (separators are found by id), gives policies that shift positions their slot
  positions, and swaps the empty `DynamicCache` that `generate()` creates for a `PolicyCache`.

Positions follow the policy, as in speedlm (DESIGN.md, "Positions in lossy caches"):
- original positions (SepLLM training-free, window): keys are cached rotated, as the model
  rotated them; decoding equals the full forward under the SepLLM mask;
- shifted positions (SepLLM streaming with a cap): the decoder is given the tokens' slots in the
  cache as positions, the cache un-rotates the keys it receives and rotates all of them by their
  slot when read, so positions stay below the cache size for streams of any length;
- attention sinks: the same positions within the cache, reached as speedlm's cache does
  (cache/kv.py, `shift_head`): keys cached as the model rotated them, the sinks re-rotated with
  the model's rotary embedding to sit right before the window.

`sepllm(model, ...)` wraps a loaded model in place and returns the handle (`SepLLM`): its
`generate()` and `perplexity()` run with the policy, `kv_ratio` reports the cache's size against
a full cache, and `remove()` restores the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, Cache
from transformers.cache_utils import CacheLayerMixin

from speedlm.cache.kv import KVPolicy, token_positions
from speedlm.cache.scored import attend_with_weights
from speedlm.cache.policies import make_policy
from speedlm.errors import SpeedlmError
from speedlm.ops.attention import attention
from speedlm.ops.masks import AttentionMask, Full

ATTENTION = "speedlm_policy"
ARCHITECTURES = ("llama", "mistral", "qwen2")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


@dataclass
class _Read:
    """How one call's queries read one layer's keys: the mask's positions and marks."""

    q_pos: int | torch.Tensor
    k_pos: int | torch.Tensor
    k_mark: torch.Tensor | None


class PolicyLayer(CacheLayerMixin):
    """One decoder layer's keys and values in a speedlm `KVCache` under `policy`."""

    is_sliding = False

    def __init__(self, policy: KVPolicy, rotate=None):
        super().__init__()
        self._rotate = rotate
        self.kv = policy.make_cache(rotate)  # a KVCache, or a policy's own (scored, quantised)
        self.read: _Read | None = None
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        raise AssertionError("PolicyCache.update does the work, with the call's token ids")

    def get_seq_length(self) -> int:
        return self.kv.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.kv.length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.kv = self.kv.policy.make_cache(self._rotate)
        self.read = None


class PolicyCache(Cache):
    """A `transformers.Cache` whose layers keep what a speedlm KV policy keeps. `seen` counts
    the tokens of the stream (what `get_seq_length` reports, so `generate()` slices prompts and
    unshifted positions continue correctly); each layer's `kv.length` is what it holds."""

    def __init__(self, policy: KVPolicy, n_layers: int, rotary=None):
        if (policy.pre_rope or policy.shift_head) and rotary is None:
            raise SpeedlmError("a policy that shifts positions needs the model's rotary embedding")
        super().__init__(layers=[PolicyLayer(policy, self._rotate_keys) for _ in range(n_layers)])
        self.policy = policy
        self.rotary = rotary  # the model's rotary embedding: (x, position_ids) -> cos, sin
        self.seen = 0
        self._ids: torch.Tensor | None = None
        self.slot_sum = 0.0  # sum over calls of held slots / tokens seen (for the mean KV ratio)
        self.calls = 0

    def _cos_sin(self, x: torch.Tensor, positions: torch.Tensor):
        """The model's rotation for `positions` (B|1, L), as (B|1, 1, L, Dh) in at least float32,
        without the rotary's attention scaling (cos^2 + sin^2 = scaling^2): keys the cache
        re-rotates were already scaled once."""
        dt = torch.promote_types(x.dtype, torch.float32)
        cos, sin = self.rotary(x.to(dt), positions)
        scale = (cos.pow(2) + sin.pow(2)).sqrt()
        return (cos / scale)[:, None].to(dt), (sin / scale)[:, None].to(dt)

    def _rotate_keys(self, k: torch.Tensor, shift: int) -> torch.Tensor:
        """Every key rotated `shift` positions further (what speedlm's sink cache asks for)."""
        cos, sin = self._cos_sin(k, torch.full((1, 1), shift, device=k.device))
        kk = k.to(cos.dtype)
        return (kk * cos + _rotate_half(kk) * sin).to(k.dtype)

    # ----- the call -----
    def begin(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """Take a call's token ids; return the position ids the decoder must use (None: its
        own, the original positions)."""
        self._ids = input_ids
        if not self.policy.pre_rope:
            return None
        start = self.layers[0].kv.length  # the slots the new tokens will occupy
        return token_positions(start, input_ids.shape[1], input_ids.device)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if self._ids is None:
            raise SpeedlmError("PolicyCache gets its token ids from the wrapped model; call the model, not its layers")
        layer = self.layers[layer_idx]
        t = key_states.shape[-2]
        policy = self.policy
        marks = policy.mark(self._ids, self.seen, t, key_states.device)
        if marks is not None:
            marks = marks.expand(key_states.shape[0], t)
        window = policy.attend_window()
        if policy.pre_rope:
            # the decoder rotated these keys at their slots; cache them unrotated
            # rotations in float32 at least: half-precision keys would lose bits un-rotating
            dt = torch.promote_types(key_states.dtype, torch.float32)
            slots = token_positions(layer.kv.length, t, key_states.device)
            cos, sin = self.rotary(value_states.to(dt), slots)
            cos, sin = cos[:, None].to(dt), sin[:, None].to(dt)
            ks = key_states.to(dt)
            scale = cos.pow(2) + sin.pow(2)  # attention_scaling^2 (1 for plain RoPE)
            raw = ((ks * cos - _rotate_half(ks) * sin) / scale).to(key_states.dtype)
            keys = layer.kv.extend(raw, value_states, self.seen, marks)
            n = keys.k.shape[-2]
            cos, sin = self.rotary(value_states.to(dt), torch.arange(n, device=key_states.device)[None])
            kk = keys.k.to(dt)
            k_all = (kk * cos[:, None].to(dt) + _rotate_half(kk) * sin[:, None].to(dt)).to(key_states.dtype)
            layer.read = _Read(*layer.kv.mask_terms(keys, self.seen, t, window))
            out = k_all, keys.v
        elif policy.needs_weights:  # H2O, SnapKV: evicted by `policy_attention` once the weights exist
            layer.read = None
            out = layer.kv.append(key_states, value_states)
        else:
            keys = layer.kv.extend(key_states, value_states, self.seen, marks)
            layer.read = _Read(*layer.kv.mask_terms(keys, self.seen, t, window))
            out = keys.k, keys.v
        if layer_idx == len(self.layers) - 1:
            self.seen += t
            self.slot_sum += self.kv_ratio
            self.calls += 1
        return out

    # ----- what it holds -----
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    @property
    def kv_slots(self) -> list[int]:
        return [layer.kv.length for layer in self.layers]

    @property
    def kv_ratio(self) -> float:
        """Slots held against a full cache's (one per token seen), over the layers."""
        return sum(self.kv_slots) / (len(self.layers) * self.seen) if self.seen else 1.0

    @property
    def mean_kv_ratio(self) -> float:
        """The KV ratio averaged over the calls so far (decoding steps, or streamed chunks)."""
        return self.slot_sum / self.calls if self.calls else 1.0

    def nbytes(self) -> int:
        return sum(layer.kv.nbytes() for layer in self.layers)

    @property
    def is_compileable(self) -> bool:
        return False

    def reorder_cache(self, beam_idx):
        raise SpeedlmError("beam search is not supported with a SepLLM / sink cache; use greedy or sampled decoding")

    def crop(self, tokens_to_remove: int):
        raise SpeedlmError("a SepLLM / sink cache cannot be cropped (no assisted or speculative decoding)")


def policy_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The registered attention function: speedlm's attention under the wrapper's policy.
    query (B, H, T, Dh) and key/value (B, Hkv, S, Dh) as the model's attention passes them."""
    wrap = getattr(module, "speedlm_policy", None)
    if wrap is None:
        raise SpeedlmError(f"attention {ATTENTION!r} runs only on a model wrapped by speedlm.hf.sepllm()")
    cache = wrap._call[1] if wrap._call is not None else None
    if cache is not None and wrap.policy.needs_weights:  # the weights decide what the cache keeps
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        out, weights = attend_with_weights(query, key, value, scale)
        cache.layers[module.layer_idx].kv.observe(query, weights, scale)
        return out.transpose(1, 2).contiguous(), None
    mask = wrap.mask(module.layer_idx, query, key)
    out = attention(query, key, value, mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, policy_attention)


def _decoder(model):
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        raise SpeedlmError("expected a Hugging Face causal LM with a Llama-style decoder (model.model.layers, rotary_emb)")
    return inner


def _check_architecture(config) -> None:
    kind = getattr(config, "model_type", None)
    if kind not in ARCHITECTURES:
        raise SpeedlmError(f"SepLLM wrapping supports {', '.join(ARCHITECTURES)} models; this one is {kind!r}")
    types = getattr(config, "layer_types", None) or []
    sliding = any(t == "sliding_attention" for t in types) or (
        kind == "mistral" and getattr(config, "sliding_window", None) is not None
    )
    if sliding:
        raise SpeedlmError(
            "this model uses its own sliding-window attention, which the SepLLM rule would replace; "
            "load it with the sliding window off (config.sliding_window=None / use_sliding_window=False)"
        )


class SepLLM:
    """The handle of a wrapped model (see `sepllm`)."""

    def __init__(self, model, policy: KVPolicy):
        _check_architecture(model.config)
        self.model = model
        self.policy = policy
        self.decoder = _decoder(model)
        self.n_layers = len(self.decoder.layers)
        self._call: tuple[torch.Tensor, PolicyCache | None] | None = None
        self._previous_attention = model.config._attn_implementation
        self._attention_modules = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "q_proj")]
        for m in self._attention_modules:
            m.speedlm_policy = self
        self._hook = self.decoder.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        model.set_attn_implementation(ATTENTION)

    # ----- caches -----
    def new_cache(self) -> PolicyCache:
        return PolicyCache(self.policy, self.n_layers, self.decoder.rotary_emb)

    def _before_forward(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise SpeedlmError("SepLLM finds separators by token id: call the model with input_ids, not inputs_embeds")
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool(mask.all()):
            raise SpeedlmError("SepLLM / sink caches take batches without padding; give rows of equal length")
        cache = kwargs.pop("past_key_values", None)
        cache = kwargs.get("cache", cache)
        use_cache = kwargs.get("use_cache")
        use_cache = self.model.config.use_cache if use_cache is None else use_cache
        if cache is not None and not isinstance(cache, PolicyCache):
            if cache.get_seq_length() > 0:
                raise SpeedlmError(
                    f"a SepLLM-wrapped model keeps its keys in a PolicyCache, got a filled {type(cache).__name__}; "
                    "pass wrapper.new_cache() or no cache"
                )
            cache = None  # the empty default cache of generate(): ours instead
        if cache is None and use_cache:
            cache = self.new_cache()
        kwargs["cache"] = cache
        if cache is not None:
            positions = cache.begin(ids)
            if positions is not None:
                kwargs["position_ids"] = positions
        self._call = (ids, cache)
        return args, kwargs

    # ----- the mask of one layer in the current call -----
    def mask(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor) -> AttentionMask:
        if self._call is None:
            raise SpeedlmError("the wrapped model's attention ran outside a model call")
        ids, cache = self._call
        t, s = query.shape[-2], key.shape[-2]
        window = self.policy.attend_window()
        if cache is not None:
            read = cache.layers[layer_idx].read
            return AttentionMask(Full(), t, s, read.q_pos, read.k_pos, True, window=window, k_mark=read.k_mark)
        if s != t:
            raise SpeedlmError("without a PolicyCache the wrapped model attends within one call only")
        marks = self.policy.mark(ids, 0, t, query.device)
        k_mark = None if window is None or marks is None else marks.expand(query.shape[0], t)
        return AttentionMask(Full(), t, t, 0, 0, True, window=window, k_mark=k_mark)

    # ----- generation and evaluation -----
    def generate(self, input_ids: torch.Tensor, **kwargs):
        """`model.generate` with a fresh policy cache; returns (sequences, cache)."""
        cache = kwargs.pop("cache", None) or self.new_cache()
        out = self.model.generate(input_ids, cache=cache, **kwargs)
        return out, cache

    @torch.no_grad()
    def perplexity(self, input_ids: torch.Tensor, chunk: int | None = None) -> dict:
        """Stream `input_ids` (1, N) through a policy cache in chunks (default: the policy's
        window, at most 256) and score every next token: {"nll", "ppl", "tokens", "kv_ratio"
        (at the end), "mean_kv_ratio" (over the chunks), "cache_bytes"}. Memory is the cache's
        bound, whatever N."""
        if input_ids.dim() != 2 or input_ids.shape[1] < 2:
            raise SpeedlmError("perplexity needs a (B, N) tensor of at least two tokens")
        window = getattr(self.policy, "window", 256)
        chunk = chunk or min(256, window)
        if chunk < 1:
            raise SpeedlmError(f"the chunk must be at least one token, got {chunk}")
        cache = self.new_cache()
        total, count = 0.0, 0
        n = input_ids.shape[1]
        for s in range(0, n - 1, chunk):
            piece = input_ids[:, s : min(n - 1, s + chunk)]
            logits = self.model(input_ids=piece, cache=cache, use_cache=True).logits
            target = input_ids[:, s + 1 : s + 1 + piece.shape[1]]
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # half precision: score in float32
            total += F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum").item()
            count += target.numel()
        nll = total / count
        return {
            "nll": nll,
            "ppl": math.exp(nll),
            "tokens": count,
            "kv_ratio": cache.kv_ratio,
            "mean_kv_ratio": cache.mean_kv_ratio,
            "cache_bytes": cache.nbytes(),
        }

    def remove(self) -> None:
        """Restore the model's own attention; drop the hook."""
        self._hook.remove()
        for m in self._attention_modules:
            del m.speedlm_policy
        self.model.set_attn_implementation(self._previous_attention)


def separator_ids_of(tokenizer) -> list[int]:
    """SepLLM's separator ids for a Hugging Face tokenizer (tokens that decode to punctuation
    from `. , ? ! ; :`, newlines, tabs or spaces), as for speedlm's own tokenizers."""
    from speedlm.data.separators import separator_ids

    return separator_ids(tokenizer)


def sepllm(
    model,
    policy: str = "sepllm",
    separators=None,
    tokenizer=None,
    window: int = 256,
    initial: int = 4,
    cap: int | None = None,
    separator_cache: int | None = None,
    **sizes,
) -> SepLLM:
    """Wrap a loaded Hugging Face Llama / Mistral / Qwen2 causal LM in place:

    - policy "sepllm" (default): the first `initial` tokens, every separator and a local
      `window`; original positions, so decoding equals the SepLLM-masked full forward. With a
      `cap` (and `separator_cache`, default 64): SepLLM's streaming cache, shifted positions.
    - policy "sink": StreamingLLM, `initial` sinks + `window`, shifted positions.
    - policy "window": the last `window` tokens.
    - policies "h2o", "snapkv", "kivi" (`sizes`: heavy / budget, observe / bits, group, residual,
      as `speedlm.cache.policies.make_policy`): the cache evicts by the attention weights the
      wrapper's attention function computes, or holds quantised keys and values.

    Separator ids come from `separators` or are derived from `tokenizer`."""
    if policy == "sepllm" and separators is None:
        if tokenizer is None:
            raise SpeedlmError("SepLLM needs separator ids: pass separators=[...] or the model's tokenizer")
        separators = separator_ids_of(tokenizer)
    kv_policy = make_policy(policy, window=window, sinks=initial, separators=separators,
                            separator_cache=separator_cache, cap=cap, **sizes)
    if kv_policy is None:
        raise SpeedlmError("policy 'full' is the unwrapped model; choose sepllm, sink or window")
    return SepLLM(model, kv_policy)
