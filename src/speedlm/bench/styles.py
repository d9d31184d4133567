"""The look shared by every multi-model plot (bench speed and recall, the compare report).

The style rule: one hue per mixer family (the registry family of a model's first mixer), in
order of first appearance; within a family each model gets its own shade of that hue (dark to
light), its own marker and its own line style. So every model has a distinct (colour, marker)
pair, and models of one family read as one group. Past eight families the hues repeat; a model
whose (colour, marker) is already taken moves on to the next free marker.

Also here: a figure on an Agg canvas (the global matplotlib backend is untouched), one legend
outside the axes, names written on the plot (a column of names at the ends of curves; a name
beside each point of a scatter, one label for points that coincide; nudged apart where close),
larger markers under a series that would hide another, and plain tick numbers.
"""

from __future__ import annotations

import math
import textwrap
from typing import NamedTuple

# tab10 without its grey, which reference lines (chance accuracy) use, and its brown, which a
# darker shade of the orange would be mistaken for
HUES = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#e377c2", "#bcbd22", "#17becf")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "*", "p")
LINESTYLES = ("-", "--", "-.", ":")
# how far the shades of one family go towards black (negative) and white (positive)
SHADE_RANGE = (-0.3, 0.35)


class Style(NamedTuple):
    colour: str
    marker: str
    linestyle: str

    def kw(self) -> dict:
        """Keyword arguments of `Axes.plot`."""
        return {"color": self.colour, "marker": self.marker, "linestyle": self.linestyle}


def model_family(spec) -> str:
    """The registry family of the first mixer of a preset name, config, config dict or JSON path
    ("gqa-tiny" -> "efficient full attention")."""
    from speedlm.checkpoint.pretrained import spec_config
    from speedlm.registry import MIXERS

    return MIXERS[spec_config(spec).layer_specs()[0]["mixer"]["name"]].family


def _shade(colour: str, t: float) -> str:
    """Mix towards white (t > 0) or black (t < 0) by |t|."""
    from matplotlib.colors import to_hex, to_rgb

    target = 1.0 if t > 0 else 0.0
    return to_hex([c + abs(t) * (target - c) for c in to_rgb(colour)])


def series_styles(names: list[str], families: list[str]) -> dict[str, Style]:
    """{name: Style} for models `names` whose families are `families` (same order); the dict
    lists the models family by family."""
    if len(names) != len(families):
        raise ValueError(f"{len(names)} names but {len(families)} families")
    order = list(dict.fromkeys(families))
    members = {f: [n for n, g in zip(names, families) if g == f] for f in order}
    taken: set[tuple[str, str]] = set()
    styles = {}
    for name, family in zip(names, families):
        group = members[family]
        j = group.index(name)
        lo, hi = SHADE_RANGE
        t = lo + (hi - lo) * j / (len(group) - 1) if len(group) > 1 else 0.0
        colour = _shade(HUES[order.index(family) % len(HUES)], t)
        k = j
        while (colour, MARKERS[k % len(MARKERS)]) in taken:
            k += 1
        assert k < j + len(MARKERS), f"no free marker for {name} in colour {colour}"
        marker = MARKERS[k % len(MARKERS)]
        taken.add((colour, marker))
        styles[name] = Style(colour, marker, LINESTYLES[j % len(LINESTYLES)])
    return {n: styles[n] for f in order for n in members[f]}  # grouped by family: the legend's order


def styles_for(specs: dict[str, object]) -> dict[str, Style]:
    """{name: Style} from {name: preset name, config or JSON path}, families read from the registry."""
    names = list(specs)
    return series_styles(names, [model_family(specs[n]) for n in names])


