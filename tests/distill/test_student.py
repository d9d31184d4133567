"""The student of `speedlm distill`: which layers `--replace` names, the student's config, and
that every weight it claims to take from the teacher is the teacher's."""

from __future__ import annotations

import pytest
import torch

from speedlm.distill.init_from_attention import INIT_FROM_ATTENTION, mapping_for
from speedlm.distill.layers import parse_replace
from speedlm.distill.student import build_student, student_config
from speedlm.errors import SpeedlmError
from speedlm.models.build import build_model
from speedlm.models.config import ModelConfig

T = 19  # not a multiple of any chunk size


def teacher(kv_heads=2, seed=0, block="prenorm", tie_embeddings=False, **attention):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=61, d_model=32, n_layers=4, n_heads=4, tie_embeddings=tie_embeddings,
                      layers={"A": {"mixer": {"name": "attention", "kv_heads": kv_heads, **attention}, "block": block}})
    model = build_model(cfg).double().eval()
    with torch.no_grad():  # a trained-looking teacher: no weight at its init value (e.g. norms of 1)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def tokens(seed=1):
    return torch.randint(0, 61, (2, T), generator=torch.Generator().manual_seed(seed))


# ----- parse_replace -----
@pytest.mark.parametrize("spec, expected", [
    ("1,3,5=gated_deltanet", {i: {"name": "gated_deltanet"} for i in (1, 3, 5)}),
    ("odd=mamba2", {i: {"name": "mamba2"} for i in (1, 3, 5)}),
    ("even=gla", {i: {"name": "gla"} for i in (0, 2, 4)}),
    ("all=linear_attention", {i: {"name": "linear_attention"} for i in range(6)}),
    ("0-2=deltanet", {i: {"name": "deltanet"} for i in range(3)}),
    ("1,3=gla; 5=mamba2", {1: {"name": "gla"}, 3: {"name": "gla"}, 5: {"name": "mamba2"}}),
    ('5=sliding_window{"window": 64};0=sepllm{"window": 8, "initial": 2}',
     {0: {"name": "sepllm", "window": 8, "initial": 2}, 5: {"name": "sliding_window", "window": 64}}),
    # the full-pattern form: one entry per layer
    ("pattern=keep,gated_deltanet,keep,mamba2,keep,keep", {1: {"name": "gated_deltanet"}, 3: {"name": "mamba2"}}),
    ('pattern=sliding_window{"window": 8, "kv_heads": 1},keep,keep,keep,keep,gla',
     {0: {"name": "sliding_window", "window": 8, "kv_heads": 1}, 5: {"name": "gla"}}),
])
def test_parse_replace(spec, expected):
    assert parse_replace(spec, 6) == expected


@pytest.mark.parametrize("spec, says", [
    ("6=gla", "layer 6 is out of range; the teacher has 6 layers (0-5)"),
    ("1=nonesuch", "unknown mixer 'nonesuch'"),
    ("1=linformer", "mixer 'linformer' cannot be causal"),
    ("1,3=gla;3-4=mamba2", "layer 3 is named in both '1,3=gla' and '3-4=mamba2'"),
    ("1,1=gla", "layer 1 is named twice"),
    ("", "--replace is empty"),
    (" ; ", "--replace is empty"),
    ("x=gla", "'x' is not a layer index"),
    ("3-1=gla", "runs backwards"),
    ("gla", "expected LAYERS=MIXER"),
    ('1=sliding_window{"window": }', "not valid JSON"),
    ('1=sliding_window{"window": 0}', "option 'window' of mixer 'sliding_window' must be >= 1"),
    ("pattern=keep,gla", "pattern= names 2 layer(s); the teacher has 6"),
    ("pattern=keep,keep,keep,keep,keep,keep", "keeps every layer"),
    ("pattern=keep,gla,keep,keep,keep,linformer", "mixer 'linformer' cannot be causal"),
    ("pattern=keep,1=gla,keep,keep,keep,keep", "entry 1 '1=gla' is not keep or MIXER"),
])
def test_parse_replace_refuses_in_one_line(spec, says):
    with pytest.raises(SpeedlmError) as e:
        parse_replace(spec, 6)
    assert says in str(e.value) and "\n" not in str(e.value)


