"""`speedlm compare`: which architecture, for my budget?

Each model is trained on the same data for the same training FLOPs (compare/plan.py), then
evaluated on the validation split, trained and scored on one MQAR setting, and measured for
inference speed and cache size; one report holds every number. Models run one after another
in one process, so the timing columns compare like with like on this machine.

A model that fails (diverges, runs out of memory, an invalid config) gets a row that says why
and the others still run; Ctrl-C writes the report of the models finished so far.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import re
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field

import torch

import speedlm
from speedlm.bench.common import check_int, check_ints, check_presets, one_line
from speedlm.bench.recall import RecallSetting, recall_config, train_recall
from speedlm.compare.inference import STATE_CONTEXTS, inference_flops, measure_inference, state_curve
from speedlm.compare.plan import BudgetTooSmall, ModelPlan, check_match, plan_model
from speedlm.compare.plots import write_plots
from speedlm.compare.report import REPORT_JSON, REPORT_MD, leaderboard_markdown, write_report
from speedlm.data.cachedir import is_writable_dir
from speedlm.data.separators import record_separators
from speedlm.device import resolve_device
from speedlm.errors import SpeedlmError
from speedlm.models import build_model, resolve_config
from speedlm.models.build import require_language_model
from speedlm.models.presets import split_preset_name
from speedlm.progress import progress_bar, progress_write
from speedlm.schema import is_number
from speedlm.train.config import TrainConfig
from speedlm.train.hardware_peak import machine_key

# One representative per registered family (a family issue that lands adds its own).
DEFAULT_PRESETS = (
    "transformer-tiny",
    "gqa-tiny",
    "sliding-window-tiny",
    "linear-attention-tiny",
    "linear-hybrid-tiny",
    # the linear-time family (issue 7): the lowest validation loss of its nine presets at equal
    # FLOPs (BENCHMARKS.md, "Linear-time mixers"); Gated DeltaNet, second on loss and the one
    # that recalls, costs 2.5x its time per token on a CPU and would push the default job past
    # 10 minutes
    "hgrn-tiny",
    # state space (issue 8): Mamba-2, whose SSD runs as matrix products (14x its sequential scan
    # on a CPU, where Mamba-1's element-wise scan gains 2-6x), and Samba, the hybrid that fits a
    # 2-layer tiny model (Mamba + sliding window; Jamba's 8-layer block does not)
    "mamba2-tiny",
    "samba-tiny",
    # conditional computation (issue 11): Mixtral's 8 experts, top-2, matched on active
    # parameters and trained for the same (active) FLOPs; and Mixture-of-Depths on the
    # transformer (every other block routed at 12.5%)
    "mixtral-tiny",
    "mod-tiny",
    # dynamic sparse attention (issue 12): adaptive span, the lowest loss of the sparse and memory
    # compare and full MQAR recall with a 31 KiB cache; and the masked diffusion LM (issue 14),
    # whose row is its NELBO bound (it has no MQAR or decode rows)
    "adaptive-span-tiny",
    "mdlm-tiny",
)
# Training FLOPs per model; with the defaults above the whole report takes about 10 minutes
# on 2 CPU cores of the AMD EPYC we measured (BENCHMARKS.md has the runs). Every model
# also pays a fixed 23-56 s of MQAR, so each family that joins lowers this.
DEFAULT_BUDGET = 0.5e12
# One MQAR setting per model: long enough that a 32-token window cannot see every pair, small
# enough (vocabulary 32) that attention learns it in the steps given (tests/slow).
DEFAULT_MQAR = RecallSetting(seq_len=64, num_kv_pairs=4, vocab_size=32, steps=800, batch_size=32, lr=1e-3, test_examples=512)
DEFAULT_CONTEXTS = (1024, 4096, 16384)

# Report fields that are measured times (everything else repeats exactly with the same seed).
TIMING_FIELDS = ("train_tok_per_s", "train_flops_per_s", "mfu", "prefill_tok_s", "decode_ms", "seconds", "mqar_tok_per_s")


@dataclass
class CompareOptions:
    presets: list = field(default_factory=lambda: list(DEFAULT_PRESETS))
    budget: float = DEFAULT_BUDGET  # training FLOPs per model
    data: str = "stdlib"
    tokenizer: str = "byte"
    vocab_size: int | None = None  # BPE vocabulary
    out_dir: str = "runs/compare"
    seq_len: int = 256
    batch_size: int = 16
    lr: float = 3e-3
    warmup_fraction: float = 0.05
    min_lr_ratio: float = 0.1
    eval_points: int = 8  # validation losses along training (the loss-vs-FLOPs curve)
    eval_batches: int = 8  # batches per validation along training
    final_eval_batches: int = 40  # batches of the final validation loss in the table
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    peak_flops: float | None = None
    match: str = "first"
    mqar: RecallSetting | None = DEFAULT_MQAR
    contexts: tuple = DEFAULT_CONTEXTS
    decode_tokens: int = 16
    command: str = ""


# ----------------------------------------------------------------------------- checks


def _check_options(o: CompareOptions) -> None:
    o.presets = check_presets(o.presets)
    for name in o.presets:
        if not (name.endswith(".json") and os.path.isfile(name)):
            split_preset_name(name)  # unknown preset: one line, before any work
    if not (is_number(o.budget) and o.budget > 0 and o.budget != float("inf")):
        raise SpeedlmError(f"--budget must be a positive number of training FLOPs per model (e.g. 1e12), got {o.budget!r}")
    for name in ("seq_len", "batch_size", "eval_points", "eval_batches", "final_eval_batches", "decode_tokens"):
        check_int(name, getattr(o, name), 1)
    check_int("seed", o.seed, 0)
    if not (is_number(o.lr) and o.lr > 0):
        raise SpeedlmError(f"--lr must be positive, got {o.lr!r}")
    o.contexts = tuple(check_ints("contexts", o.contexts))
    check_match(o.match)
    if o.mqar is not None:
        o.mqar.check()
    if not is_writable_dir(o.out_dir):
        raise SpeedlmError(f"output folder {o.out_dir} is not writable; choose another --out")


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(name).removesuffix(".json"))


def _environment(o: CompareOptions, dev: torch.device, train_dtype: torch.dtype | None, corpus) -> dict:
    return {
        "command": o.command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_key(dev, train_dtype or torch.float32).split(" | ")[0],
        "device": str(dev),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "speedlm": speedlm.__version__,
        "threads": torch.get_num_threads(),
        "data": {"spec": o.data, "name": corpus.name, "files": corpus.files, "fingerprint": corpus.fingerprint},
        "options": {
            k: (dataclasses.asdict(v) if dataclasses.is_dataclass(v) else list(v) if isinstance(v, tuple) else v)
            for k, v in dataclasses.asdict(o).items()
            if k != "command"
        },
    }


# ----------------------------------------------------------------------------- one model


def _train_config(o: CompareOptions, plan: ModelPlan, out_dir: str) -> TrainConfig:
    steps = plan.steps
    return TrainConfig(
        steps=steps,
        batch_size=o.batch_size,
        seq_len=o.seq_len,
        lr=o.lr,
        warmup_steps=min(steps, max(1, round(o.warmup_fraction * steps))),
        min_lr_ratio=o.min_lr_ratio,
        eval_every=max(1, steps // o.eval_points),
        eval_batches=o.eval_batches,
        save_every=0,
        keep=1,
        seed=o.seed,
        device=o.device,
        dtype=o.dtype,
        peak_flops=o.peak_flops,
        log_every=max(1, min(10, steps)),
        out_dir=out_dir,
    )


def _run_model(o: CompareOptions, plan: ModelPlan, data: dict, dev, infer_dtype, advance) -> dict:
    from speedlm.data import TokenStream
    from speedlm.train import evaluate, train

    row: dict = {"seconds": {}}
    t0 = time.perf_counter()
    run_dir = os.path.join(o.out_dir, "models", _safe_name(plan.name))
    if os.path.isdir(run_dir):
        shutil.rmtree(run_dir)  # compare's own run folder from an earlier report: start afresh
    torch.manual_seed(o.seed)
    model = build_model(plan.config)
    cfg = _train_config(o, plan, run_dir)
    per_step = plan.flops_per_token * o.batch_size * o.seq_len
    summary = train(
        model, cfg, TokenStream(data["train_ids"]), data["val_ids"], tokenizer=data["tokenizer"], progress=False,
        data_info=data["info"], on_step=lambda _: advance(per_step),
    )
    tokens_per_step = o.batch_size * o.seq_len
    row["curve"] = [
        {"step": r["step"], "train_flops": r["step"] * tokens_per_step * plan.flops_per_token, "val_loss": r["val_loss"]}
        for r in summary["history"]
        if r.get("val_loss") is not None
    ]
    final = evaluate(model, data["val_ids"], o.batch_size, o.seq_len, o.final_eval_batches, dev, cfg.autocast_dtype(dev))
    row.update(
        checkpoint=summary["checkpoint"],
        train_loss=summary["loss"],
        val_loss=final["loss"],
        val_ppl=final["ppl"],
        val_tokens=final["tokens"],
        train_tok_per_s=summary["tok_per_s"],
        train_flops_per_s=summary["flops_per_s"],
        mfu=summary["mfu"],
        peak_flops=summary["peak_flops"],
        peak_source=summary["peak_source"],
    )
    row["seconds"]["train"] = time.perf_counter() - t0
    del model

    row["bound"] = plan.config.objective == "diffusion"  # its val loss is the NELBO, an upper bound
    if o.mqar is not None and plan.config.objective == "ar":  # MQAR scores next-token recall
        t1 = time.perf_counter()
        mcfg = recall_config(plan.config, o.mqar)
        mqar_step = _train_flops_per_token(mcfg, o.mqar.seq_len) * o.mqar.batch_size * o.mqar.seq_len
        recall = train_recall(mcfg, o.mqar, seed=o.seed, device=dev, dtype=o.dtype, peak_flops=o.peak_flops,
                              on_step=lambda _: advance(mqar_step))
        row.update(mqar_accuracy=recall["accuracy"], mqar_state_bytes=recall["state_bytes"],
                   mqar_tok_per_s=recall["train_tok_per_s"])
        row["seconds"]["mqar"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    elem = torch.tensor([], dtype=infer_dtype).element_size()
    per_context = {n: inference_flops(plan.config, [n], o.decode_tokens) for n in o.contexts}
    inf = measure_inference(plan.config, o.contexts, o.decode_tokens, dev, infer_dtype, seed=o.seed,
                            on_context=lambda n: advance(per_context[n]))
    row.update(
        prefill_tok_s=inf["prefill_tok_s"],
        decode_ms=inf["decode_ms"],
        cache_bytes=inf["cache_bytes"],
        inference_errors=inf["errors"],
        state_bytes=state_curve(plan.config, elem, sorted(set(STATE_CONTEXTS) | set(o.contexts))),
        state_dtype=str(infer_dtype).removeprefix("torch."),
    )
    row["seconds"]["inference"] = time.perf_counter() - t2
    row["seconds"]["total"] = time.perf_counter() - t0
    return row


def _train_flops_per_token(cfg, seq_len: int) -> float:
    with torch.device("meta"):
        return build_model(cfg).flops_per_token(seq_len, training=True)


def _finished_line(i: int, n: int, name: str, row: dict) -> str:
    if row["status"] != "ok":
        return f"[{i}/{n}] {name}: {row['status']}: {row.get('reason', '')}"
    parts = [
        f"[{i}/{n}] {name}: d={row['d_model']}, {row['params']:,} params",
        f"val {'NELBO' if row.get('bound') else 'loss'} {row['val_loss']:.4f} (ppl {'<= ' if row.get('bound') else ''}{row['val_ppl']:.2f})",
    ]
    if "mqar_accuracy" in row:
        parts.append(f"MQAR {row['mqar_accuracy']:.3f}")
    parts.append(f"train {row['train_tok_per_s']:,.0f} tok/s")
    dec = row.get("decode_ms", {})
    if dec:
        parts.append("decode " + "/".join(f"{v:.2f}" for v in dec.values()) + " ms/token")
    parts.append(f"{row['seconds']['total']:.0f} s")
    return ", ".join(parts)


# ----------------------------------------------------------------------------- the job


def run_compare(o: CompareOptions, progress: bool = True) -> dict:
    """Run the comparison (see module doc); returns the report dict (report.json's content)
    plus "files". Raises SpeedlmError for bad arguments before any training; re-raises
    KeyboardInterrupt after writing the report of the models finished so far."""
    from speedlm.data import encode_corpus, load_corpus, make_tokenizer, require_tokens

    _check_options(o)
    dev = resolve_device(o.device)
    probe = TrainConfig(dtype=o.dtype, device=o.device, peak_flops=o.peak_flops)  # validates dtype and peak
    train_dtype = probe.autocast_dtype(dev)
    infer_dtype = train_dtype or torch.float32

    corpus = load_corpus(o.data)
    tokenizer = make_tokenizer(o.tokenizer, corpus, o.vocab_size)
    train_ids, val_ids = encode_corpus(corpus, tokenizer)
    require_tokens(len(val_ids), o.seq_len, "validation set")
    data = {
        "train_ids": train_ids, "val_ids": val_ids, "tokenizer": tokenizer,
        "info": {"spec": o.data, "name": corpus.name, "fingerprint": corpus.fingerprint},
    }
    print(f"data: {corpus.name}: {corpus.files} files, fingerprint {corpus.fingerprint}; "
          f"{tokenizer.spec()['kind']} tokenizer ({tokenizer.vocab_size} tokens): "
          f"{len(train_ids):,} train / {len(val_ids):,} validation tokens")

    # ----- plans: widths and steps; bad arguments fail here, broken configs become rows -----
    rows: dict[str, dict] = {}
    plans: list[ModelPlan] = []
    too_small: list[str] = []
    target = None
    for name in o.presets:
        try:
            cfg = resolve_config(name) if name.endswith(".json") else resolve_config(name, vocab_size=tokenizer.vocab_size)
            cfg.check_vocab(tokenizer.vocab_size, "compare tokenizer")
            require_language_model(cfg, name, diffusion=True)
            cfg = record_separators(cfg, tokenizer)
        except SpeedlmError as e:  # a broken config is this model's failure, not the job's
            rows[name] = {"name": name, "status": "failed", "reason": f"config: {e}"}
            continue
        if o.seq_len > cfg.max_seq_len:
            raise SpeedlmError(f"--seq-len {o.seq_len} is longer than {name} can hold (max_seq_len={cfg.max_seq_len})")
        first = o.match == "first" and target is None
        try:
            plan = plan_model(name, cfg, o.budget, o.batch_size, o.seq_len, None if first else target)
        except BudgetTooSmall as e:
            too_small.append(str(e))
            continue
        except SpeedlmError as e:
            rows[name] = {"name": name, "status": "failed", "reason": f"config: {e}"}
            continue
        if first:
            target = plan.params_active_non_embedding
        plans.append(plan)
        rows[name] = {"name": name, "status": "pending", **plan.to_dict()}
    if too_small:
        raise SpeedlmError(too_small[0] + (f" (and {len(too_small) - 1} more models)" if len(too_small) > 1 else ""))

    _print_plan(plans, o, target)
    env = _environment(o, dev, train_dtype, corpus)
    env["train_dtype"] = str(train_dtype or torch.float32).removeprefix("torch.")
    os.makedirs(o.out_dir, exist_ok=True)
    errors_log = os.path.join(o.out_dir, "errors.log")
    if os.path.exists(errors_log):
        os.remove(errors_log)

    def work_of(plan: ModelPlan) -> float:
        w = plan.train_flops
        if o.mqar is not None and plan.config.objective == "ar":
            mcfg = recall_config(plan.config, o.mqar)
            w += _train_flops_per_token(mcfg, o.mqar.seq_len) * o.mqar.batch_size * o.mqar.seq_len * o.mqar.steps
        return w + inference_flops(plan.config, o.contexts, o.decode_tokens)

    works = {p.name: work_of(p) for p in plans}
    bar = progress_bar(total=sum(works.values()), desc="compare", unit="FLOP", unit_scale=True, disable=not progress)
    interrupted = False
    try:
        for i, plan in enumerate(plans, 1):
            start_n = bar.n
            bar.set_postfix_str(f"{plan.name} ({i}/{len(plans)})", refresh=False)
            row = rows[plan.name]

            def advance(amount, _bar=bar):
                _bar.update(amount)

            try:
                row.update(_run_model(o, plan, data, dev, infer_dtype, advance))
                row["status"] = "ok"
            except KeyboardInterrupt:
                row.update(status="interrupted", reason="Ctrl-C")
                interrupted = True
            except Exception as e:  # noqa: BLE001 - one failing model must not lose the others
                row.update(status="failed", reason=one_line(e))
                with open(errors_log, "a") as f:
                    f.write(f"== {plan.name}\n{traceback.format_exc()}\n")
            bar.update(max(0.0, start_n + works[plan.name] - bar.n))
            progress_write(bar, _finished_line(i, len(plans), plan.name, row))
            if interrupted:
                break
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()

    for row in rows.values():
        if row["status"] == "pending":
            row.update(status="not run", reason="interrupted before it started")
    report = {"meta": env, "models": [rows[n] for n in o.presets]}
    plots = write_plots(report, o.out_dir)
    files = {**write_report(report, o.out_dir, plots), **plots}
    report["files"] = files
    print(leaderboard_markdown(report))
    print(f"wrote {', '.join(files.values())}")
    if interrupted:
        raise KeyboardInterrupt
    return report


def _print_plan(plans: list[ModelPlan], o: CompareOptions, target: int | None) -> None:
    tokens_per_step = o.batch_size * o.seq_len
    print(f"plan: {o.budget:.3g} training FLOPs per model, batches of {o.batch_size} x {o.seq_len} tokens "
          f"({tokens_per_step:,} per step), lr {o.lr}, seed {o.seed}")
    width = max([len(p.name) for p in plans] + [5])
    print(f"  {'model':<{width}}  d_model  params     active non-emb  vs first  MFLOP/token  steps   tokens")
    for p in plans:
        ratio = f"{p.params_active_non_embedding / target:.3f}" if target else "-"
        print(f"  {p.name:<{width}}  {p.width:<7}  {p.params:<9,}  {p.params_active_non_embedding:<14,}  {ratio:<8}  "
              f"{p.flops_per_token / 1e6:<11.3f}  {p.steps:<6}  {p.tokens:,}")
    sys.stdout.flush()


__all__ = ["CompareOptions", "DEFAULT_BUDGET", "DEFAULT_CONTEXTS", "DEFAULT_MQAR", "DEFAULT_PRESETS", "REPORT_JSON",
           "REPORT_MD", "TIMING_FIELDS", "run_compare"]
