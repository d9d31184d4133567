"""What every config (`ModelConfig`, `TrainConfig`) shares: dataclass fields, JSON round-trip,
unknown-field errors and one-line validation messages."""

from __future__ import annotations

import dataclasses
import json
from typing import ClassVar

from speedlm.errors import SpeedlmError


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class Schema:
    """Mixin for a validated, serialisable `@dataclass`. Subclasses name themselves in
    `what` (used in every message) and implement `validate` with `self.need`."""

    what: ClassVar[str] = "config"

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        raise NotImplementedError

    def need(self, cond, msg: str) -> None:
        if not cond:
            raise SpeedlmError(f"invalid {self.what}: {msg}")

    def need_ints(self, names, minimum: int) -> None:
        for name in names:
            v = getattr(self, name)
            kind = "a positive" if minimum == 1 else "a non-negative" if minimum == 0 else f"an >= {minimum}"
            self.need(is_int(v) and v >= minimum, f"{name} must be {kind} integer, got {v!r}")

    # ----- serialisation -----
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        if not isinstance(d, dict):
            raise SpeedlmError(f"invalid {cls.what}: expected a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SpeedlmError(f"invalid {cls.what}: unknown field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def parse_json(cls, text: str):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise SpeedlmError(f"invalid {cls.what}: not valid JSON ({e.msg} at line {e.lineno})") from None

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(cls.parse_json(text))
