"""Any speedlm model as a Hugging Face `PreTrainedModel`: a config class (`model_type =
"speedlm"`) that carries the speedlm `ModelConfig`, and a causal-LM class whose only module is
speedlm's own model, so every family (attention, recurrent, SSM, hybrid) runs unchanged with its
own caches under `generate()`.

The speedlm caches travel through `generate()` inside `SpeedlmCache`, a `transformers.Cache`
holding one `ModelCache` (KV caches with their policies, recurrent and conv states); the model
does not take the default `DynamicCache`, whose per-layer keys and values could not hold a
recurrent state.

`speedlm.hf` registers both classes with the Auto classes on import, so an exported folder loads
with `AutoModelForCausalLM.from_pretrained(folder)` without `trust_remote_code`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import Cache, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from speedlm.errors import SpeedlmError
from speedlm.models.config import ModelConfig

MODEL_TYPE = "speedlm"


class SpeedlmConfig(PreTrainedConfig):
    """The speedlm `ModelConfig` (as its dict, `speedlm`), mirrored into the fields that
    Hugging Face tools read (vocabulary, width, depth, context, tied embeddings)."""

    model_type = MODEL_TYPE

    speedlm: dict | None = None
    vocab_size: int = 256
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    max_position_embeddings: int = 1024
    tie_word_embeddings: bool = True
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs):
        if self.speedlm is not None:
            cfg = ModelConfig.from_dict(dict(self.speedlm))
            cfg.validate()
            self.vocab_size, self.hidden_size = cfg.vocab_size, cfg.d_model
            self.num_hidden_layers, self.num_attention_heads = cfg.n_layers, cfg.n_heads
            self.max_position_embeddings, self.tie_word_embeddings = cfg.max_seq_len, cfg.tie_embeddings
        super().__post_init__(**kwargs)

    @classmethod
    def from_speedlm(cls, config: ModelConfig, **kwargs) -> "SpeedlmConfig":
        return cls(speedlm=config.to_dict(), **kwargs)

    def speedlm_config(self) -> ModelConfig:
        if self.speedlm is None:
            raise SpeedlmError("this SpeedlmConfig carries no speedlm model config (`speedlm` is empty)")
        return ModelConfig.from_dict(dict(self.speedlm))


class SpeedlmCache(Cache):
    """A speedlm `ModelCache` inside a `transformers.Cache`, so `generate()` carries it from
    step to step. Its layers are speedlm's, not Hugging Face's: only the sequence length is read
    from outside."""

    def __init__(self, model_cache):
        super().__init__(layers=[])
        self.model_cache = model_cache

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.model_cache.seen

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_linear(self) -> list[bool]:  # not "all linear": generate() slices prompts by get_seq_length
        return [False]

    def reorder_cache(self, beam_idx):
        raise SpeedlmError("beam search is not supported on speedlm models; use greedy or sampled generate()")

    def crop(self, tokens_to_remove: int):
        raise SpeedlmError("speedlm caches cannot be cropped (no assisted or speculative decoding)")


class SpeedlmPreTrainedModel(PreTrainedModel):
    config_class = SpeedlmConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = []

    def _init_weights(self, module):
        # speedlm modules initialise themselves when built and loading overwrites the weights;
        # what loading cannot restore are non-persistent buffers (RetNet's decays), which
        # their modules refill themselves
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()


class SpeedlmForCausalLM(SpeedlmPreTrainedModel, GenerationMixin):
    """speedlm's `CausalLM` as `self.model`; weights are named `model.<speedlm name>`."""

    def __init__(self, config: SpeedlmConfig):
        super().__init__(config)
        from speedlm.models import build_model

        cfg = config.speedlm_config()
        if cfg.objective != "ar":
            raise SpeedlmError(f"only autoregressive speedlm models export as causal LMs, got objective={cfg.objective!r}")
        self.model = build_model(cfg)
        if cfg.tie_embeddings:
            self._tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # speedlm layers keep their own state (SpeedlmCache), not per-layer keys/values

    def get_input_embeddings(self):
        return self.model.embed

    def get_output_embeddings(self):
        return self.model.lm_head

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: SpeedlmCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
        past_key_values: SpeedlmCache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if inputs_embeds is not None or input_ids is None:
            raise SpeedlmError("speedlm models take input_ids (not inputs_embeds)")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise SpeedlmError("speedlm models do not take padded batches; give rows of equal length without padding")
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, SpeedlmCache):
            raise SpeedlmError(f"speedlm models keep their own cache (SpeedlmCache), got {type(cache).__name__}")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if cache is None and use_cache and not self.training:
            cache = SpeedlmCache(self.model.init_cache())
        logits = self.model(input_ids, None if cache is None else cache.model_cache)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        if isinstance(logits_to_keep, int):
            if logits_to_keep:
                logits = logits[:, -logits_to_keep:]
        else:  # a tensor of positions to keep
            logits = logits[:, logits_to_keep]
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)
