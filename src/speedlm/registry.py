"""Registries of model parts by name: mixers, FFNs and block kinds.

Configs refer to parts by these names, never by class. A part's options are the keyword
parameters of its constructor after the fixed ones (`dims`, and for blocks the `mixer` and
`ffn` specs); their annotations are the option types, checked before anything is built, so a
bad value is one clear line (`option 'window' must be int, got 'abc'`), not a TypeError deep
in a constructor. Bounds ride on the annotation (`window: Annotated[int, Range(min=1)]`), and
checks that relate options to the model's sizes (kv_heads divides n_heads) live in the part's
`check_options(dims, **options)` classmethod. All of it runs when a config is made, without
building anything.

Model classes are registered the same way, by objective (`MODELS`).

The built-in parts are registered in `speedlm.models.registry`; lookups import it first, so
`MIXERS["attention"]` works whatever was imported before.
"""

from __future__ import annotations

import importlib
import inspect
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field

from speedlm.errors import SpeedlmError

_BUILTINS = "speedlm.models.registry"


@dataclass(frozen=True)
class Range:
    """Bounds of a numeric option, carried by its annotation: `Annotated[int, Range(min=1)]`."""

    min: float | None = None
    max: float | None = None

    def problem(self, value) -> str | None:
        if self.min is not None and value < self.min:
            return f"must be >= {self.min}"
        if self.max is not None and value > self.max:
            return f"must be <= {self.max}"
        return None


def _split_annotated(hint) -> tuple[object, list]:
    if typing.get_origin(hint) is typing.Annotated:
        base, *extras = typing.get_args(hint)
        return base, extras
    return hint, []


@dataclass(frozen=True)
class Entry:
    """One registered part: its class, where it comes from, and what the contract suite feeds it."""

    name: str
    cls: type
    kind: str
    family: str
    description: str
    paper: str
    # small options that make the contract suite exercise the mechanism at T ~ 20..80
    # (e.g. a window shorter than the test sequence)
    contract_spec: dict = field(default_factory=dict)
    fixed: tuple[str, ...] = ("dims",)

    def option_hints(self) -> dict[str, object]:
        """{option name: type hint (or None when unannotated), Annotated kept} in signature order."""
        params = list(inspect.signature(self.cls.__init__).parameters.values())[1:]  # drop self
        try:
            hints = typing.get_type_hints(self.cls.__init__, include_extras=True)
        except Exception:  # noqa: BLE001 - an unresolvable annotation just goes unchecked
            hints = {}
        return {
            p.name: hints.get(p.name)
            for p in params
            if p.name not in self.fixed and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        }

    def options(self) -> list[str]:
        return list(self.option_hints())


def _type_name(hint) -> str:
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return " or ".join(repr(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if origin in (list, tuple):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))


def matches(value, hint) -> bool:
    """Does a JSON-like value fit a type hint? (int, float, bool, str, None, unions, Literal,
    list/tuple of those; anything else is accepted unchecked.)"""
    if hint is None or hint is typing.Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, a) for a in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin in (list, tuple):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        if not isinstance(value, (list, tuple)):
            return False
        return all(matches(v, args[0]) for v in value) if args else True
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


class Registry(Mapping):
    """name -> Entry for one kind of part; a read-only mapping plus `register`, `check`, `build`."""

    def __init__(self, kind: str, fixed: tuple[str, ...] = ("dims",)):
        self.kind = kind
        self.fixed = fixed
        self._entries: dict[str, Entry] = {}

    # ----- the mapping (built-ins are loaded on first read) -----
    def _loaded(self) -> dict[str, Entry]:
        _load_builtins()
        return self._entries

    def __getitem__(self, name: str) -> Entry:
        return self._loaded()[name]

    def __iter__(self):
        return iter(self._loaded())

    def __len__(self) -> int:
        return len(self._loaded())

    # ----- registration -----
    def register(self, name: str, cls: type, *, family: str, description: str, paper: str, contract_spec=None) -> type:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = Entry(name, cls, self.kind, family, description, paper, dict(contract_spec or {}), self.fixed)
        return cls

    def unregister(self, name: str) -> None:
        """For tests that register a part temporarily."""
        self._entries.pop(name, None)

    # ----- specs -----
    def check(self, spec, where: str, dims=None) -> Entry:
        """Validate {"name": registered, **options} without building: names, option types and
        bounds, and (given the model's `dims`) the part's own `check_options`."""
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise SpeedlmError(f"{where}: a {self.kind} spec is an object with a 'name', got {spec!r}")
        entry = self._loaded().get(spec["name"])
        if entry is None:
            raise SpeedlmError(f"{where}: unknown {self.kind} {spec['name']!r}; registered: {', '.join(sorted(self))}")
        hints = entry.option_hints()
        unknown = sorted(set(spec) - {"name"} - set(hints))
        if unknown:
            raise SpeedlmError(f"{where}: {self.kind} {entry.name!r} has no option(s) {unknown}; it takes {list(hints)}")
        options = {k: v for k, v in spec.items() if k != "name"}
        for key, value in options.items():
            hint, extras = _split_annotated(hints[key])
            if not matches(value, hint):
                raise SpeedlmError(
                    f"{where}: option {key!r} of {self.kind} {entry.name!r} must be {_type_name(hint)}, got {value!r}"
                )
            for bound in extras:
                problem = bound.problem(value) if isinstance(bound, Range) and value is not None else None
                if problem:
                    raise SpeedlmError(f"{where}: option {key!r} of {self.kind} {entry.name!r} {problem}, got {value!r}")
        if dims is not None and hasattr(entry.cls, "check_options"):
            try:
                entry.cls.check_options(dims, **options)
            except SpeedlmError as e:
                raise SpeedlmError(f"{where}: {e}") from None
        return entry

    def build(self, spec: dict, dims, where: str | None = None, **fixed):
        entry = self.check(spec, where or self.kind, dims)
        return entry.cls(dims, **fixed, **{k: v for k, v in spec.items() if k != "name"})


MIXERS = Registry("mixer")
FFNS = Registry("ffn")
BLOCKS = Registry("block", fixed=("dims", "mixer", "ffn"))
# model classes by the config's `objective` ("ar": CausalLM; a diffusion LM or an encoder later):
# the one list that config validation, `build_model` and checkpoint loading all read
MODELS = Registry("model", fixed=("config",))

_loading = False


def _load_builtins() -> None:
    global _loading
    if not _loading:
        _loading = True  # set first: the built-ins module registers while it is imported
        importlib.import_module(_BUILTINS)
