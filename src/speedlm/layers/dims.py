from dataclasses import dataclass


@dataclass(frozen=True)
class ModelDims:
    """Model-wide sizes every mixer receives; mixer-specific options come from its spec."""

    d_model: int
    n_heads: int
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads
