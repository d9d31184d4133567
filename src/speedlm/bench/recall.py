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

The protocol follows Zoology's figure-2 configs (HazyResearch/zoology): one head in every
model, zero filler between the queries, a learning-rate sweep whose best held-out accuracy is
reported, and width as the state axis. Two additions keep a CPU grid affordable without
changing what it reports: a run ends at the first checkpoint that scores `stop_at` (solved),
and the learning rates after a solved run are skipped. Runs still learning at the end are
flagged (`learning_flag`), not read as capacity.

Outputs in `out_dir`: bench_recall.json, bench_recall.md and bench_recall.png (accuracy vs
state bytes).
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import platform
import sys
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
    # Zoology's figure-2 configs fill the non-query positions with 0 (`random_non_queries=False`):
    # random filler draws keys by chance, which the model must learn to ignore, and a 2-layer
    # attention model then needs several times more steps to leave the one-query-in-four plateau
    random_non_queries: bool = False

    def check(self) -> None:
        for name in ("seq_len", "num_kv_pairs", "vocab_size", "steps", "batch_size", "test_examples"):
            check_int(f"MQAR {name}", getattr(self, name), 1)
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise SpeedlmError(f"MQAR lr must be positive, got {self.lr!r}")
        # the generator's own checks (room for the pairs, enough distinct keys)
        mqar_batch(1, self.seq_len, self.num_kv_pairs, self.vocab_size, torch.Generator().manual_seed(0))

    def describe(self) -> str:
        return f"T={self.seq_len}, {self.num_kv_pairs} pairs, vocab {self.vocab_size}"

    def batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """`n` examples of this task."""
        return mqar_batch(n, self.seq_len, self.num_kv_pairs, self.vocab_size, generator,
                          random_non_queries=self.random_non_queries)

    def stream(self) -> MQARStream:
        """This task as a training stream."""
        return MQARStream(self.vocab_size, self.num_kv_pairs, random_non_queries=self.random_non_queries)


