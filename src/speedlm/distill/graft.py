"""`--graft`: a student assembled from whole layers of several checkpoints (StripedHyena's recipe:
attention layers from one model, Hyena or Mamba layers from another, then trained on).

    SPEC  := GROUP (';' GROUP)*
    GROUP := LAYERS '=' CHECKPOINT ['@' SOURCE_LAYERS]

    "1,3,5=runs/hyena"            layers 1, 3, 5 of the student are runs/hyena's layers 1, 3, 5
    "1,3=runs/mamba@0,1;5=runs/gla@5"

LAYERS are the student's (as in --replace: indices, ranges, all, odd, even); SOURCE_LAYERS the
donor's, as many (default: the same indices). A grafted layer is the donor's whole block (mixer,
FFN, norms, as its config says) with its weights; everything else comes from the teacher
(`--teacher`: embeddings, head, final norm, the other layers), and `--replace` may swap more of
the teacher's attention layers. Grafted layers then train like replaced ones (stage 1 matches
the teacher's layer output, stage 2 distils).

A block only computes what it learned inside a model of the same shape, so a donor must agree
with the teacher on everything a block reads from its model (ModelConfig.dims): the width
d_model, n_heads, the FFN width, norm_eps, the positional scheme (RoPE's theta, separators), and
on the tokenizer (the residual stream's token ids mean the same thing) and vocabulary. A donor
that differs is refused in one line naming the field, before anything is written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from speedlm.distill.layers import _layer_indices, _split_groups
from speedlm.errors import SpeedlmError

_GROUP = re.compile(r"^\s*(?P<layers>[^=]+?)\s*=\s*(?P<path>[^@]+?)\s*(@\s*(?P<source>.+?))?\s*$")
# what a block reads from its model's config (ModelConfig.dims): donor and teacher must agree
BLOCK_FIELDS = ("d_model", "n_heads", "ffn_hidden", "norm_eps", "rope_theta", "separators", "ffn_chunks",
                "vocab_size", "objective")


@dataclass(frozen=True)
class Graft:
    layer: int  # the student's
    donor: str  # checkpoint path as given
    source: int  # the donor's layer


def parse_graft(spec: str, n_layers: int) -> list[Graft]:
    """The grafts of a `--graft` value, by student layer (the module doc); checkpoints unread."""
    groups = _split_groups(spec or "")
    if not groups:
        raise SpeedlmError("--graft is empty; give LAYERS=CHECKPOINT[@SOURCE_LAYERS], e.g. 1,3=runs/hyena")
    out: dict[int, Graft] = {}
    for group in groups:
        m = _GROUP.match(group)
        if not m:
            raise SpeedlmError(f"--graft {group!r}: expected LAYERS=CHECKPOINT[@SOURCE_LAYERS], e.g. 1,3=runs/hyena@0,1")
        layers = _layer_indices(m["layers"].strip(), n_layers, group)
        sources = layers if m["source"] is None else _layer_indices(m["source"].strip(), 10**9, group)
        if len(sources) != len(layers):
            raise SpeedlmError(f"--graft {group!r}: {len(layers)} student layer(s) but {len(sources)} source layer(s)")
        for i, j in zip(layers, sources):
            if i in out:
                raise SpeedlmError(f"--graft: layer {i} is grafted twice; name each layer once")
            out[i] = Graft(i, m["path"], j)
    return [out[i] for i in sorted(out)]


def _field(cfg, name):
    v = getattr(cfg, name)
    return tuple(v) if isinstance(v, list) else v


def load_donors(grafts: list[Graft], teacher_config, teacher_tokenizer) -> dict[str, object]:
    """{path: loaded checkpoint} of every donor, each checked against the teacher (module doc)."""
    from speedlm.checkpoint import load_pretrained

    donors = {}
    for g in grafts:
        if g.donor in donors:
            continue
        try:
            p = load_pretrained(g.donor)
        except SpeedlmError as e:
            raise SpeedlmError(f"--graft {g.donor}: {e}") from None
        for name in BLOCK_FIELDS:
            mine, theirs = _field(p.model.config, name), _field(teacher_config, name)
            if mine != theirs:
                raise SpeedlmError(f"--graft {g.donor}: its {name} is {mine!r}, the teacher's {theirs!r}; layers graft "
                                   "only between models of the same shape, positions and vocabulary")
        if p.tokenizer is None or p.tokenizer.spec() != teacher_tokenizer.spec():
            theirs = None if p.tokenizer is None else p.tokenizer.spec().get("kind")
            raise SpeedlmError(f"--graft {g.donor}: its tokenizer ({theirs}) is not the teacher's "
                               f"({teacher_tokenizer.spec().get('kind')}); grafted layers must read the same token ids")
        donors[g.donor] = p
    for g in grafts:
        n = donors[g.donor].model.config.n_layers
        if g.source >= n:
            raise SpeedlmError(f"--graft {g.donor}: layer {g.source} is out of range; it has {n} layers (0-{n - 1})")
    return donors
