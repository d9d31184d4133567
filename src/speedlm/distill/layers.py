"""`--replace`: which layers of a teacher become which mixers.

    SPEC   := GROUP (';' GROUP)*  |  'pattern=' LAYER (',' LAYER)*
    LAYER  := 'keep' | MIXER [OPTIONS]     (the full student, one entry per teacher layer)
    GROUP  := LAYERS '=' MIXER [OPTIONS]
    LAYERS := 'all' | 'odd' | 'even' | ITEM (',' ITEM)*
    ITEM   := INDEX | INDEX '-' INDEX            (0-based; a range includes both ends)
    MIXER  := a registered mixer name (`speedlm list`)
    OPTIONS:= a JSON object of the mixer's options, written right after its name

    "1,3,5=gated_deltanet"     "odd=mamba2"     "0-3=gla"
    "1,3=gla;5=mamba2"         '5=sliding_window{"window": 64}'
    "pattern=keep,gated_deltanet,keep,mamba2"    (4 layers: 1 and 3 replaced)

Groups are separated by ';' because ',' already separates layers (and options' JSON may hold
both: the split ignores separators inside braces and strings). A layer named by two groups, or
twice in one, is an error rather than "the last one wins": a spec that says two things is a typo.
The student is a causal LM, so every mixer must be able to run causally.
"""

from __future__ import annotations

import json
import re

from speedlm.errors import SpeedlmError
from speedlm.registry import MIXERS

_GROUP = re.compile(r"^\s*(?P<layers>[^=]+?)\s*=\s*(?P<name>[A-Za-z_][A-Za-z0-9_]*)\s*(?P<options>\{.*\})?\s*$", re.S)
_RANGE = re.compile(r"^(\d+)-(\d+)$")


def _split_groups(spec: str, sep: str = ";") -> list[str]:
    """spec split on `sep` outside JSON braces and strings."""
    groups, depth, quoted, start = [], 0, False, 0
    for i, ch in enumerate(spec):
        if quoted:
            quoted = not (ch == '"' and spec[i - 1] != "\\")
        elif ch == '"':
            quoted = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        elif ch == sep and depth == 0:
            groups.append(spec[start:i])
            start = i + 1
    groups.append(spec[start:])
    return [g for g in (g.strip() for g in groups) if g]


def _layer_indices(text: str, n_layers: int, group: str) -> list[int]:
    named = {"all": range(n_layers), "odd": range(1, n_layers, 2), "even": range(0, n_layers, 2)}
    if text in named:
        return list(named[text])
    out = []
    for item in (s.strip() for s in text.split(",")):
        bounds = _RANGE.match(item)
        if bounds:
            lo, hi = int(bounds[1]), int(bounds[2])
            if lo > hi:
                raise SpeedlmError(f"--replace {group!r}: range {item} runs backwards; write {hi}-{lo}")
            out += range(lo, hi + 1)
        elif item.isdigit():
            out.append(int(item))
        else:
            raise SpeedlmError(f"--replace {group!r}: {item!r} is not a layer index, a range like 0-3, "
                               "or one of all, odd, even")
    bad = [i for i in out if i >= n_layers]
    if bad:
        raise SpeedlmError(f"--replace {group!r}: layer {bad[0]} is out of range; the teacher has {n_layers} layers "
                           f"(0-{n_layers - 1})")
    return out


def _mixer_spec(name: str, options: str | None, group: str) -> dict:
    spec = {"name": name}
    if options:
        try:
            parsed = json.loads(options)
        except json.JSONDecodeError as e:
            raise SpeedlmError(f"--replace {group!r}: the options after {name!r} are not valid JSON ({e.msg})") from None
        if not isinstance(parsed, dict) or "name" in parsed:
            raise SpeedlmError(f"--replace {group!r}: options are a JSON object of the mixer's options, without 'name'")
        spec.update(parsed)
    entry = MIXERS.check(spec, f"--replace {group!r}")  # registered name, option types and bounds
    if not entry.cls.supports_causal:
        raise SpeedlmError(f"--replace {group!r}: mixer {name!r} cannot be causal (it is bidirectional-only); "
                           "a distilled student is a causal LM")
    check = getattr(entry.cls, "causal_problem", None)
    problem = check(**{k: v for k, v in spec.items() if k != "name"}) if check else None
    if problem:
        raise SpeedlmError(f"--replace {group!r}: {problem} (a distilled student is a causal LM)")
    return spec


def parse_replace(spec: str, n_layers: int) -> dict[int, dict]:
    """{layer index: mixer spec} from a `--replace` value (the module doc), sorted by layer."""
    if (spec or "").strip().startswith("pattern="):
        return _parse_pattern(spec.strip()[len("pattern="):], n_layers)
    groups = _split_groups(spec or "")
    if not groups:
        raise SpeedlmError("--replace is empty; give LAYERS=MIXER, e.g. odd=gated_deltanet or 1,3=gla;5=mamba2")
    out: dict[int, dict] = {}
    owner: dict[int, str] = {}
    for group in groups:
        m = _GROUP.match(group)
        if not m:
            raise SpeedlmError(f"--replace {group!r}: expected LAYERS=MIXER[{{options}}], e.g. 1,3=gla or "
                               '5=sliding_window{"window": 64}')
        mixer = _mixer_spec(m["name"], m["options"], group)
        for i in _layer_indices(m["layers"].strip(), n_layers, group):
            if i in owner:
                where = "twice in" if owner[i] == group else f"in both {owner[i]!r} and"
                raise SpeedlmError(f"--replace: layer {i} is named {where} {group!r}; name each layer once")
            owner[i], out[i] = group, dict(mixer)
    return dict(sorted(out.items()))


_ENTRY = re.compile(r"^\s*(?P<name>[A-Za-z_][A-Za-z0-9_]*)\s*(?P<options>\{.*\})?\s*$", re.S)
KEEP = "keep"


def _parse_pattern(text: str, n_layers: int) -> dict[int, dict]:
    """The full-pattern form: one entry per teacher layer, `keep` or a mixer with its options."""
    entries = _split_groups(text, ",")
    if len(entries) != n_layers:
        raise SpeedlmError(f"--replace pattern= names {len(entries)} layer(s); the teacher has {n_layers} "
                           f"(one entry each: {KEEP} or a mixer)")
    out = {}
    for i, entry in enumerate(entries):
        m = _ENTRY.match(entry)
        if not m:
            raise SpeedlmError(f"--replace pattern=: entry {i} {entry!r} is not {KEEP} or MIXER[{{options}}]")
        if m["name"] == KEEP and not m["options"]:
            continue
        out[i] = _mixer_spec(m["name"], m["options"], f"pattern entry {i}: {entry}")
    if not out:
        raise SpeedlmError("--replace pattern= keeps every layer; name at least one mixer")
    return out
