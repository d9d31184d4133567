"""The student: a teacher whose chosen attention layers are replaced by other mixers.

`student_config` is the teacher's config with those layers' mixers swapped (each replaced layer
keeps its FFN and block kind; the new mixer's left-out options come from the attention it
replaces, distill/shapes.py). `build_student` copies everything the two models share
(embeddings, final norm, head, kept layers whole, replaced layers' norms and FFNs) and starts
each new mixer from the teacher's attention where a mapping exists (init_from_attention.py),
from its own init otherwise, and says which in its report.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field

from speedlm.distill.init_from_attention import NoMapping, mapping_for
from speedlm.distill.shapes import student_mixer_spec
from speedlm.errors import SpeedlmError
from speedlm.layers.attention import AttentionBase
from speedlm.layers.mixer import Mixer
from speedlm.models.config import ModelConfig
from speedlm.registry import MIXERS, MODELS


@dataclass
class ReplacedLayer:
    """What happened to one replaced layer: `init` is "from attention" or "own init"."""

    layer: int
    mixer: dict
    init: str
    copied: list[str] = field(default_factory=list)  # the new mixer's weights taken from the attention
    reason: str | None = None  # why a layer with a mapping still starts from its own init
    block_copied: list[str] = field(default_factory=list)  # the layer's norms, FFN, ...: exact copies

    def __str__(self) -> str:
        head = f"layer {self.layer}: {self.mixer['name']}, {self.init}"
        if self.reason:
            head += f" ({self.reason})"
        block = f"  copied as they are: {', '.join(self.block_copied)}" if self.block_copied else "  nothing else copied"
        return "\n".join([head] + [f"  {c}" for c in self.copied] + [block])


def _compact(per_layer: str) -> str:
    """The shortest pattern that tiles into per_layer ("ABAB" -> "AB")."""
    n = len(per_layer)
    for p in range(1, n + 1):
        if n % p == 0 and per_layer[:p] * (n // p) == per_layer:
            return per_layer[:p]
    return per_layer


def student_config(teacher_config: ModelConfig, replace: dict[int, dict],
                   grafted: dict[int, dict] | None = None) -> ModelConfig:
    """The teacher's config with the mixers of the layers in `replace` ({layer: mixer spec})
    swapped (only softmax-attention layers can be replaced), and the layers in `grafted`
    ({layer: a donor's full layer spec}) taken whole."""
    grafted = grafted or {}
    both = sorted(set(replace) & set(grafted))
    if both:
        raise SpeedlmError(f"layer {both[0]} is both replaced and grafted; name each layer once")
    cfg = teacher_config
    letters = cfg.pattern * (cfg.n_layers // len(cfg.pattern))
    layers = {k: dict(v) for k, v in cfg.layers.items()}
    free = iter(c for c in string.ascii_uppercase + string.ascii_lowercase if c not in layers)
    letter_of: dict[str, str] = {}  # one new letter per distinct (teacher letter, new mixer) layer spec
    per_layer = list(letters)
    for i, new in sorted(replace.items()):
        if not 0 <= i < cfg.n_layers:
            raise SpeedlmError(f"layer {i} is out of range; the teacher has {cfg.n_layers} layers (0-{cfg.n_layers - 1})")
        teacher_mixer = cfg.layer_spec(letters[i])["mixer"]
        if not issubclass(MIXERS[teacher_mixer["name"]].cls, AttentionBase):
            raise SpeedlmError(f"layer {i} of the teacher is {teacher_mixer['name']!r}, not softmax attention; "
                               "only attention layers are replaced")
        mixer = student_mixer_spec(teacher_mixer, new, cfg.dims(i))
        MIXERS.check(mixer, f"replacing layer {i}", cfg.dims(i))  # options against the model's sizes, named by layer
        key = repr((letters[i], sorted(mixer.items())))
        if key not in letter_of:
            letter = next(free, None)
            if letter is None:
                raise SpeedlmError("too many distinct layer specs for a pattern's 52 letters")
            letter_of[key] = letter
            layers[letter] = {**cfg.layers[letters[i]], "mixer": mixer}
        per_layer[i] = letter_of[key]
    for i, spec in sorted(grafted.items()):
        if not 0 <= i < cfg.n_layers:
            raise SpeedlmError(f"layer {i} is out of range; the teacher has {cfg.n_layers} layers (0-{cfg.n_layers - 1})")
        key = repr(("graft", sorted((k, sorted(v.items())) for k, v in spec.items())))
        if key not in letter_of:
            letter = next(free, None)
            if letter is None:
                raise SpeedlmError("too many distinct layer specs for a pattern's 52 letters")
            letter_of[key] = letter
            layers[letter] = {k: dict(v) for k, v in spec.items()}
        per_layer[i] = letter_of[key]
    pattern = _compact("".join(per_layer))
    used = {k: v for k, v in layers.items() if k in pattern}
    out = ModelConfig.from_dict({**cfg.to_dict(), "pattern": pattern, "layers": used})
    out.validate()
    return out


def _mixer_path(block) -> str:
    """The name of a block's mixer inside it ("mixer"; "inner.mixer" for a routed block)."""
    paths = [name for name, m in block.named_modules() if isinstance(m, Mixer)]
    top = [p for p in paths if not any(p.startswith(q + ".") for q in paths if q != p)]
    assert len(top) == 1, f"a block holds one mixer, found {top}"
    return top[0]


def build_student(teacher_model, replace: dict[int, dict], strict: bool = False, grafts=(), donors=None):
    """(student model, [ReplacedLayer per replaced or grafted layer]). The student is built on the
    teacher's device and dtype, in its training mode; everything but the new mixers is an exact
    copy, grafted layers (distill/graft.py: `grafts`, their loaded `donors`) the donors' blocks.
    `strict`: a mapping that does not fit raises instead of leaving the mixer at its own init."""
    grafted = {g.layer: donors[g.donor].model.config.layer_specs()[g.source] for g in grafts}
    cfg = student_config(teacher_model.config, replace, grafted)
    ref = next(teacher_model.parameters())
    student = MODELS[cfg.objective].cls(cfg).to(device=ref.device, dtype=ref.dtype)
    student.train(teacher_model.training)  # routed blocks (MoD) route differently in training
    new_mixers = {i: f"blocks.{i}.{_mixer_path(student.blocks[i])}." for i in replace}
    whole = tuple(f"blocks.{g.layer}." for g in grafts)
    teacher_state = teacher_model.state_dict()
    shared = {k: v for k, v in teacher_state.items()
              if not any(k.startswith(p) for p in new_mixers.values()) and not k.startswith(whole)}
    missing, unexpected = student.load_state_dict(shared, strict=False)
    left = [k for k in missing if not any(k.startswith(p) for p in new_mixers.values()) and not k.startswith(whole)]
    assert not left and not unexpected, (left, unexpected)
    report = [_graft_block(student, g, donors[g.donor]) for g in grafts]
    for i, prefix in new_mixers.items():
        block = [k[len(f"blocks.{i}."):] for k in shared if k.startswith(f"blocks.{i}.")]
        att = teacher_model.get_submodule(f"blocks.{i}.{_mixer_path(teacher_model.blocks[i])}")
        new = student.get_submodule(prefix[:-1])
        spec = cfg.layer_specs()[i]["mixer"]
        mapping = mapping_for(spec["name"])
        init, copied, reason = "own init", [], f"no mapping from attention to {spec['name']}"
        if mapping is not None:
            try:
                init, copied, reason = "from attention", mapping(att, new), None
            except NoMapping as e:
                if strict:
                    raise SpeedlmError(f"layer {i}: {e}") from None
                reason = str(e)
        report.append(ReplacedLayer(i, spec, init, copied, reason, block))
    return student, sorted(report, key=lambda r: r.layer)


def _graft_block(student, graft, donor) -> ReplacedLayer:
    """Donor block `graft.source`'s weights into the student's block `graft.layer`, exactly."""
    weights = donor.model.blocks[graft.source].state_dict()
    target = student.blocks[graft.layer]
    try:
        target.load_state_dict({k: v.to(dtype=next(target.parameters()).dtype) for k, v in weights.items()})
    except RuntimeError as e:
        raise SpeedlmError(f"--graft {graft.donor}: its layer {graft.source} does not fit layer {graft.layer}: "
                           f"{str(e).splitlines()[0]}") from None
    spec = student.config.layer_specs()[graft.layer]["mixer"]
    return ReplacedLayer(graft.layer, spec, f"grafted from {graft.donor} layer {graft.source}",
                         block_copied=sorted(weights))
