"""Scaling exponents, baseline ratios and Markdown tables for the speed benchmark."""

from __future__ import annotations

import math

# metric key -> (column title, how to read the number out of one result row)
TIME_METRICS = {
    "fwd": "fwd ms",
    "fwd_bwd": "fwd+bwd ms",
    "decode": "decode ms/token",
}
MEM_METRICS = {
    "fwd": "fwd peak MiB",
    "fwd_bwd": "fwd+bwd peak MiB",
    "decode": "decode peak MiB",
}
MIB = 2**20


def loglog_slope(xs, ys) -> float | None:
    """Least-squares slope of log(y) against log(x) over points with x, y > 0 (finite).
    None when fewer than two distinct x remain."""
    pts = [
        (math.log(x), math.log(y))
        for x, y in zip(xs, ys)
        if x is not None and y is not None and x > 0 and y > 0 and math.isfinite(y)
    ]
    if len({p[0] for p in pts}) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    sxy = sum((p[0] - mx) * (p[1] - my) for p in pts)
    return sxy / sxx


def metric_value(row: dict, metric: str, kind: str) -> float | None:
    """kind 'time' -> median ms (per token for decode); 'mem' -> peak bytes; None if skipped."""
    m = row["metrics"].get(metric)
    if not m or m.get("status") != "ok":
        return None
    return m.get("ms") if kind == "time" else m.get("peak_bytes")


def series(rows: list[dict], preset: str, metric: str, kind: str) -> tuple[list[int], list[float | None]]:
    mine = sorted((r for r in rows if r["preset"] == preset), key=lambda r: r["length"])
    if kind == "state":
        return [r["length"] for r in mine], [r["state_bytes"] for r in mine]
    return [r["length"] for r in mine], [metric_value(r, metric, kind) for r in mine]


def _exp(xs, ys) -> dict:
    pts = [(x, y) for x, y in zip(xs, ys) if y is not None and y > 0]
    return {
        "all": loglog_slope(xs, ys),
        # local slope over the two longest measured lengths: asymptotic behaviour shows here first
        "tail": loglog_slope([p[0] for p in pts[-2:]], [p[1] for p in pts[-2:]]),
        "points": len(pts),
    }


def exponents(rows: list[dict], presets: list[str]) -> dict:
    """{preset: {"time": {metric: {all, tail, points}}, "memory": {...}, "state_bytes": {...}}}."""
    out = {}
    for p in presets:
        out[p] = {
            "time": {m: _exp(*series(rows, p, m, "time")) for m in TIME_METRICS},
            "memory": {m: _exp(*series(rows, p, m, "mem")) for m in MEM_METRICS},
            "state_bytes": _exp(*series(rows, p, None, "state")),
        }
    return out


def ratios(rows: list[dict], presets: list[str], baseline: str) -> dict:
    """{preset: [{length, fwd, fwd_bwd, decode}]}: preset time / baseline time at each length
    (None where either was skipped). All numbers come from one process, same inputs."""
    base = {r["length"]: r for r in rows if r["preset"] == baseline}
    out = {}
    for p in presets:
        if p == baseline:
            continue
        lst = []
        for r in sorted((r for r in rows if r["preset"] == p), key=lambda r: r["length"]):
            b = base.get(r["length"])
            entry = {"length": r["length"]}
            for m in TIME_METRICS:
                a = metric_value(r, m, "time")
                d = metric_value(b, m, "time") if b is not None else None
                entry[m] = a / d if a is not None and d else None
            # the analytic forward FLOP ratio (README "How FLOPs are counted"), and the forward time
            # ratio over it: 1.0 when the preset runs as fast per FLOP as the baseline
            fa, fb = r.get("gflop_per_token_fwd"), (b or {}).get("gflop_per_token_fwd")
            entry["flops_fwd"] = fa / fb if fa and fb else None
            entry["fwd_per_flop"] = entry["fwd"] / entry["flops_fwd"] if entry["fwd"] and entry["flops_fwd"] else None
            lst.append(entry)
        out[p] = lst
    return out


# ----- formatting -----
def _fmt_ms(v: float) -> str:
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def _cell(row: dict, metric: str, kind: str) -> str:
    m = row["metrics"].get(metric) or {}
    if m.get("status") == "skipped":
        return "skipped (OOM)" if m.get("oom") else "n/a"
    v = metric_value(row, metric, kind)
    if v is None:
        return "—"
    return _fmt_ms(v) if kind == "time" else f"{v / MIB:.2f}"


