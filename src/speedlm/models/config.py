"""`ModelConfig`: one serialisable, validated description of a model.

The layer pattern names each layer by letter, tiled over n_layers; `layers` maps each letter to
a layer spec: a mixer spec, and optionally an FFN spec and a block kind, each a registered
name plus options (strings are shorthand for {"name": ...}):

    pattern="MMA", layers={
        "M": {"mixer": {"name": "linear_attention"}, "ffn": "none"},
        "A": {"mixer": {"name": "sliding_window", "window": 128}},
    }

Letters without an `ffn` or `block` use the model-wide `ffn` and `block` defaults. Configs
written by the foundation (a `mixers` table of mixer specs, `ffn` as a string) load unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from speedlm.errors import SpeedlmError
from speedlm.layers.dims import ModelDims
from speedlm.registry import BLOCKS, FFNS, MIXERS, MODELS
from speedlm.schema import Schema, is_int, is_number

LAYER_KEYS = ("mixer", "ffn", "block")
BIDIRECTIONAL_OBJECTIVES = ("classify", "diffusion")  # models that run their mixers with causal=False


def _named(spec):
    """"swiglu" -> {"name": "swiglu"}; dicts are copied; anything else is left for validation."""
    if isinstance(spec, str):
        return {"name": spec}
    return dict(spec) if isinstance(spec, dict) else spec


@dataclass
class ModelConfig(Schema):
    what = "model config"

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    pattern: str = "A"
    layers: dict = field(default_factory=lambda: {"A": {"mixer": {"name": "attention"}}})
    ffn: dict = field(default_factory=lambda: {"name": "swiglu"})  # default FFN of every layer
    block: dict = field(default_factory=lambda: {"name": "prenorm"})  # default block kind
    ffn_hidden: int | None = None  # default: 8/3 * d_model rounded up to a multiple of 64
    max_seq_len: int = 1024
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    objective: str = "ar"
    # the tokenizer's separator ids (SepLLM; `speedlm train` records them from the tokenizer)
    separators: list[int] | None = None
    # Reformer's memory options (models/reversible.py): two-stream reversible residual layers
    # whose backward recomputes activations, and the FFN run over this many sequence pieces
    reversible: bool = False
    ffn_chunks: int = 1
    # encoders (objective "classify", models/encoder.py): classes, features per input token
    # (0: token ids through an embedding of vocab_size) and pooling ("mean" or a "cls" token)
    num_classes: int | None = None
    input_dim: int = 0
    pooling: str = "mean"

    def __post_init__(self):
        self.ffn, self.block = _named(self.ffn), _named(self.block)
        if isinstance(self.layers, dict):
            self.layers = {
                letter: {k: _named(v) if k in LAYER_KEYS else v for k, v in spec.items()} if isinstance(spec, dict) else spec
                for letter, spec in self.layers.items()
            }
        super().__post_init__()

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Also reads the foundation's form: `mixers` {letter: mixer spec} becomes `layers`."""
        if isinstance(d, dict) and "mixers" in d:
            if "layers" in d:
                raise SpeedlmError("invalid model config: give `layers` (layer specs) or the older `mixers`, not both")
            d = dict(d)
            mixers = d.pop("mixers")
            d["layers"] = {k: {"mixer": v} for k, v in mixers.items()} if isinstance(mixers, dict) else mixers
        return super().from_dict(d)

    # ----- derived -----
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def dims(self, layer_idx: int = 0) -> ModelDims:
        return ModelDims(
            d_model=self.d_model,
            n_heads=self.n_heads,
            rope_theta=float(self.rope_theta),
            max_seq_len=self.max_seq_len,
            layer_idx=layer_idx,
            n_layers=self.n_layers,
            ffn_hidden=self.ffn_hidden,
            norm_eps=float(self.norm_eps),
            init_std=float(self.init_std),
            separators=None if self.separators is None else tuple(self.separators),
            ffn_chunks=self.ffn_chunks,
        )

    @property
    def hidden_dim(self) -> int:
        return self.dims().hidden_dim

    def layer_spec(self, letter: str) -> dict:
        """The full layer spec of a pattern letter, defaults filled in."""
        spec = self.layers[letter]
        return {
            "mixer": dict(spec["mixer"]),
            "ffn": dict(spec.get("ffn", self.ffn)),
            "block": dict(spec.get("block", self.block)),
        }

    def layer_specs(self) -> list[dict]:
        """The full layer spec of every layer, the pattern repeated over n_layers."""
        reps = self.n_layers // len(self.pattern)
        return [self.layer_spec(ch) for ch in self.pattern * reps]

    def check_vocab(self, vocab_size: int, source: str = "tokenizer") -> None:
        """The one vocabulary check: a tokenizer (or checkpoint tokenizer) must match the model."""
        if vocab_size != self.vocab_size:
            raise SpeedlmError(
                f"mismatched vocabulary: the {source} has {vocab_size} tokens, the model expects {self.vocab_size}; "
                f"build the model with vocab_size={vocab_size}"
            )

    # ----- validation -----
    def validate(self) -> None:
        need = self.need
        self.need_ints(("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"), 1)
        need(self.d_model % self.n_heads == 0, f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        need(self.head_dim % 2 == 0, f"head_dim={self.head_dim} must be even for RoPE")
        need(isinstance(self.pattern, str) and len(self.pattern) > 0, "pattern must be a non-empty string of letters")
        need(
            self.n_layers % len(self.pattern) == 0,
            f"pattern {self.pattern!r} (length {len(self.pattern)}) does not tile n_layers={self.n_layers}",
        )
        need(isinstance(self.layers, dict), "layers must map pattern letters to layer specs")
        missing = sorted(set(self.pattern) - set(self.layers))
        need(not missing, f"pattern letters {missing} have no entry in layers (have {sorted(self.layers)})")
        need(self.objective in MODELS, f"objective must be one of {sorted(MODELS)}, got {self.objective!r}")
        need(
            self.ffn_hidden is None or (is_int(self.ffn_hidden) and self.ffn_hidden > 0),
            f"ffn_hidden must be a positive integer, got {self.ffn_hidden!r}",
        )
        need(isinstance(self.tie_embeddings, bool), f"tie_embeddings must be true or false, got {self.tie_embeddings!r}")
        need(isinstance(self.reversible, bool), f"reversible must be true or false, got {self.reversible!r}")
        need(is_int(self.ffn_chunks) and self.ffn_chunks >= 1, f"ffn_chunks must be a positive integer, got {self.ffn_chunks!r}")
        for name in ("rope_theta", "norm_eps", "init_std"):
            v = getattr(self, name)
            need(is_number(v) and v > 0, f"{name} must be a positive number, got {v!r}")
        if self.separators is not None:
            ok = isinstance(self.separators, list) and all(is_int(i) and 0 <= i < self.vocab_size for i in self.separators)
            need(ok and self.separators, f"separators must be a non-empty list of token ids below vocab_size={self.vocab_size}")
        if self.objective == "classify":
            need(is_int(self.num_classes) and self.num_classes >= 2,
                 f"an encoder (objective={self.objective!r}) needs num_classes >= 2, got {self.num_classes!r}")
            need(is_int(self.input_dim) and self.input_dim >= 0, f"input_dim must be an integer >= 0, got {self.input_dim!r}")
            need(self.pooling in ("mean", "cls"), f"pooling must be 'mean' or 'cls', got {self.pooling!r}")
        FFNS.check(self.ffn, "invalid model config: ffn")
        BLOCKS.check(self.block, "invalid model config: block")
        # every layer, not only each letter's first: a part may check its options against the depth
        seen = set()
        for layer_idx, letter in enumerate(self.pattern * (self.n_layers // len(self.pattern))):
            self._check_layer(letter, layer_idx, "" if letter not in seen else f" at layer {layer_idx}")
            seen.add(letter)

    def _check_layer(self, letter: str, layer_idx: int, at: str = "") -> None:
        where = f"invalid model config: layers[{letter!r}]{at}"
        raw = self.layers[letter]
        if not isinstance(raw, dict) or "mixer" not in raw:
            raise SpeedlmError(f"{where}: a layer spec is an object with a 'mixer' (and optional 'ffn', 'block'), got {raw!r}")
        unknown = sorted(set(raw) - set(LAYER_KEYS))
        if unknown:
            raise SpeedlmError(f"{where}: unknown key(s) {unknown}; a layer spec has {list(LAYER_KEYS)}")
        spec, dims = self.layer_spec(letter), self.dims(layer_idx)
        mixer = MIXERS.check(spec["mixer"], f"{where}.mixer", dims)
        ffn = FFNS.check(spec["ffn"], f"{where}.ffn", dims)
        block = BLOCKS.check(spec["block"], f"{where}.block", dims)
        if self.reversible and not getattr(block.cls, "supports_reversible", False):
            raise SpeedlmError(
                f"{where}.block: reversible layers need blocks made of two residual branches (prenorm); "
                f"{block.name!r} is not one"
            )
        if self.reversible:  # parts whose forward cannot be recomputed faithfully
            for kind, entry, part in (("mixer", mixer, spec["mixer"]), ("ffn", ffn, spec["ffn"])):
                check = getattr(entry.cls, "reversible_problem", None)
                problem = check(**{k: v for k, v in part.items() if k != "name"}) if check else None
                if problem:
                    raise SpeedlmError(f"{where}.{kind}: {problem} (reversible=true recomputes the forward in backward)")
        if self.ffn_chunks > 1 and not getattr(ffn.cls, "position_wise", True):
            raise SpeedlmError(f"{where}.ffn: {ffn.name!r} is not position-wise (routing depends on the whole call); "
                               "ffn_chunks must be 1")
        if self.objective in BIDIRECTIONAL_OBJECTIVES and not mixer.cls.supports_bidirectional:
            raise SpeedlmError(
                f"{where}: mixer {mixer.name!r} is causal-only and cannot be used in an encoder or a diffusion LM "
                f"(objective={self.objective!r} is bidirectional)"
            )
        if self.objective == "ar" and not mixer.cls.supports_causal:
            raise SpeedlmError(
                f"{where}: mixer {mixer.name!r} is bidirectional-only and cannot be used in a causal (objective='ar') model"
            )
        if self.objective == "ar":  # parts whose options decide whether they can be causal
            for kind, entry, part in (("mixer", mixer, spec["mixer"]), ("ffn", ffn, spec["ffn"]), ("block", block, spec["block"])):
                check = getattr(entry.cls, "causal_problem", None)
                problem = check(**{k: v for k, v in part.items() if k != "name"}) if check else None
                if problem:
                    raise SpeedlmError(f"{where}.{kind}: {problem} (objective='ar' is causal)")
