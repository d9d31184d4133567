"""Associative recall (MQAR, the Zoology benchmark): does an architecture remember what it read?

For each preset x width x sequence length x number of key-value pairs, a fresh model of that
architecture (its layer pattern at the given width, the MQAR vocabulary) is trained on fresh
synthetic batches every step (`MQARStream`, a pure function of seed and step) with the shared
trainer, then scored on a held-out test set drawn from a separate seed. Accuracy is the
fraction of queries whose value the model predicts.

Fixed-state models must compress every pair into their state, so their accuracy falls as the
pairs grow relative to the state, while attention, whose KV cache grows with the context,
recalls at every setting (Arora et al. 2023, arXiv:2312.04927, Figure 2). The state a model
had when answering is reported beside its accuracy (`state_bytes` at the sequence length).

Outputs in `out_dir`: bench_recall.json, bench_recall.md and bench_recall.png (accuracy vs
state bytes).
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import platform
import tempfile
from dataclasses import dataclass

import torch

import speedlm
from speedlm.bench.common import check_int, check_ints, check_presets, one_line, write_results
from speedlm.data.mqar import IGNORE_INDEX, MQARStream, mqar_batch
from speedlm.device import resolve_device
from speedlm.errors import SpeedlmError
from speedlm.models import ModelConfig, build_model, resolve_config
from speedlm.progress import progress_bar, progress_write
from speedlm.train.config import TrainConfig

# the held-out test set's generator seed lies far outside the training stream's seeds
# (seed * 1_000_003 + step), so no test example is a training example by construction
TEST_SEED_OFFSET = 2**62


@dataclass(frozen=True)
class RecallSetting:
    """One MQAR task and its training recipe."""

    seq_len: int = 64
    num_kv_pairs: int = 4
    vocab_size: int = 32
    steps: int = 800
    batch_size: int = 32
    lr: float = 1e-3
    test_examples: int = 512

    def check(self) -> None:
        for name in ("seq_len", "num_kv_pairs", "vocab_size", "steps", "batch_size", "test_examples"):
            check_int(f"MQAR {name}", getattr(self, name), 1)
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise SpeedlmError(f"MQAR lr must be positive, got {self.lr!r}")
        # the generator's own checks (room for the pairs, enough distinct keys)
        mqar_batch(1, self.seq_len, self.num_kv_pairs, self.vocab_size, torch.Generator().manual_seed(0))

    def describe(self) -> str:
        return f"T={self.seq_len}, {self.num_kv_pairs} pairs, vocab {self.vocab_size}"


def recall_config(spec, setting: RecallSetting, width: int | None = None) -> ModelConfig:
    """The architecture of `spec` (preset name or config) on the MQAR task: its layer pattern
    and mixers, the MQAR vocabulary, room for the sequence, and optionally another width.

    Embeddings are untied for MQAR whatever the preset says: with a tied head the value a
    query must produce is scored against the same vectors the keys are read with, and a
    2-layer attention model then needs several times more steps to find the recall circuit
    (measured: 0.45 vs 1.00 accuracy after 800 steps at T=64, 4 pairs, vocabulary 32). The token
    mixers, which are what MQAR compares, are unchanged."""
    from speedlm.models.build import require_language_model

    cfg = resolve_config(spec)
    require_language_model(cfg, spec)
    fields = cfg.to_dict()
    fields.update(vocab_size=setting.vocab_size, max_seq_len=max(cfg.max_seq_len, setting.seq_len), tie_embeddings=False)
    fields["separators"] = None  # a text tokenizer's separator ids mean nothing in MQAR's vocabulary
    if width is not None:
        if width % cfg.n_heads or (width // cfg.n_heads) % 2:
            raise SpeedlmError(
                f"width {width} does not split into {cfg.n_heads} heads of even size (the preset's n_heads); "
                f"use a multiple of {2 * cfg.n_heads}"
            )
        fields["d_model"] = width
        fields["ffn_hidden"] = None  # the FFN follows the width
    return ModelConfig.from_dict(fields)


@torch.no_grad()
def recall_accuracy(model, setting: RecallSetting, seed: int = 0, device=None, chunk: int = 128) -> float:
    """Accuracy on `setting.test_examples` held-out MQAR examples (see TEST_SEED_OFFSET)."""
    g = torch.Generator().manual_seed(TEST_SEED_OFFSET + seed)
    x, y = mqar_batch(setting.test_examples, setting.seq_len, setting.num_kv_pairs, setting.vocab_size, g)
    device = device if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        for i in range(0, len(x), chunk):
            xs, ys = x[i : i + chunk], y[i : i + chunk]
            pred = model(xs.to(device)).argmax(-1).cpu()
            scored = ys != IGNORE_INDEX
            correct += int((pred[scored] == ys[scored]).sum())
            total += int(scored.sum())
    finally:
        model.train(was_training)
    return correct / total


@torch.no_grad()
def recall_cache_bytes(model, setting: RecallSetting, seed: int = 0) -> int | None:
    """Bytes the trained model's caches hold after one held-out MQAR sequence (what it keeps to
    answer: a window, the keys its spans reach, the tokens its router kept), in the model's
    dtype; None for models without caches."""
    if not hasattr(model, "init_cache"):
        return None
    g = torch.Generator().manual_seed(TEST_SEED_OFFSET + seed)
    x, _ = mqar_batch(1, setting.seq_len, setting.num_kv_pairs, setting.vocab_size, g)
    was_training = model.training
    model.eval()
    try:
        cache = model.init_cache()
        model(x.to(next(model.parameters()).device), cache)
        return cache.nbytes()
    finally:
        model.train(was_training)


# The learning curve's held-out examples (a subset of the test set, scored along training) and
# what counts as still learning: more than RISING accuracy gained over the last quarter of the
# steps, or a curve flat (within FLAT, or the scores' own noise) over its second half below
# SOLVED accuracy (a plateau: MQAR
# models often sit on one, at about one query in four, before they find the recall circuit, so
# the number says when training stopped, not what the architecture can hold).
CURVE_EXAMPLES = 128
RISING = 0.05
FLAT = 0.02
SOLVED = 0.9


def learning_flag(curve: list[tuple[int, float]], queries: int | None = None) -> str | None:
    """'rising', 'plateau' or None (converged) for a held-out accuracy curve [(step, accuracy)].
    `queries`: how many queries each point scores; flat then means within FLAT or two binomial
    standard errors of one point, whichever is wider (128 examples of 4 queries at 0.25 accuracy
    scatter by 0.019 per point: a flat curve looks no flatter than that)."""
    if len(curve) < 4:
        return None
    accs = [a for _, a in curve]
    if accs[-1] - accs[(3 * len(accs)) // 4 - 1] > RISING:
        return "rising"
    second_half = accs[len(accs) // 2:]
    flat = FLAT
    if queries:
        p = min(max(accs[-1], 0.0), 1.0)
        flat = max(FLAT, 2 * math.sqrt(p * (1 - p) / queries))
    if accs[-1] < SOLVED and max(second_half) - min(second_half) <= flat:
        return "plateau"
    return None


def train_recall(cfg: ModelConfig, setting: RecallSetting, *, seed: int = 0, device="auto", dtype: str = "auto",
                 peak_flops: float | None = None, on_step=None, out_dir: str | None = None,
                 checkpoints: int = 0) -> dict:
    """Train a fresh model of `cfg` on MQAR and score it. Nothing is written to disk unless
    `out_dir` is given: then the run checkpoints there and continues from its last checkpoint
    when called again (a killed `speedlm compare` resumes its MQAR stage). `checkpoints` > 0
    scores CURVE_EXAMPLES held-out examples at that many evenly spaced steps: the result gets
    the learning curve and its `learning_flag`."""
    from speedlm.train import train

    torch.manual_seed(seed)
    model = build_model(cfg)
    curve: list[tuple[int, float]] = []
    if checkpoints:
        marks = {max(1, round(setting.steps * (i + 1) / checkpoints)) for i in range(checkpoints)}
        probe = dataclasses.replace(setting, test_examples=min(CURVE_EXAMPLES, setting.test_examples))
        user_step = on_step

        def on_step(k, _user=user_step):
            if k in marks:
                curve.append((k, recall_accuracy(model, probe, seed)))
            if _user is not None:
                _user(k)
    persist = out_dir is not None
    tcfg = TrainConfig(
        steps=setting.steps, batch_size=setting.batch_size, seq_len=setting.seq_len, lr=setting.lr,
        warmup_steps=max(1, setting.steps // 10), weight_decay=0.0, eval_every=0,
        save_every=max(1, setting.steps // 4) if persist else 0, keep=1,
        seed=seed, device=str(device), dtype=dtype, peak_flops=peak_flops, out_dir=out_dir or tempfile.gettempdir(),
    )
    resume = persist and os.path.exists(os.path.join(out_dir, "latest"))
    summary = train(model, tcfg, MQARStream(setting.vocab_size, setting.num_kv_pairs), progress=False,
                    on_step=on_step, persist=persist, resume=resume)
    accuracy = recall_accuracy(model, setting, seed)
    return {
        "accuracy": accuracy,
        "state_bytes": int(model.state_bytes(setting.seq_len, 1, 4)),  # analytic, at the learned values
        "cache_bytes": recall_cache_bytes(model, setting, seed),  # measured
        "params": model.num_params(),
        "steps": summary["step"],
        "final_loss": summary["loss"],
        "train_tok_per_s": summary["tok_per_s"],
        **({"curve": curve, "flag": learning_flag(curve, min(CURVE_EXAMPLES, setting.test_examples) * setting.num_kv_pairs)}
           if checkpoints else {}),
    }


def run_recall_bench(
    presets,
    lengths=(64, 128, 256),
    pairs=(4, 8, 16),
    widths=(64, 128),
    steps: int = 1000,
    batch_size: int = 32,
    lr: float = 1e-3,
    vocab_size: int = 64,
    test_examples: int = 512,
    device="auto",
    dtype="auto",
    seed: int = 0,
    out_dir: str = "runs/recall",
    progress: bool = True,
    lrs=None,
    checkpoints: int = 8,
) -> dict:
    """Every preset x width x length x pairs (skipping lengths < 4 x pairs, where the pairs and
    their queries do not fit); prints the table and writes JSON, Markdown and a plot.

    Zoology's protocol: each setting trains once per learning rate in `lrs` (default: `lr`
    alone) and reports the best held-out accuracy, with every learning rate's beside it; the
    best run's learning curve (`checkpoints` held-out scores along training) flags a setting
    still rising at the end or sitting on a plateau (`learning_flag`), so a number that only
    says when training stopped is not read as the architecture's capacity."""
    lrs = [lr] if lrs is None else list(lrs)
    if not lrs or not all(isinstance(v, (int, float)) and v > 0 for v in lrs):
        raise SpeedlmError(f"learning rates must be positive numbers, got {lrs!r}")
    check_int("checkpoints", checkpoints, 0)
    presets = check_presets(presets)
    lengths, pairs, widths = check_ints("lengths", lengths), check_ints("pairs", pairs), check_ints("widths", widths)
    dev = resolve_device(device)
    amp = TrainConfig(dtype=dtype).autocast_dtype(dev)  # an unknown or unsupported dtype fails before any work
    settings = [
        RecallSetting(n, p, vocab_size, steps, batch_size, lr, test_examples) for n in lengths for p in pairs if n >= 4 * p
    ]
    if not settings:
        raise SpeedlmError(f"no length in {lengths} holds any pair count in {pairs} (MQAR needs length >= 4 x pairs)")
    for s in settings:
        s.check()
    configs = {(p, w, s): recall_config(p, s, w) for p in presets for w in widths for s in settings}  # errors before work
    os.makedirs(out_dir, exist_ok=True)

    rows = []
    total_steps = len(configs) * steps * len(lrs)
    bar = progress_bar(total=total_steps, desc="bench recall", disable=not progress, unit="step")
    try:
        for (p, w, s), cfg in configs.items():
            bar.set_postfix_str(f"{p} d={w} {s.describe()}", refresh=False)
            row = {"preset": p, "width": w, "seq_len": s.seq_len, "pairs": s.num_kv_pairs}
            runs = {}
            for rate in lrs:
                done_before = bar.n
                try:
                    runs[rate] = train_recall(
                        cfg, dataclasses.replace(s, lr=rate), seed=seed, device=dev, dtype=dtype, checkpoints=checkpoints,
                        on_step=lambda k, base=done_before: bar.update(base + k - bar.n))
                except KeyboardInterrupt:
                    raise
                except Exception as e:  # noqa: BLE001 - one failed setting must not lose the others
                    row.update(status="failed", reason=one_line(e))
                bar.update(done_before + steps - bar.n)
            if runs:  # the best learning rate's run, every rate's accuracy beside it
                best = max(runs, key=lambda r: (runs[r]["accuracy"], -r))
                row.update(runs[best], status="ok", lr=best, accuracy_by_lr={str(r): v["accuracy"] for r, v in runs.items()})
                row.pop("reason", None)
            rows.append(row)
            acc = f"{row['accuracy']:.3f} (lr {row['lr']:g})" if row["status"] == "ok" else row["reason"]
            flag = f" [{row['flag']}]" if row.get("flag") else ""
            progress_write(bar, f"{p:<28} d={w:<4} T={s.seq_len:<4} pairs={s.num_kv_pairs:<3} accuracy {acc}{flag}")
    finally:
        bar.close()

    result = {
        "meta": {
            "command": "speedlm bench recall",
            "presets": presets, "lengths": lengths, "pairs": pairs, "widths": widths,
            "steps": steps, "batch_size": batch_size, "lr": lr, "lrs": lrs, "checkpoints": checkpoints,
            "vocab_size": vocab_size,
            "test_examples": test_examples, "device": str(dev), "dtype": str(amp or torch.float32).removeprefix("torch."),
            "seed": seed,
            "torch_version": torch.__version__, "speedlm_version": speedlm.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
        "results": rows,
    }
    md = recall_markdown(result)
    files = {"json": os.path.join(out_dir, "bench_recall.json"), "md": os.path.join(out_dir, "bench_recall.md")}
    files["plot"] = plot_recall(rows, os.path.join(out_dir, "bench_recall.png"))
    return write_results(result, md, files)


def _kib(n) -> str:
    return "-" if n is None else f"{n / 1024:,.1f}"


def recall_markdown(result: dict) -> str:
    m = result["meta"]
    lines = [
        "# MQAR associative recall",
        "",
        f"Trained {m['steps']} steps x {m['batch_size']} sequences at each learning rate of "
        f"{', '.join(f'{v:g}' for v in m.get('lrs') or [m['lr']])} (the best held-out accuracy is reported), "
        f"vocab {m['vocab_size']}; accuracy on {m['test_examples']} held-out examples; {m['device']} {m['dtype']}, "
        f"seed {m['seed']}.",
        "State KiB: the inference state after the sequence, in float32. Flag: the best run's held-out accuracy was "
        f"still rising over the last quarter of training (by more than {RISING}), or sat on a plateau below "
        f"{SOLVED} (flat over the second half within {FLAT} or two binomial standard errors of a score, whichever "
        "is wider): that number says when training stopped, not what "
        "the architecture can hold.",
        "",
        "| preset | width | length | pairs | accuracy | best lr | by lr | flag | state KiB | params |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["results"]:
        if r["status"] == "ok":
            acc, state, params = f"{r['accuracy']:.3f}", _kib(r["state_bytes"]), f"{r['params']:,}"
            lr = f"{r['lr']:g}" if "lr" in r else "-"
            by_lr = ", ".join(f"{float(k):g}: {v:.3f}" for k, v in (r.get("accuracy_by_lr") or {}).items()) or "-"
            flag = r.get("flag") or "-"
        else:
            acc, state, params, lr, by_lr, flag = f"failed: {r['reason']}", "-", "-", "-", "-", "-"
        lines.append(f"| {r['preset']} | {r['width']} | {r['seq_len']} | {r['pairs']} | {acc} | {lr} | {by_lr} | "
                     f"{flag} | {state} | {params} |")
    return "\n".join(lines) + "\n"


def plot_recall(rows: list[dict], path: str) -> str:
    """Accuracy vs state bytes (log x), one panel per number of pairs, one style per preset
    (bench/styles.py); a point that another covers is drawn larger, and points of different
    presets that coincide are named on the plot."""
    from speedlm.bench.styles import figure, grow_hidden, label_points, legend, plain_numbers, settle, styles_for

    ok = [r for r in rows if r["status"] == "ok"]
    pair_counts = sorted({r["pairs"] for r in rows}) or [0]
    fig, axes = figure(4.6 * len(pair_counts) + 2, 4.0, len(pair_counts))
    presets = list(dict.fromkeys(r["preset"] for r in rows))
    styles = styles_for({p: p for p in presets})
    panels = []
    for ax, n in zip(axes, pair_counts):
        points = []
        for p in presets:
            for x, y in sorted((r["state_bytes"], r["accuracy"]) for r in ok if r["pairs"] == n and r["preset"] == p):
                points += ax.plot([x], [y], label=p, markersize=7, alpha=0.85, **{**styles[p].kw(), "linestyle": "none"})
        ax.set_xscale("log")
        ax.set_ylim(-0.02, 1.05)
        if not points:
            ax.text(0.5, 0.5, "no finished setting", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"{n} key-value pairs")
        ax.set_xlabel("inference state (bytes, float32; log scale)")
        ax.set_ylabel("MQAR accuracy")
        ax.grid(True, which="both", alpha=0.3)
        plain_numbers(ax)
        panels.append((ax, points))
    if ok:
        legend(fig, styles, [r["preset"] for r in ok])
    settle(fig)
    for ax, points in panels:
        grow_hidden(ax, points)
        if _coinciding(points):
            label_points(ax, _coinciding(points))
    fig.savefig(path, dpi=110)
    return path


def _coinciding(points: list) -> list:
    """The points that lie exactly on a point of another preset."""
    at: dict[tuple, set] = {}
    for line in points:
        at.setdefault(tuple(line.get_xydata()[0]), set()).add(line.get_label())
    return [line for line in points if len(at[tuple(line.get_xydata()[0])]) > 1]


def chance_accuracy(setting: RecallSetting) -> float:
    """Guessing among the values: the accuracy of a model that does not recall."""
    return 1.0 / (setting.vocab_size - setting.vocab_size // 2)


__all__ = [
    "RecallSetting",
    "chance_accuracy",
    "plot_recall",
    "recall_accuracy",
    "recall_config",
    "recall_markdown",
    "run_recall_bench",
    "train_recall",
]