# ----- the student's config -----
def test_student_config_replaces_only_the_named_layers():
    t = teacher()
    cfg = student_config(t.config, parse_replace("odd=gated_deltanet", 4))
    specs, before = cfg.layer_specs(), t.config.layer_specs()
    assert cfg.pattern == "AB"  # compacted from the per-layer "ABAB"
    for i in (0, 2):
        assert specs[i] == before[i]
    for i in (1, 3):
        # the FFN and block kind are the teacher's; the widths fit the attention (shapes.py)
        assert specs[i] == {**before[i], "mixer": {"name": "gated_deltanet", "value_factor": 1}}
    assert {k: v for k, v in cfg.to_dict().items() if k not in ("pattern", "layers")} == \
        {k: v for k, v in t.config.to_dict().items() if k not in ("pattern", "layers")}


def test_softmax_replacements_inherit_the_teachers_projection_options_and_user_options_win():
    cfg = teacher(kv_heads=2, qk_norm=True).config
    specs = student_config(cfg, parse_replace('0=sliding_window{"window": 5};1=mamba2{"d_state": 4}', 4)).layer_specs()
    assert specs[0]["mixer"] == {"name": "sliding_window", "window": 5, "kv_heads": 2, "qk_norm": True}
    assert specs[1]["mixer"] == {"name": "mamba2", "d_state": 4, "n_groups": 4, "head_dim": 8, "expand": 1}


def test_options_that_do_not_fit_the_model_name_the_layer():
    with pytest.raises(SpeedlmError, match=r"replacing layer 1: mamba2: head_dim=5 must divide d_inner = 32"):
        student_config(teacher().config, parse_replace('1=mamba2{"head_dim": 5}', 4))


def test_only_attention_layers_are_replaced():
    cfg = ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, pattern="AM",
                      layers={"A": {"mixer": "attention"}, "M": {"mixer": "mamba", "ffn": "none"}})
    with pytest.raises(SpeedlmError, match="layer 1 of the teacher is 'mamba', not softmax attention"):
        student_config(cfg, {1: {"name": "gla"}})


# ----- the student's weights -----
def test_kept_layers_embeddings_norms_and_ffns_are_the_teachers():
    t = teacher()
    s, report = build_student(t, parse_replace("odd=gated_deltanet", 4))
    ts, ss = t.state_dict(), s.state_dict()
    new = [k for k in ss if k.startswith(("blocks.1.mixer.", "blocks.3.mixer."))]
    shared = [k for k in ss if k not in new]
    replaced_block = {"mixer_norm.weight", "ffn_norm.weight", "ffn.gate.weight", "ffn.up.weight", "ffn.down.weight"}
    assert {"embed.weight", "norm.weight", "lm_head.weight", "blocks.0.mixer.q_proj.weight"} <= set(shared)
    assert {f"blocks.1.{k}" for k in replaced_block} <= set(shared)
    for k in shared:
        assert torch.equal(ss[k], ts[k]), k
    assert [r.layer for r in report] == [1, 3]
    assert set(report[0].block_copied) == replaced_block