def recall_config(spec, setting: RecallSetting, width: int | None = None, heads: int | None = None) -> ModelConfig:
    """The architecture of `spec` (preset name or config) on the MQAR task: its layer pattern
    and mixers, the MQAR vocabulary, room for the sequence, and optionally another width and
    number of heads (Zoology's figure 2 sweeps the width with one head, so that the state grows
    with the width and an attention head is wide enough to match keys; mixers that size their
    heads themselves, such as Mamba-2's head_dim, keep doing so).

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
    n_heads = cfg.n_heads if heads is None else check_int("heads", heads, 1)
    d = cfg.d_model if width is None else width
    if d % n_heads or (d // n_heads) % 2:
        raise SpeedlmError(
            f"width {d} does not split into {n_heads} heads of even size"
            f"{' (the preset' + chr(39) + 's n_heads)' if heads is None else ''}; use a multiple of {2 * n_heads}"
        )
    fields["n_heads"] = n_heads
    for layer in (fields.get("layers") or {}).values():  # grouped-query sharing never has more groups than heads
        mixer = layer.get("mixer") or {}
        if isinstance(mixer.get("kv_heads"), int) and mixer["kv_heads"] > n_heads:
            mixer["kv_heads"] = n_heads
    if width is not None:
        fields["d_model"] = width
        fields["ffn_hidden"] = None  # the FFN follows the width
    return ModelConfig.from_dict(fields)


@torch.no_grad()
def recall_accuracy(model, setting: RecallSetting, seed: int = 0, device=None, chunk: int = 128) -> float:
    """Accuracy on `setting.test_examples` held-out MQAR examples (see TEST_SEED_OFFSET)."""
    g = torch.Generator().manual_seed(TEST_SEED_OFFSET + seed)
    x, y = setting.batch(setting.test_examples, g)
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
    x, _ = setting.batch(1, g)
    was_training = model.training
    model.eval()
    try:
        cache = model.init_cache()
        model(x.to(next(model.parameters()).device), cache)
        return cache.nbytes()
    finally:
        model.train(was_training)


# The learning curve's held-out examples (the test set, up to CURVE_EXAMPLES of it, scored along
# training, so that a run stopped because a checkpoint reached `stop_at` reports that score: 128
# examples stopped runs at 0.99 that scored 0.981 on all 512), and what counts as still learning:
# more than RISING accuracy gained over the last quarter of the steps, or a curve flat (within
# FLAT, or the scores' own noise) over its second half below SOLVED accuracy (a plateau: MQAR
# models often sit on one, at about one query in four, before they find the recall circuit, so
# the number says when training stopped, not what the architecture can hold).
CURVE_EXAMPLES = 512
RISING = 0.05
FLAT = 0.02
FLAT_SES = 4.5
SOLVED = 0.9


def learning_flag(curve: list[tuple[int, float]], queries: int | None = None) -> str | None:
    """'rising', 'plateau' or None (converged) for a held-out accuracy curve [(step, accuracy)].
    `queries`: how many queries each point scores; flat then means a range within FLAT or
    FLAT_SES binomial standard errors of one point, whichever is wider: the points of a curve
    that does not move scatter like independent scores, and the range of ten such scores is
    about 3.1 standard errors on average and above 4.5 in about 5 % of curves (512 examples of 4
    queries at 0.27 scatter by 0.0098 per point: GLA's 0.25-0.29 over 1,000 steps is flat)."""
    if len(curve) < 4:
        return None
    accs = [a for _, a in curve]
    if accs[-1] - accs[(3 * len(accs)) // 4 - 1] > RISING:
        return "rising"
    second_half = accs[len(accs) // 2:]
    flat = FLAT
    if queries:
        p = min(max(accs[-1], 0.0), 1.0)
        flat = max(FLAT, FLAT_SES * math.sqrt(p * (1 - p) / queries))
    if accs[-1] < SOLVED and max(second_half) - min(second_half) <= flat:
        return "plateau"
    return None


def train_recall(cfg: ModelConfig, setting: RecallSetting, *, seed: int = 0, device="auto", dtype: str = "auto",
                 peak_flops: float | None = None, on_step=None, out_dir: str | None = None,
                 checkpoints: int = 0, stop_at: float | None = None) -> dict:
    """Train a fresh model of `cfg` on MQAR and score it. Nothing is written to disk unless
    `out_dir` is given: then the run checkpoints there and continues from its last checkpoint
    when called again (a killed `speedlm compare` resumes its MQAR stage). `checkpoints` > 0
    scores CURVE_EXAMPLES held-out examples at that many evenly spaced steps: the result gets
    the learning curve and its `learning_flag`. `stop_at` (with checkpoints): stop at the first
    checkpoint whose score reaches it (the task is solved; more steps cannot raise the number
    much, only the bill); `solved_at` is then that step and the run carries no flag."""
    from speedlm.train import train

    if stop_at is not None and not checkpoints:
        raise SpeedlmError("stopping once solved needs checkpoints > 0 (the scores it stops on)")
    torch.manual_seed(seed)
    model = build_model(cfg)
    curve: list[tuple[int, float]] = []
    solved = {"at": None}
    if checkpoints:
        marks = {max(1, round(setting.steps * (i + 1) / checkpoints)) for i in range(checkpoints)}
        probe = dataclasses.replace(setting, test_examples=min(CURVE_EXAMPLES, setting.test_examples))
        user_step = on_step

        def on_step(k, _user=user_step):
            if k in marks:
                curve.append((k, recall_accuracy(model, probe, seed)))
            if _user is not None:
                _user(k)

    def stop_when(k):
        if stop_at is not None and curve and curve[-1][0] == k and curve[-1][1] >= stop_at:
            solved["at"] = k
        return solved["at"] is not None

    persist = out_dir is not None
    tcfg = TrainConfig(
        steps=setting.steps, batch_size=setting.batch_size, seq_len=setting.seq_len, lr=setting.lr,
        warmup_steps=max(1, setting.steps // 10), weight_decay=0.0, eval_every=0,
        save_every=max(1, setting.steps // 4) if persist else 0, keep=1,
        seed=seed, device=str(device), dtype=dtype, peak_flops=peak_flops, out_dir=out_dir or tempfile.gettempdir(),
    )
    resume = persist and os.path.exists(os.path.join(out_dir, "latest"))
    summary = train(model, tcfg, setting.stream(), progress=False,
                    on_step=on_step, persist=persist, resume=resume, stop_when=stop_when)
    accuracy = recall_accuracy(model, setting, seed)
    return {
        "accuracy": accuracy,
        "state_bytes": int(model.state_bytes(setting.seq_len, 1, 4)),  # analytic, at the learned values
        "cache_bytes": recall_cache_bytes(model, setting, seed),  # measured
        "params": model.num_params(),
        "steps": summary["step"],
        "final_loss": summary["loss"],
        "train_tok_per_s": summary["tok_per_s"],
        **({"curve": curve, "solved_at": solved["at"],
            "flag": None if solved["at"] else learning_flag(curve, min(CURVE_EXAMPLES, setting.test_examples) * setting.num_kv_pairs)}
           if checkpoints else {}),
    }


def _recall_job(job: dict) -> dict:
    """One (preset, width, setting, learning rate) run; a failure is a row, not a lost sweep.
    A module-level function so that worker processes can run it."""
    try:
        return {"status": "ok", **train_recall(
            ModelConfig.from_dict(job["config"]), job["setting"], seed=job["seed"], device=job["device"],
            dtype=job["dtype"], checkpoints=job["checkpoints"], stop_at=job["stop_at"], on_step=job.get("on_step"))}
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - one failed setting must not lose the others
        return {"status": "failed", "reason": one_line(e)}


def _worker_threads(threads: int, parent: int) -> None:
    torch.set_num_threads(threads)
    _die_with_parent(parent)


def _die_with_parent(parent: int) -> None:
    """Linux: this worker gets SIGTERM when the process that started it (`parent`) dies, so a
    benchmark killed with SIGTERM or SIGKILL leaves no trainings running (Ctrl-C reaches them
    anyway); measured before: two workers of a killed sweep trained on for ten minutes. A
    parent that died while this worker was still starting sent no signal: then it exits now,
    before it reads a queued run."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        os._exit(1)


def _run_jobs(groups: list[list[dict]], workers: int, bar) -> list[list[dict | None]]:
    """Each group is one setting at its learning rates, in order: a rate runs only while no
    earlier rate solved the setting (a solved run scores at least `stop_at`, so another rate can
    add at most 1 - stop_at; its result is None, skipped). Runs go in this process (the bar
    follows each step) or in `workers` processes that split this machine's threads (the bar
    follows finished runs). Each run is a function of its seed, so the order they finish in
    changes nothing."""
    results: list[list[dict | None]] = [[None] * len(g) for g in groups]

    def skip_rest(gi: int, ji: int) -> None:
        bar.update(sum(job["setting"].steps for job in groups[gi][ji + 1:]))

    if workers == 1:
        for gi, group in enumerate(groups):
            for ji, job in enumerate(group):
                bar.set_postfix_str(job["label"], refresh=False)
                done_before = bar.n
                r = _recall_job({**job, "on_step": lambda k, base=done_before: bar.update(base + k - bar.n)})
                results[gi][ji] = r
                bar.update(done_before + job["setting"].steps - bar.n)
                progress_write(bar, _job_line(job, r))
                if r.get("solved_at"):
                    skip_rest(gi, ji)
                    break
        return results
    import concurrent.futures
    import multiprocessing

    threads = max(1, torch.get_num_threads() // workers)
    # spawn, not fork: a forked child would inherit this process's OpenMP and autograd threads
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_worker_threads, initargs=(threads, os.getpid())) as pool:
        running = {pool.submit(_recall_job, group[0]): (gi, 0) for gi, group in enumerate(groups)}
        while running:
            done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                gi, ji = running.pop(future)
                job, r = groups[gi][ji], future.result()
                results[gi][ji] = r
                bar.update(job["setting"].steps)
                progress_write(bar, _job_line(job, r))
                if r.get("solved_at"):
                    skip_rest(gi, ji)
                elif ji + 1 < len(groups[gi]):
                    running[pool.submit(_recall_job, groups[gi][ji + 1])] = (gi, ji + 1)
    return results


def _job_line(job: dict, r: dict) -> str:
    if r["status"] != "ok":
        return f"{job['label']} lr {job['setting'].lr:g}: failed: {r['reason']}"
    state = f" [{r['flag']}]" if r.get("flag") else (f" (solved at step {r['solved_at']})" if r.get("solved_at") else "")
    return f"{job['label']} lr {job['setting'].lr:g}: accuracy {r['accuracy']:.3f}{state}"


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
    heads: int | None = None,
    stop_at: float | None = None,
    random_non_queries: bool = False,
    workers: int = 1,
) -> dict:
    """Every preset x width x length x pairs (skipping lengths < 4 x pairs, where the pairs and
    their queries do not fit); prints the table and writes JSON, Markdown and a plot.

    Zoology's protocol: each setting trains once per learning rate in `lrs` (default: `lr`
    alone) and reports the best held-out accuracy, with every learning rate's beside it; the
    best run's learning curve (`checkpoints` held-out scores along training) flags a setting
    still rising at the end or sitting on a plateau (`learning_flag`), so a number that only
    says when training stopped is not read as the architecture's capacity. `heads` (None: the
    preset's) gives every model that many heads, `stop_at` ends a run at the first checkpoint
    that scores it, and `workers` runs that many trainings at once in separate processes."""
    lrs = [lr] if lrs is None else list(lrs)
    if not lrs or not all(isinstance(v, (int, float)) and v > 0 for v in lrs):
        raise SpeedlmError(f"learning rates must be positive numbers, got {lrs!r}")
    check_int("checkpoints", checkpoints, 0)
    check_int("workers", workers, 1)
    if stop_at is not None and not (isinstance(stop_at, (int, float)) and 0 < stop_at <= 1):
        raise SpeedlmError(f"stop_at must be an accuracy in (0, 1], got {stop_at!r}")
    if stop_at is not None and not checkpoints:
        raise SpeedlmError("stopping once solved needs checkpoints > 0 (the scores it stops on)")
    presets = check_presets(presets)
    lengths, pairs, widths = check_ints("lengths", lengths), check_ints("pairs", pairs), check_ints("widths", widths)
    dev = resolve_device(device)
    amp = TrainConfig(dtype=dtype).autocast_dtype(dev)  # an unknown or unsupported dtype fails before any work
    settings = [
        RecallSetting(n, p, vocab_size, steps, batch_size, lr, test_examples, random_non_queries)
        for n in lengths for p in pairs if n >= 4 * p
    ]
    if not settings:
        raise SpeedlmError(f"no length in {lengths} holds any pair count in {pairs} (MQAR needs length >= 4 x pairs)")
    for s in settings:
        s.check()
    configs = {(p, w, s): recall_config(p, s, w, heads) for p in presets for w in widths for s in settings}  # errors before work
    os.makedirs(out_dir, exist_ok=True)

    groups = [
        [{"config": cfg.to_dict(), "setting": dataclasses.replace(key[2], lr=rate), "seed": seed,
          "device": str(dev), "dtype": dtype, "checkpoints": checkpoints, "stop_at": stop_at,
          "label": f"{key[0]} d={key[1]} {key[2].describe()}"} for rate in lrs]
        for key, cfg in configs.items()
    ]
    bar = progress_bar(total=len(groups) * len(lrs) * steps, desc="bench recall", disable=not progress, unit="step")
    try:
        results = _run_jobs(groups, min(workers, len(groups)), bar)
    finally:
        bar.close()

    rows = []
    for (p, w, s), group, done in zip(configs, groups, results):
        row = {"preset": p, "width": w, "seq_len": s.seq_len, "pairs": s.num_kv_pairs}
        runs = {job["setting"].lr: r for job, r in zip(group, done) if r is not None and r["status"] == "ok"}
        if runs:  # the best learning rate's run, every rate's accuracy beside it
            best = max(runs, key=lambda r: (runs[r]["accuracy"], -r))
            row.update(runs[best], lr=best, accuracy_by_lr={str(r): v["accuracy"] for r, v in runs.items()},
                       skipped_lrs=[job["setting"].lr for job, r in zip(group, done) if r is None])
        else:
            row.update(next(r for r in done if r is not None))
        rows.append(row)

    result = {
        "meta": {
            "command": "speedlm bench recall",
            "presets": presets, "lengths": lengths, "pairs": pairs, "widths": widths,
            "steps": steps, "batch_size": batch_size, "lr": lr, "lrs": lrs, "checkpoints": checkpoints,
            "heads": heads, "stop_at": stop_at, "random_non_queries": random_non_queries, "workers": workers,
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
    heads = m.get("heads")
    stop = m.get("stop_at")
    lines = [
        "# MQAR associative recall",
        "",
        f"Trained up to {m['steps']} steps x {m['batch_size']} sequences at each learning rate of "
        f"{', '.join(f'{v:g}' for v in m.get('lrs') or [m['lr']])} (the best held-out accuracy is reported), "
        f"vocab {m['vocab_size']}, {'random' if m.get('random_non_queries') else 'zero'} filler between the queries, "
        f"{'the preset' + chr(39) + 's heads' if not heads else f'{heads} head(s) in every model'}; accuracy on "
        f"{m['test_examples']} held-out examples; {m['device']} {m['dtype']}, seed {m['seed']}.",
        "State KiB: the inference state after the sequence, in float32. Steps: how many the best run trained"
        + (f"; \"solved\" when it stopped at the first checkpoint scoring {stop:g}, and the learning rates after a "
           f"solved run are skipped (they could add at most {1 - stop:.2g})" if stop else "") + ". "
        "Flag: the best run's held-out accuracy was "
        f"still rising over the last quarter of training (by more than {RISING}), or sat on a plateau below "
        f"{SOLVED} (flat over the second half within {FLAT} or {FLAT_SES:g} binomial standard errors of a score, "
        "whichever is wider): that number says when training stopped, not what the architecture can hold.",
        "",
        "| preset | width | length | pairs | accuracy | best lr | by lr | steps | flag | state KiB | params |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["results"]:
        if r["status"] == "ok":
            acc, state, params = f"{r['accuracy']:.3f}", _kib(r["state_bytes"]), f"{r['params']:,}"
            lr = f"{r['lr']:g}" if "lr" in r else "-"
            by_lr = ", ".join([f"{float(k):g}: {v:.3f}" for k, v in (r.get("accuracy_by_lr") or {}).items()]
                              + [f"{v:g}: skipped" for v in r.get("skipped_lrs") or []]) or "-"
            flag = r.get("flag") or "-"
            steps = f"{r['steps']} (solved)" if r.get("solved_at") else str(r.get("steps", "-"))
        else:
            acc, state, params, lr, by_lr, flag, steps = f"failed: {r['reason']}", "-", "-", "-", "-", "-", "-"
        lines.append(f"| {r['preset']} | {r['width']} | {r['seq_len']} | {r['pairs']} | {acc} | {lr} | {by_lr} | "
                     f"{steps} | {flag} | {state} | {params} |")
    return "\n".join(lines) + "\n"


def plot_recall(rows: list[dict], path: str) -> str:
    """Accuracy vs state bytes (log x), Zoology's figure 2 shape: one panel per (length, pairs)
    setting, one line per preset through its widths (bench/styles.py's style). A point whose
    run was still rising or on a plateau (`flag`) is drawn hollow: it says when training
    stopped, not what the state can hold. A point that another covers is drawn larger, and
    points of different presets that coincide are named on the plot."""
    from speedlm.bench.styles import figure, grow_hidden, label_points, legend, plain_numbers, settle, styles_for

    ok = [r for r in rows if r["status"] == "ok"]
    settings = sorted({(r["seq_len"], r["pairs"]) for r in rows}) or [(0, 0)]
    fig, axes = figure(4.6 * len(settings) + 2, 4.0, len(settings))
    presets = list(dict.fromkeys(r["preset"] for r in rows))
    styles = styles_for({p: p for p in presets})
    panels = []
    for ax, (length, n) in zip(axes, settings):
        points = []
        for p in presets:
            mine = sorted((r for r in ok if (r["seq_len"], r["pairs"]) == (length, n) and r["preset"] == p),
                          key=lambda r: r["state_bytes"])
            if len(mine) > 1:  # the preset's widths, joined
                ax.plot([r["state_bytes"] for r in mine], [r["accuracy"] for r in mine], color=styles[p].colour,
                        linestyle=styles[p].linestyle, alpha=0.5, linewidth=1.2)
            for r in mine:
                hollow = {"markerfacecolor": "none"} if r.get("flag") else {}
                points += ax.plot([r["state_bytes"]], [r["accuracy"]], label=p, markersize=7, alpha=0.85,
                                  **{**styles[p].kw(), "linestyle": "none", **hollow})
        ax.set_xscale("log")
        ax.set_ylim(-0.02, 1.05)
        if not points:
            ax.text(0.5, 0.5, "no finished setting", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"T={length}, {n} key-value pairs" if length else "no setting")
        ax.set_xlabel("inference state (bytes, float32; log scale)")
        ax.set_ylabel("MQAR accuracy (hollow: still learning)")
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
