"""The compare report's four plots are readable with a dozen models: one (colour, marker) per
model, the same style for a model in every plot, names on the plot (one label for models that
sit on the same point), titles inside the image, log axes that say so."""

from support.plots import PRESETS, check_readable, compare_report, saved_figures  # noqa: F401

from speedlm.compare.plots import PLOTS, write_plots


def test_every_compare_plot_is_readable_with_a_dozen_models(tmp_path, saved_figures):  # noqa: F811
    paths = write_plots(compare_report(), str(tmp_path))
    assert set(paths) == set(PLOTS) and all(tmp_path.joinpath(p).exists() for p in paths.values())
    assert len(saved_figures) == len(PLOTS)
    styles = {}
    for fig in saved_figures:
        check_readable(fig)
        for line in fig.axes[0].get_lines():
            if line.get_label() in PRESETS:
                assert styles.setdefault(line.get_label(), (line.get_color(), line.get_marker())) == \
                    (line.get_color(), line.get_marker()), f"{line.get_label()} changes style between plots"
    assert set(styles) == set(PRESETS)

    mqar = saved_figures[list(PLOTS).index("mqar_vs_state")].axes[0]
    names = [t.get_text() for t in mqar.texts]
    # two pairs of models at the same accuracy and state: each pair gets one label naming both
    assert "transformer-tiny\nadaptive-span-tiny" in names and "gqa-tiny\nmdlm-tiny" in names
    assert sum(n.count("-tiny") for n in names) == len(PRESETS)  # every model named once
    sizes = {line.get_label(): line.get_markersize() for line in mqar.get_lines()}
    assert sizes["transformer-tiny"] > sizes["adaptive-span-tiny"]  # the one drawn underneath shows round it

    cache = saved_figures[list(PLOTS).index("cache_bytes")].axes[0]
    sizes = {line.get_label(): line.get_markersize() for line in cache.get_lines()}
    assert sizes["sliding-window-tiny"] > sizes["sepllm-tiny"]  # the same state curve: both visible
