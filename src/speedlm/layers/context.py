"""What travels with x through a forward pass: `SeqMeta` (positions, causal flag, token ids,
document boundaries) and `AuxLosses` (regularisers the modules add while they run)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from speedlm.cache.kv import token_positions


class AuxLosses:
    """Named auxiliary losses accumulated during one forward pass (MoE balance, router z-loss,
    adaptive-span penalty, ...). Modules call `add`; the model's `loss` returns them as named
    parts next to the language-model cross-entropy, and the trainer logs each part. Values are
    already weighted by their coefficients; the same name from several layers sums."""

    def __init__(self):
        self.parts: dict[str, torch.Tensor] = {}
        self._metrics: dict[str, list[torch.Tensor]] = {}

    def add(self, name: str, value: torch.Tensor) -> None:
        self.parts[name] = value if name not in self.parts else self.parts[name] + value

    def metric(self, name: str, value: torch.Tensor) -> None:
        """A number worth logging that is not a loss (e.g. MoD's router agreement): averaged
        over the layers that report it, never added to the total."""
        self._metrics.setdefault(name, []).append(value.detach())

    @property
    def metrics(self) -> dict[str, torch.Tensor]:
        return {name: torch.stack(vs).mean() for name, vs in self._metrics.items()}

    def total(self) -> torch.Tensor | float:
        return sum(self.parts.values()) if self.parts else 0.0


@dataclass(frozen=True)
class SeqMeta:
    """Sequence metadata for one forward call.

    start: index of x[:, 0] in the whole sequence (== tokens already in the cache); also the
        position of x[:, 0] when `positions` is None.
    causal: False only for bidirectional models (encoders, diffusion LMs); such calls take no cache,
        except a cache that serves bidirectional calls (a frozen prefix: diffusion's approximate
        cache) where the mixer supports it.
    token_ids: (B, T) ids, for mixers that look at tokens (e.g. separator detection).
    positions: (B, T) absolute positions per row (left-padded batches, packed documents whose
        positions restart); None means start + arange(T) for every row.
    doc_ids: (B, T) document index per token (packed training sequences): no token mixes with
        another document. Training-time only: calls with a cache refuse it.
    aux: where modules add auxiliary losses; None at inference.
    """

    start: int = 0
    causal: bool = True
    token_ids: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    doc_ids: torch.Tensor | None = None
    aux: AuxLosses | None = None

    def query_positions(self) -> int | torch.Tensor:
        """The positions of this call's tokens: an int start (contiguous, shared by every row)
        or a (B, T) long tensor."""
        return self.start if self.positions is None else self.positions

    def position_tensor(self, t: int, device) -> torch.Tensor:
        """The positions of this call's T tokens as a (B|1, T) long tensor: `positions`, or
        start + arange(T) shared by every row."""
        return token_positions(self.query_positions(), t, device)
