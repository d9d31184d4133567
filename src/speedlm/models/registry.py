"""Registry of token mixers by name. Configs refer to mixers by these names, never by class.

Registering a mixer is all it takes for the contract suite, `speedlm list` and
`speedlm bench` to cover it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

from speedlm.errors import SpeedlmError
from speedlm.layers.attention import Attention
from speedlm.layers.dims import ModelDims
from speedlm.layers.linear_attention import LinearAttention
from speedlm.layers.mixer import Mixer
from speedlm.layers.sparse_attention import SlidingWindowAttention


@dataclass(frozen=True)
class MixerEntry:
    name: str
    cls: type[Mixer]
    family: str
    description: str
    paper: str
    # small options that make the contract suite exercise the mechanism at T ~ 20..80
    # (e.g. a window shorter than the test sequence)
    contract_spec: dict = field(default_factory=dict)

    def options(self) -> list[str]:
        params = list(inspect.signature(self.cls.__init__).parameters.values())[2:]  # drop self, dims
        return [p.name for p in params]


MIXERS: dict[str, MixerEntry] = {}


def register_mixer(name: str, cls: type[Mixer], *, family: str, description: str, paper: str, contract_spec=None):
    if name in MIXERS:
        raise ValueError(f"mixer {name!r} is already registered")
    MIXERS[name] = MixerEntry(name, cls, family, description, paper, dict(contract_spec or {}))
    return cls


def check_mixer_spec(spec: dict, where: str) -> MixerEntry:
    """Validate {"name": registered, **options} without building anything."""
    if not isinstance(spec, dict) or "name" not in spec:
        raise SpeedlmError(f"{where}: a mixer spec is a dict with a 'name' key, got {spec!r}")
    entry = MIXERS.get(spec["name"])
    if entry is None:
        raise SpeedlmError(f"{where}: unknown mixer {spec['name']!r}; registered: {', '.join(sorted(MIXERS))}")
    unknown = set(spec) - {"name"} - set(entry.options())
    if unknown:
        raise SpeedlmError(
            f"{where}: mixer {entry.name!r} has no option(s) {sorted(unknown)}; it takes {entry.options()}"
        )
    return entry


def build_mixer(spec: dict, dims: ModelDims) -> Mixer:
    entry = check_mixer_spec(spec, "mixer")
    return entry.cls(dims, **{k: v for k, v in spec.items() if k != "name"})


register_mixer(
    "attention",
    Attention,
    family="efficient full attention",
    description="causal softmax attention on SDPA (FlashAttention kernels on GPU); kv_heads gives GQA / MQA",
    paper="Vaswani et al. 2017 (arXiv:1706.03762); GQA: Ainslie et al. 2023 (arXiv:2305.13245); "
    "MQA: Shazeer 2019 (arXiv:1911.02150)",
    contract_spec={"kv_heads": 2},
)
register_mixer(
    "sliding_window",
    SlidingWindowAttention,
    family="static sparse attention",
    description="causal sliding-window attention on FlexAttention block masks, O(window) KV cache",
    paper="Beltagy et al. 2020, Longformer (arXiv:2004.05150); Jiang et al. 2023, Mistral 7B (arXiv:2310.06825)",
    contract_spec={"window": 7, "kv_heads": 2},
)
register_mixer(
    "linear_attention",
    LinearAttention,
    family="linear attention",
    description="causal linear attention with elu+1 features, chunked parallel form, matrix-state cache",
    paper="Katharopoulos et al. 2020, Transformers are RNNs (arXiv:2006.16236)",
    contract_spec={"chunk_size": 16},
)
