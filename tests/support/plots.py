"""Fake inputs for the plotting functions (a dozen models, some on top of each other) and the
checks every multi-model plot must pass: a distinct (colour, marker) per model, titles inside
the image, linear count axes from zero, log axes that say so, no offset notation."""

from __future__ import annotations

import pytest

# 13 presets of 6 families: five of "efficient full attention" share a hue; three pairs coincide
# in some plot (transformer/adaptive-span and gqa/mdlm at one MQAR point, sliding-window and
# sepllm with one state curve)
PRESETS = [
    "transformer-tiny", "gqa-tiny", "sliding-window-tiny", "linear-attention-tiny", "linear-hybrid-tiny", "hgrn-tiny",
    "mamba2-tiny", "samba-tiny", "mixtral-tiny", "mod-tiny", "adaptive-span-tiny", "mdlm-tiny", "sepllm-tiny",
]
CONTEXTS = (256, 1024, 4096, 16384)


def _state(i: int, n: int, p: str) -> int:
    if p in ("sliding-window-tiny", "sepllm-tiny"):
        return 31744
    return 65536 * n // 1024 if i % 3 == 0 else 2048 * (i + 1)


def compare_report() -> dict:
    """The fields of a compare report that write_plots reads."""
    models = []
    for i, p in enumerate(PRESETS):
        mqar = (1.0, 65536) if p in ("transformer-tiny", "adaptive-span-tiny") else \
            (0.997, 18432) if p in ("gqa-tiny", "mdlm-tiny") else (0.25 + 0.01 * i, 1024 * (i + 1))
        models.append({
            "name": p, "status": "ok", "config": p,  # write_plots reads the family from the config
            "curve": [{"train_flops": 1e11 * k, "val_loss": 3.0 - 0.1 * k - 0.01 * i} for k in range(1, 6)],
            "decode_ms": {str(n): 0.5 + 0.01 * i + n / 1e5 for n in CONTEXTS},
            "state_bytes": {str(n): _state(i, n, p) for n in CONTEXTS},
            "mqar_accuracy": mqar[0], "mqar_state_bytes": mqar[1],
        })
    models.append({"name": "broken.json", "status": "failed", "reason": "config: no such file"})
    return {"meta": {"options": {"budget": 5e11, "mqar": {"vocab_size": 32}}}, "models": models}


def speed_rows() -> list[dict]:
    """Rows of `speedlm bench speed` results."""
    rows = []
    for i, p in enumerate(PRESETS):
        for n in CONTEXTS:
            metric = {"status": "ok", "ms": 0.1 * (i + 1) * n / 256, "peak_bytes": 2**20 * (i + 1) + 100 * n}
            rows.append({"preset": p, "length": n, "state_bytes": _state(i, n, p),
                         "metrics": {"fwd": dict(metric), "fwd_bwd": dict(metric), "decode": dict(metric)}})
    return rows


def recall_rows() -> list[dict]:
    """Rows of `speedlm bench recall` results: two pair counts, two widths; transformer and
    adaptive span recall everything with the same state."""
    rows = []
    for i, p in enumerate(PRESETS):
        for pairs in (4, 8):
            for w in (64, 128):
                full = p in ("transformer-tiny", "adaptive-span-tiny")
                rows.append({"preset": p, "width": w, "seq_len": 64, "pairs": pairs, "status": "ok",
                             "accuracy": 1.0 if full else 0.2 + 0.05 * i, "state_bytes": (65536 if full else 1024 * (i + 1)) * w // 64,
                             "params": 1000})
    rows.append({"preset": PRESETS[0], "width": 64, "seq_len": 64, "pairs": 16, "status": "failed", "reason": "oom"})
    return rows


@pytest.fixture
def saved_figures(monkeypatch):
    """Every Figure saved while the test runs (the file is still written)."""
    from matplotlib.figure import Figure

    saved = []
    original = Figure.savefig

    def savefig(self, *args, **kwargs):
        saved.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return saved


COUNT_UNITS = ("bytes", "MiB", "tokens", "slots", "FLOPs", "count")


def check_readable(fig, min_series: int = 12) -> None:
    """The checks of a figure with one series per model."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    inside = fig.bbox
    titles = [fig._suptitle] if fig._suptitle else []
    for ax in fig.axes:
        titles.append(ax.title)
        styles: dict[str, set] = {}
        for line in ax.get_lines():
            if not line.get_label().startswith("_") and line.get_marker() not in (None, "None", ""):
                styles.setdefault(line.get_label(), set()).add((line.get_color(), line.get_marker()))
        if not styles:
            continue
        assert len(styles) >= min_series, f"{ax.get_title()!r}: {len(styles)} series"
        assert all(len(s) == 1 for s in styles.values()), f"a model drawn in two styles: {styles}"
        pairs = [next(iter(s)) for s in styles.values()]
        assert len(set(pairs)) == len(pairs), f"{ax.get_title()!r}: two models share a (colour, marker)"
        for axis, lim in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            label = axis.get_label().get_text()
            if axis.get_scale() == "log":
                assert "log scale" in label, f"a log axis that does not say so: {label!r}"
            elif any(u in label for u in COUNT_UNITS):
                assert min(lim) == 0, f"linear count axis {label!r} starts at {min(lim)}"
            assert axis.get_offset_text().get_text() == "", f"offset notation on {label!r}"
        for t in ax.texts:  # the names written on the plot
            bb = t.get_window_extent(renderer)
            assert inside.x0 <= bb.x0 and bb.x1 <= inside.x1 and inside.y0 <= bb.y0 and bb.y1 <= inside.y1, \
                f"label {t.get_text()!r} leaves the figure"
    for t in titles:
        if t.get_text():
            bb = t.get_window_extent(renderer)
            assert inside.x0 <= bb.x0 and bb.x1 <= inside.x1 and inside.y0 <= bb.y0 and bb.y1 <= inside.y1 + 0.5, \
                f"title {t.get_text()!r} leaves the figure: {bb} not in {inside}"
    legends = fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    for lg in legends:
        bb = lg.get_window_extent(renderer)
        assert inside.x0 <= bb.x0 + 0.5 and bb.x1 <= inside.x1 + 0.5, f"legend leaves the figure: {bb}"
