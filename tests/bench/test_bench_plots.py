"""Every multi-model plot of the benchmarks is readable with a dozen models: one (colour, marker)
per model, a hue per family, titles and names inside the image, log axes that say so."""

import colorsys

import pytest
from matplotlib.colors import to_rgb
from support.plots import PRESETS, check_readable, recall_rows, saved_figures, speed_rows  # noqa: F401

from speedlm.bench.diffusion import _plot as plot_diffusion
from speedlm.bench.plots import write_plots
from speedlm.bench.recall import plot_recall
from speedlm.bench.styles import HUES, MARKERS, model_family, series_styles, styles_for


def _hue(colour: str) -> float:
    return colorsys.rgb_to_hsv(*to_rgb(colour))[0]


def test_every_model_gets_its_own_colour_and_marker_and_each_family_one_hue():
    styles = styles_for({p: p for p in PRESETS})
    pairs = [(s.colour, s.marker) for s in styles.values()]
    assert len(set(pairs)) == len(PRESETS) == len(styles)
    families = {p: model_family(p) for p in PRESETS}
    assert families["gqa-tiny"] == families["mdlm-tiny"] == "efficient full attention"
    hue = {f: [_hue(styles[p].colour) for p in PRESETS if families[p] == f] for f in set(families.values())}
    assert all(max(h) - min(h) < 0.02 for h in hue.values()), hue  # shades of one hue within a family
    assert len({round(h[0], 1) for h in hue.values()}) == len(hue)  # a different hue per family
    assert list(styles)[:5] == ["transformer-tiny", "gqa-tiny", "mixtral-tiny", "mod-tiny", "mdlm-tiny"]  # grouped


def test_styles_stay_distinct_past_the_palette():
    names = [f"m{i}" for i in range(40)]
    families = [f"family {i % 12}" for i in range(40)]  # more families than hues, families of 3-4
    styles = series_styles(names, families)
    assert len({(s.colour, s.marker) for s in styles.values()}) == 40
    assert len(HUES) < 12 and len(MARKERS) >= 4
    with pytest.raises(ValueError):
        series_styles(["a", "b"], ["x"])


def test_family_of_a_config_dict_is_its_first_mixers():
    from speedlm.models import resolve_config

    assert model_family(resolve_config("hgrn-tiny").to_dict()) == "linear RNN"
    assert model_family("samba-tiny") == "state space"  # Mamba first, then a sliding window


def test_speed_plots_are_readable_with_a_dozen_presets(tmp_path, saved_figures):  # noqa: F811
    paths = write_plots(speed_rows(), PRESETS, str(tmp_path), "cpu float32 batch 1 " * 8)  # a long subtitle wraps
    assert len(saved_figures) == 2 and all((tmp_path / p).exists() for p in paths.values())
    for fig in saved_figures:
        check_readable(fig)


def test_recall_plot_is_readable_and_names_coinciding_points(tmp_path, saved_figures):  # noqa: F811
    plot_recall(recall_rows(), str(tmp_path / "recall.png"))
    (fig,) = saved_figures
    check_readable(fig)
    names = [t.get_text() for t in fig.axes[0].texts]
    # transformer and adaptive span recall everything with the same state: one label names both
    assert "transformer-tiny\nadaptive-span-tiny" in names
    assert "no finished setting" in [t.get_text() for t in fig.axes[2].texts]  # 16 pairs: only a failed row


def test_diffusion_plot_keeps_its_labels_inside(tmp_path, saved_figures):  # noqa: F811
    rows = [{"model": "diffusion", "steps": s, "tokens_per_s": 1000 / s, "judge_ppl": 20 + s} for s in (8, 16, 32, 64)]
    rows.append({"model": "autoregressive", "steps": 64, "tokens_per_s": 300, "judge_ppl": 18})
    plot_diffusion(rows, str(tmp_path / "d.png"), "masked diffusion: quality against speed")
    check_readable(saved_figures[0], min_series=2)
