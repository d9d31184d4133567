"""`ModelConfig`: one serialisable, validated description of a model.

The layer pattern names the mixer of each layer by letter, e.g. pattern "LLA" with
mixers {"L": {"name": "linear_attention"}, "A": {"name": "attention"}} repeated over
n_layers. Letters map to registered mixer names plus their options.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from speedlm.errors import SpeedlmError
from speedlm.models.registry import check_mixer_spec

OBJECTIVES = ("ar",)
FFNS = ("swiglu", "none")


@dataclass
class ModelConfig:
    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    pattern: str = "A"
    mixers: dict = field(default_factory=lambda: {"A": {"name": "attention"}})
    ffn: str = "swiglu"
    ffn_hidden: int | None = None  # default: 8/3 * d_model rounded up to a multiple of 64
    max_seq_len: int = 1024
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    objective: str = "ar"

    def __post_init__(self):
        self.validate()

    # ----- derived -----
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        return -(-(8 * self.d_model // 3) // 64) * 64

    def layer_specs(self) -> list[dict]:
        """The mixer spec of every layer, the pattern repeated over n_layers."""
        reps = self.n_layers // len(self.pattern)
        return [dict(self.mixers[ch]) for ch in self.pattern * reps]

    # ----- validation -----
    def validate(self) -> None:
        def need(cond, msg):
            if not cond:
                raise SpeedlmError(f"invalid model config: {msg}")

        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, f"{name} must be a positive integer, got {v!r}")
        need(self.d_model % self.n_heads == 0, f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        need(self.head_dim % 2 == 0, f"head_dim={self.head_dim} must be even for RoPE")
        need(isinstance(self.pattern, str) and len(self.pattern) > 0, "pattern must be a non-empty string of letters")
        need(
            self.n_layers % len(self.pattern) == 0,
            f"pattern {self.pattern!r} (length {len(self.pattern)}) does not tile n_layers={self.n_layers}",
        )
        need(isinstance(self.mixers, dict), "mixers must map pattern letters to mixer specs")
        missing = sorted(set(self.pattern) - set(self.mixers))
        need(not missing, f"pattern letters {missing} have no entry in mixers (have {sorted(self.mixers)})")
        for letter in sorted(set(self.pattern)):
            entry = check_mixer_spec(self.mixers[letter], f"invalid model config: mixers[{letter!r}]")
            need(
                self.objective != "ar" or entry.cls.supports_causal,
                f"mixer {entry.name!r} (pattern letter {letter!r}) is bidirectional-only and cannot be used "
                f"in a causal (objective='ar') model",
            )
        need(self.ffn in FFNS, f"ffn must be one of {FFNS}, got {self.ffn!r}")
        need(self.objective in OBJECTIVES, f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        need(self.ffn_hidden is None or (isinstance(self.ffn_hidden, int) and self.ffn_hidden > 0), "ffn_hidden must be a positive integer")

    # ----- serialisation -----
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        if not isinstance(d, dict):
            raise SpeedlmError(f"invalid model config: expected a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SpeedlmError(f"invalid model config: unknown field(s) {unknown}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise SpeedlmError(f"invalid model config: not valid JSON ({e.msg} at line {e.lineno})") from None
        return cls.from_dict(d)