def _repeat_heads(w, heads, to):
    return w.view(heads, -1, w.shape[-1]).repeat_interleave(to // heads, dim=0).reshape(-1, w.shape[-1])


@pytest.mark.parametrize("name", ["linear_attention", "gla", "deltanet", "gated_deltanet"])
def test_heads_mixers_take_q_k_v_o(name):
    t = teacher(kv_heads=2)
    s, report = build_student(t, {2: {"name": name}}, strict=True)
    att, new = t.blocks[2].mixer, s.blocks[2].mixer
    assert report[0].init == "from attention"
    assert torch.equal(new.q_proj.weight, att.q_proj.weight)
    assert torch.equal(new.k_proj.weight, _repeat_heads(att.k_proj.weight, 2, 4))  # GQA kv heads onto 4 heads
    assert torch.equal(new.v_proj.weight, _repeat_heads(att.v_proj.weight, 2, 4))
    assert torch.equal(new.o_proj.weight, att.o_proj.weight)
    if hasattr(new, "conv"):  # the short conv passes the current token through
        assert torch.equal(new.conv.weight[:, -1], torch.ones_like(new.conv.weight[:, -1]))
        assert not new.conv.weight[:, :-1].any()


def test_mamba2_takes_c_b_x_out_from_q_k_v_o():
    t = teacher(kv_heads=2)
    s, report = build_student(t, {1: {"name": "mamba2"}}, strict=True)
    att, new = t.blocks[1].mixer, s.blocks[1].mixer
    e, gn = new.inner, new.n_groups * new.d_state
    z, x, b, c, dt = new.in_proj.weight.split([e, e, gn, gn, new.n_heads])
    assert torch.equal(c, att.q_proj.weight)
    assert torch.equal(b, _repeat_heads(att.k_proj.weight, 2, 4))
    assert torch.equal(x, _repeat_heads(att.v_proj.weight, 2, 4))
    assert torch.equal(new.out_proj.weight, att.o_proj.weight)
    assert report[0].init == "from attention" and any("C rows] <- q_proj" in c for c in report[0].copied)


@pytest.mark.parametrize("spec, block, tie", [
    ('{"window": 64}', "prenorm", False),
    ('{"window": 19}', "prenorm", True),
    ('{"window": 19}', "conformer", False),
    ('{"window": 64}', {"name": "mod", "capacity": 0.5}, False),  # the mixer inside a routed block
])
def test_a_window_as_long_as_the_sequence_is_the_teacher(spec, block, tie):
    """All stages skipped: where the replacement reduces to attention, the student is the teacher."""
    t = teacher(kv_heads=2, qk_norm=True, block=block, tie_embeddings=tie)
    s, report = build_student(t, parse_replace(f"1,2=sliding_window{spec}", 4), strict=True)
    assert [r.init for r in report] == ["from attention"] * 2
    ids = tokens()
    with torch.no_grad():  # the same weights through a masked kernel instead of a causal one: float64 rounding
        torch.testing.assert_close(s(ids), t(ids), rtol=1e-12, atol=1e-12)
    assert not s.training and (s.lm_head.weight is s.embed.weight) == tie


def test_sepllm_and_a_short_window_keep_the_weights_but_not_the_logits():
    t = teacher(kv_heads=2)
    s, report = build_student(t, parse_replace('1=sliding_window{"window": 18};2=sepllm{"window": 4, "initial": 1}', 4),
                              strict=True)
    for i in (1, 2):
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert torch.equal(getattr(s.blocks[i].mixer, p).weight, getattr(t.blocks[i].mixer, p).weight)
    with torch.no_grad():
        assert not torch.allclose(s(tokens()), t(tokens()))


@pytest.mark.parametrize("name", ["linear_attention", "gated_deltanet"])
def test_linear_students_differ_from_the_teacher_but_hold_its_projections(name):
    t = teacher(kv_heads=4)
    s, _ = build_student(t, {0: {"name": name}, 3: {"name": name}})
    for i in (0, 3):
        assert torch.equal(s.blocks[i].mixer.q_proj.weight, t.blocks[i].mixer.q_proj.weight)
        assert torch.equal(s.blocks[i].mixer.v_proj.weight, t.blocks[i].mixer.v_proj.weight)
    with torch.no_grad():
        out = s(tokens())
    assert torch.isfinite(out).all() and not torch.allclose(out, t(tokens()))


def test_a_width_that_cannot_map_falls_back_to_own_init_and_says_so():
    t = teacher()
    replace = parse_replace('1=gated_deltanet{"value_factor": 2};2=hyena', 4)
    s, report = build_student(t, replace)
    assert [(r.layer, r.init) for r in report] == [(1, "own init"), (2, "own init")]
    assert "key/value widths 8/16" in report[0].reason and "no mapping" in report[1].reason
    assert report[0].copied == [] and "layer 1: gated_deltanet, own init" in str(report[0])
    with pytest.raises(SpeedlmError, match="layer 1: GatedDeltaNet has key/value widths 8/16"):
        build_student(t, replace, strict=True)


def test_attention_options_without_a_counterpart_are_refused_by_the_linear_mappings():
    t = teacher(qkv_bias=True)
    _, report = build_student(t, {1: {"name": "gla"}, 2: {"name": "mamba2"}, 3: {"name": "sliding_window"}})
    assert [r.init for r in report] == ["own init", "own init", "from attention"]
    assert "qkv_bias has no counterpart" in report[0].reason


def test_every_named_mapping_is_a_registered_mixer():
    assert set(INIT_FROM_ATTENTION) == {"linear_attention", "gla", "deltanet", "gated_deltanet", "mamba2"}
    assert mapping_for("sepllm") is mapping_for("sliding_window") is mapping_for("logsparse") is not None
    assert mapping_for("hyena") is None
