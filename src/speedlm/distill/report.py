"""The distillation report: `speedlm compare` over the teacher, the distilled student, the same
student trained from scratch on the same tokens and the training-free baselines (each a
checkpoint entry, measured as saved: validation loss and bits per byte, zero-shot MQAR on its
weights, KV/state bytes, prefill and decode speed), plus what only a distillation has: each
stage's losses before and after it, and the validation loss along the tokens each student saw.

The section and its plot are appended to compare's own report.md / report.json in
`--out/report`; the entries are found from the checkpoints themselves (a student's run folder
holds distill_report.json; a from-scratch run's folder holds scratch.json naming its student), so
`--compare-with` may add any other distilled runs to the same table.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

REPORT_FILE = "distill_report.json"
SCRATCH_FILE = "scratch.json"
SECTION_TITLE = "## Distillation"


def run_folder(checkpoint: str) -> Path:
    """The run folder of a run or step folder (a step folder's parent)."""
    p = Path(checkpoint)
    return p.parent if p.name.startswith("step_") else p


def distill_record(checkpoint: str) -> dict | None:
    """distill_report.json of the distill run that saved `checkpoint` (None: not a distilled student)."""
    f = run_folder(checkpoint) / REPORT_FILE
    return json.loads(f.read_text()) if f.is_file() else None


def scratch_record(checkpoint: str) -> dict | None:
    """scratch.json of the from-scratch twin that saved `checkpoint` (None: not one)."""
    f = run_folder(checkpoint) / SCRATCH_FILE
    return json.loads(f.read_text()) if f.is_file() else None


def _val_curve(folder: str) -> list[tuple[int, float]]:
    """(tokens, validation loss) along a training run folder's metrics."""
    from speedlm.train.metrics import read_metrics

    return [(r["tokens"], r["val_loss"]) for r in read_metrics(Path(folder) / "metrics.jsonl")
            if r.get("val_loss") is not None and r.get("tokens") is not None]


def _fmt_parts(s: dict) -> str:
    parts = [k for k in s["end"] if k != "total"]
    return ", ".join(f"{k} {s['start'][k]:.4g} → {s['end'][k]:.4g}" for k in parts)


def _mixer_label(mixer) -> str:
    if not isinstance(mixer, dict):
        return str(mixer)
    options = {k: v for k, v in mixer.items() if k != "name"}
    return mixer["name"] + (json.dumps(options) if options else "")


def distill_data(report: dict) -> dict:
    """The distillation section's JSON: the distilled students and from-scratch twins among
    `report`'s checkpoint entries, with their records."""
    rows = {m["name"]: m for m in report["models"]}
    data = {"students": [], "scratch": []}
    for name, m in rows.items():
        rec = distill_record(name) if m.get("pretrained") else None
        if rec is None:
            continue
        val = rec.get("validation") or {}
        what = "; ".join(f"{k} {v}" for k, v in (("replace", rec.get("replace")), ("graft", rec.get("graft"))) if v)
        entry = {"name": name, "replace": what, "teacher": rec["teacher"], "stages": rec["stages"],
                 "tokens": sum(s["tokens"] for s in rec["stages"]), "layers": rec["layers"], "validation": val,
                 "scratch": rec.get("scratch")}
        data["students"].append(entry)
    for name, m in rows.items():
        rec = scratch_record(name) if m.get("pretrained") else None
        if rec is not None:
            data["scratch"].append({"name": name, **rec})
    return data


def distill_section(data: dict, plot: str | None) -> list[str]:
    """The distillation section's markdown lines (none without a distilled student)."""
    if not data["students"]:
        return []
    lines = [SECTION_TITLE, ""]
    lines += ["Each student is its teacher with the layers `--replace` names swapped for other mixers, started "
              "from the attention weights where a mapping exists, then trained in stages (attention transfer: the "
              "new mixers alone match each replaced layer's output, MSE; distillation: KL to the teacher at "
              "temperature T plus a weighted LM loss). Its from-scratch twin is the same architecture from its own "
              "initialisation, trained with the teacher's recipe (learning rate, schedule) on as many tokens as all "
              "the student's stages together; the teacher's own training tokens are not counted for either.", ""]
    lines += ["| student | layers | init | tokens | stage: objective before → after | val loss: student / teacher "
              "| from scratch (same tokens) |", "|---|---|---|---|---|---|---|"]
    scratch_by_student = {os.path.realpath(s["student"]): s for s in data["scratch"] if s.get("student")}
    for s in data["students"]:
        init = ", ".join(sorted({f"{_mixer_label(r['mixer'])}: {r['init']}" for r in s["layers"]}))
        stages = "; ".join(f"{st['stage']}: {_fmt_parts(st)}" for st in s["stages"]) or "none (training-free)"
        v = s["validation"]
        val = f"{v['student']:.4f} / {v['teacher']:.4f}" if v else "-"
        twin = scratch_by_student.get(os.path.realpath(run_folder(s["name"])))
        scratch = f"{twin['val_loss']:.4f} ({twin['name']})" if twin else "-"
        lines.append(f"| {s['name']} | `{s['replace']}` | {init} | {s['tokens']:,} | {stages} | {val} | {scratch} |")
    lines += ["", "Validation losses here are `speedlm distill`'s (its `--eval-batches` on the corpus's validation "
              "split, the student's tokenizer = the teacher's); the leaderboard above re-measures every entry on "
              "compare's own validation batches.", ""]
    if plot:
        lines += [f"![validation loss along the students' tokens]({os.path.basename(plot)})", ""]
    return lines


def distill_plot(data: dict, out_dir: str) -> str | None:
    """Validation loss against the tokens each student trained on: every stage of each student
    (continued across stages), its from-scratch twin, the teacher as a line."""
    if not data["students"]:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    teachers = set()
    for s in data["students"]:
        offset, xs, ys = 0, [], []
        for st in s["stages"]:
            for t, v in _val_curve(st["out"]):
                xs.append(offset + t)
                ys.append(v)
            offset += st["tokens"]
        if xs:
            ax.plot(xs, ys, "o-", markersize=3, label=f"{run_folder(s['name']).name} (distilled)")
        if s["validation"]:
            teachers.add(round(s["validation"]["teacher"], 6))
    for t in data["scratch"]:
        curve = _val_curve(t["out"])
        if curve:
            ax.plot(*zip(*curve), "s--", markersize=3, label=f"{run_folder(t['student']).name} from scratch")
    for v in sorted(teachers):
        ax.axhline(v, color="black", linewidth=1, linestyle=":", label=f"teacher {v:.4f}")
    ax.set_xlabel("student training tokens")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Distilled students vs the same architectures from scratch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    path = os.path.join(out_dir, "distill.png")
    fig.savefig(path, bbox_inches="tight")
    return path


def append_distill_section(report: dict, out_dir: str) -> dict:
    """Add the distillation section and plot to compare's report files in `out_dir`; returns its JSON."""
    from speedlm.compare.report import REPORT_JSON, REPORT_MD

    data = distill_data(report)
    plot = distill_plot(data, out_dir)
    lines = distill_section(data, plot)
    md = Path(out_dir) / REPORT_MD
    text = md.read_text()
    cut = text.find(SECTION_TITLE)
    md.write_text((text[:cut] if cut >= 0 else text).rstrip("\n") + "\n\n" + "\n".join(lines) + "\n")
    saved = Path(out_dir) / REPORT_JSON
    full = json.loads(saved.read_text())
    full["distill"] = {**data, "plot": plot}
    saved.write_text(json.dumps(full, indent=2))
    return full["distill"]