def _fmt_exp(e: dict) -> str:
    a, t = e["all"], e["tail"]
    if a is None:
        return "—"
    if t is None or e["points"] <= 2:
        return f"{a:.2f}"
    return f"{a:.2f} ({t:.2f})"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def results_table(rows: list[dict]) -> str:
    header = ["preset", "length", *TIME_METRICS.values(), *MEM_METRICS.values(), "state MiB", "params", "GFLOP/token (fwd)"]
    body = []
    for r in rows:
        body.append(
            [
                r["preset"],
                str(r["length"]),
                *(_cell(r, m, "time") for m in TIME_METRICS),
                *(_cell(r, m, "mem") for m in MEM_METRICS),
                "—" if r["state_bytes"] is None else f"{r['state_bytes'] / MIB:.3g}",
                "—" if r["params"] is None else f"{r['params']:,}",
                "—" if r["gflop_per_token_fwd"] is None else f"{r['gflop_per_token_fwd']:.4g}",
            ]
        )
    return _table(header, body)


def exponents_table(exps: dict) -> str:
    header = ["preset", *(f"time {t}" for t in TIME_METRICS.values()), *(f"mem {t}" for t in MEM_METRICS.values()), "state"]
    header = [h.replace(" ms/token", "/token").replace(" ms", "").replace(" peak MiB", "") for h in header]
    body = []
    for p, e in exps.items():
        body.append(
            [
                p,
                *(_fmt_exp(e["time"][m]) for m in TIME_METRICS),
                *(_fmt_exp(e["memory"][m]) for m in MEM_METRICS),
                _fmt_exp(e["state_bytes"]),
            ]
        )
    return _table(header, body)


def ratios_table(rat: dict) -> str:
    header = ["preset", "length", *(f"{t.split(' ms')[0]} ×" for t in TIME_METRICS.values()), "fwd FLOPs ×",
              "fwd × / FLOPs ×"]
    keys = [*TIME_METRICS, "flops_fwd", "fwd_per_flop"]
    body = []
    for p, lst in rat.items():
        for e in lst:
            body.append([p, str(e["length"]), *(f"{e[m]:.2f}" if e.get(m) is not None else "—" for m in keys)])
    return _table(header, body)


def notes(rows: list[dict]) -> list[str]:
    """One line per skipped measurement, with the reason."""
    out = []
    for r in rows:
        for m, v in r["metrics"].items():
            if v.get("status") == "skipped":
                out.append(f"- {r['preset']} @ {r['length']}: {m} skipped: {v['reason']}")
    return out


def markdown(result: dict) -> str:
    meta = result["meta"]
    parts = [
        "# speedlm speed benchmark",
        "",
        f"- device: {meta['device']} ({meta['device_name']}), torch {meta['torch_version']}, dtype {meta['dtype']}, "
        f"batch size {meta['batch_size']}, {meta['threads']} CPU threads",
        f"- timing: median of {meta['repeats']} runs after {meta['warmup']} warmup; {meta['timing_method']}",
        f"- decode: prefill `length` tokens through the cache, then {meta['decode_tokens']} single-token steps; "
        "ms per token = the median single-token step of the timed runs; decode peak = memory held during those steps (includes the cache)",
        f"- memory: {meta['memory_method']}",
        "- state MiB: analytic inference cache after `length` tokens (`state_bytes`); "
        "GFLOP/token: analytic forward `flops_per_token(length, training=False)`",
        f"- date: {meta['date']}",
        "",
        "## Results",
        "",
        results_table(result["results"]),
        "",
        "## Scaling exponents",
        "",
        "Least-squares slope of log(metric) vs log(length) over all measured lengths; "
        "in parentheses the slope over the two longest lengths. ~2: quadratic, ~1: linear, ~0: constant.",
        "",
        exponents_table(result["exponents"]),
    ]
    if result["ratios"]:
        parts += [
            "",
            f"## Time ratio vs {result['baseline']} (measured in one process, same inputs)",
            "",
            "FLOPs ×: the analytic forward FLOP ratio (README \"How FLOPs are counted\"); fwd × / FLOPs ×: "
            "1.00 when the preset's forward runs as fast per counted FLOP as the baseline's.",
            "",
            ratios_table(result["ratios"]),
        ]
    skipped = notes(result["results"])
    if skipped:
        parts += ["", "## Skipped", "", *skipped]
    return "\n".join(parts) + "\n"