def figure(width: float, height: float, ncols: int = 1):
    """(figure, axes list) on an Agg canvas with constrained layout, so titles, labels and an
    outside legend stay inside the saved image."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, list(fig.subplots(1, ncols, squeeze=False)[0])


def wrap(title: str, width: int = 60) -> str:
    return "\n".join(textwrap.wrap(title, width))


def plain_numbers(ax) -> None:
    """No offset notation on linear axes (a flat line must not read as growth of "+2.5e2"); on a
    log axis that spans under about a decade and a half, plain numbers (0.6, 1, 2) where matplotlib
    would write 6x10^-1. Call once the data are drawn (it reads the axis limits)."""
    from matplotlib.ticker import FixedFormatter, FuncFormatter, ScalarFormatter

    for axis, lim in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
        if isinstance(axis.get_major_formatter(), FixedFormatter):  # labels given by hand
            continue
        if axis.get_scale() == "linear":
            fmt = axis.get_major_formatter()
            if isinstance(fmt, ScalarFormatter):
                fmt.set_useOffset(False)
        elif axis.get_scale() == "log" and 1e-4 <= min(lim) and max(lim) <= 1e5 and max(lim) / min(lim) <= 10**1.5:
            minor = (2, 3, 4, 6, 8) if max(lim) / min(lim) <= 10 else (2, 5)
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            axis.set_minor_formatter(FuncFormatter(lambda v, _, minor=minor: f"{v:g}" if _mantissa(v) in minor else ""))


def _mantissa(v: float) -> float:
    return round(v / 10 ** math.floor(math.log10(v)), 6)


def legend(fig, styles: dict[str, Style], names: list[str], title: str = "one hue per mixer family") -> None:
    """One legend for the figure, to the right of the axes, listing `names` grouped by family
    (the order of `styles`)."""
    from matplotlib.lines import Line2D

    shown = [n for n in styles if n in set(names)]
    handles = [Line2D([], [], markersize=6, **styles[n].kw()) for n in shown]
    fig.legend(handles, shown, loc="outside right upper", fontsize=8, title=title, title_fontsize=8)


def settle(fig) -> None:
    """Lay the figure out as it will be saved (limits, title, legend and all), so that the names
    placed next read final screen positions. Once per figure: the names stay out of the layout."""
    fig.draw_without_rendering()


def grow_hidden(ax, lines, px: float = 3.0) -> None:
    """A series that lies on a later one at every point (within `px` on screen) gets larger
    markers, so that both stay visible: the earlier is drawn first, underneath."""
    for i, line in enumerate(lines):
        covered = sum(_coincide(ax, line, later, px) for later in lines[i + 1 :])
        line.set_markersize(line.get_markersize() + 4 * covered)


def label_ends(ax, lines, fontsize: float = 7) -> None:
    """Name each curve (`lines`: Line2D artists labelled with the model) in a column right of
    the last points, each name at the height of its curve's end, spread apart where ends are
    close and joined to its end by a thin line. Call after `settle` (names are placed on screen)."""
    fig = ax.figure
    box = ax.get_window_extent(fig.canvas.get_renderer())
    ends = sorted(((ax.transData.transform(line.get_xydata()[-1]), line) for line in lines), key=lambda e: -e[0][1])
    gap = fontsize * 1.25 * fig.dpi / 72  # one line of text, in pixels
    x = max(e[0][0] for e in ends) + 10
    ys = []
    for px, _ in ends:  # top down: at the end's height, or one line below the last
        ys.append(min(px[1], ys[-1] - gap) if ys else min(px[1], box.y1 - gap / 2))
    floor = box.y0 + gap / 2
    for i in reversed(range(len(ys))):  # bottom up: nothing below the axes
        ys[i] = max(ys[i], floor if i == len(ys) - 1 else ys[i + 1] + gap)
    to_pt = 72 / fig.dpi  # offsets in points scale with the saved image's dpi
    for (px, line), y in zip(ends, ys):
        off = ((x - px[0]) * to_pt, (y - px[1]) * to_pt)
        moved = abs(off[1]) > 1 or off[0] > 8
        leader = dict(arrowprops=dict(arrowstyle="-", lw=0.5, color="0.6", shrinkA=1, shrinkB=3)) if moved else {}
        ax.annotate(line.get_label(), tuple(line.get_xydata()[-1]), xytext=off, textcoords="offset points", va="center",
                    fontsize=fontsize, color=line.get_color(), **leader).set_in_layout(False)


def label_points(ax, lines, fontsize: float = 7, merge_px: float = 6.0) -> None:
    """Name each single-point series (`lines`: Line2D artists labelled with the model) beside
    its point. Points within `merge_px` of each other on screen share one label that names all
    of them (`grow_hidden` keeps each of their markers visible); a label that would cover
    another label or a point moves up or down (right of the point first, then left), joined to
    its point by a thin line. Call after `settle` (names are placed on screen)."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    clusters: list[list] = []  # [screen xy, data xy, [lines]]
    for line in lines:
        xy = tuple(line.get_xydata()[0])
        px = ax.transData.transform(xy)
        for c in clusters:
            if math.dist(c[0], px) <= merge_px:
                c[2].append(line)
                break
        else:
            clusters.append([px, xy, [line]])
    r = 6.0  # half the side of the square a marker covers, in pixels
    marks = [_box(c[0][0] - r, c[0][1] - r, c[0][0] + r, c[0][1] + r) for c in clusters]
    placed = []
    inside = ax.get_window_extent(renderer)
    step = fontsize * 1.4
    for idx in sorted(range(len(clusters)), key=lambda i: -clusters[i][0][1]):  # top first
        _, xy, group = clusters[idx]
        text = "\n".join(line.get_label() for line in group)
        style = dict(textcoords="offset points", va="center", fontsize=fontsize,
                     color=group[0].get_color() if len(group) == 1 else "0.15")
        others = placed + marks[:idx] + marks[idx + 1 :]
        chosen = None
        for dx, ha in ((7, "left"), (-7, "right")):
            for dy in (0, 1, -1, 2, -2, 3, -3, 4, -4, 5, -5, 6, -6):
                trial = ax.annotate(text, xy, xytext=(dx, dy * step), ha=ha, **style)
                bb = trial.get_window_extent(renderer)
                trial.remove()
                fits = inside.x0 <= bb.x0 and bb.x1 <= inside.x1 and inside.y0 <= bb.y0 and bb.y1 <= inside.y1
                if fits and not any(bb.overlaps(o) for o in others):
                    chosen = (dx, dy, ha, bb)
                    break
            if chosen:
                break
        if chosen is None:  # crowded everywhere: beside the point, as drawn
            trial = ax.annotate(text, xy, xytext=(7, 0), ha="left", **style)
            chosen = (7, 0, "left", trial.get_window_extent(renderer))
            trial.remove()
        dx, dy, ha, bb = chosen
        leader = dict(arrowprops=dict(arrowstyle="-", lw=0.5, color="0.5", shrinkA=0, shrinkB=4)) if dy else {}
        ax.annotate(text, xy, xytext=(dx, dy * step), ha=ha, **style, **leader).set_in_layout(False)
        placed.append(bb)


def _coincide(ax, a, b, px: float) -> bool:
    """Do two series lie on each other at every point, on screen?"""
    pa, pb = ax.transData.transform(a.get_xydata()), ax.transData.transform(b.get_xydata())
    return pa.shape == pb.shape and bool((((pa - pb) ** 2).sum(axis=1) <= px**2).all())


def _box(x0, y0, x1, y1):
    from matplotlib.transforms import Bbox

    return Bbox([[x0, y0], [x1, y1]])
