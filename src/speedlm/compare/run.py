"""`speedlm compare`: which architecture, for my budget?

Each model is trained on the same data for the same training FLOPs (compare/plan.py), then
evaluated on the validation split, trained and scored on one MQAR setting, and measured for
inference speed and cache size; one report holds every number. Models run one after another
in one process, so the timing columns compare like with like on this machine.

A checkpoint folder among the presets is a pretrained entry (compare/pretrained.py): evaluated
as saved in its own tokens instead of trained, then measured like the others.

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
from speedlm.bench.flops import compare_model
from speedlm.bench.recall import RecallSetting, recall_config, train_recall
from speedlm.checkpoint import load_pretrained
from speedlm.checkpoint.pretrained import spec_config
from speedlm.compare.inference import STATE_CONTEXTS, inference_flops, learned_on, measure_inference, state_curve
from speedlm.compare.plan import (
    BudgetTooSmall, ModelPlan, check_match, plan_model, plan_pretrained, width_for_tokens_per_param,
)
from speedlm.compare.pretrained import (
    MQAR_SKIPPED, bits_per_byte, check_entry, checkpoint_identity, evaluation_flops, load_entry, own_val_ids,
    pretrained_inside, pretrained_stage, scored_bytes,
)
from speedlm.compare.plots import write_plots
from speedlm.compare.report import REPORT_JSON, REPORT_MD, leaderboard_markdown, pretrained_note, write_report
from speedlm.compare.resume import STAGES, load_plans, load_stages, open_plan, save_plan, save_stage
from speedlm.data.cachedir import is_writable_dir
from speedlm.data.separators import record_separators
from speedlm.device import resolve_device
from speedlm.errors import SpeedlmError
from speedlm.models import ModelConfig, build_model, resolve_config
from speedlm.models.build import is_checkpoint, require_language_model
from speedlm.models.presets import split_preset_name
from speedlm.ops.caches import clear_process_caches
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
    # compare, and full MQAR recall; and the masked diffusion LM (issue 14),
    # whose row is its NELBO bound (it has no MQAR or decode rows)
    "adaptive-span-tiny",
    "mdlm-tiny",
)
# Training FLOPs per model; with the defaults above the whole report takes about 7 minutes
# on 2 CPU cores of the AMD EPYC we measured (README, "The defaults, measured"). Every model
# also pays up to 32 s of the MQAR probe, so each family that joins lowers this.
DEFAULT_BUDGET = 0.5e12
# One MQAR setting per model, a probe proportionate to the language-model training beside it
# (issue 25: it cost about 1.3x that training; `speedlm bench recall` runs Zoology's full
# protocol). 48 tokens, so that a 32-token window cannot see every pair; vocabulary 32; one head
# and zero filler as in Zoology's figure 2 (with four heads of 16 and random filler, attention
# needed 800 steps of 24 sequences, now it recalls every query in 250-400 steps of 16); a run
# ends at the first of MQAR_CHECKPOINTS held-out scores that reaches MQAR_STOP_AT, and one still
# rising or on a plateau at the end is flagged in the report rather than read as capacity.
DEFAULT_MQAR = RecallSetting(seq_len=48, num_kv_pairs=4, vocab_size=32, steps=600, batch_size=16, lr=1e-3, test_examples=512)
MQAR_HEADS = 1
MQAR_CHECKPOINTS = 12
MQAR_STOP_AT = 0.99
DEFAULT_CONTEXTS = (1024, 4096, 16384)

# Report fields that are measured times (everything else repeats exactly with the same seed).
TIMING_FIELDS = ("train_tok_per_s", "train_flops_per_s", "mfu", "prefill_tok_s", "decode_ms", "seconds", "mqar_tok_per_s")


@dataclass
class CompareOptions:
    presets: list = field(default_factory=lambda: list(DEFAULT_PRESETS))
    budget: float | None = None  # training FLOPs per model (None: DEFAULT_BUDGET, unless time_budget)
    time_budget: float | None = None  # seconds of training per model on this machine, instead of FLOPs
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
    # the first model's width from a tokens-per-parameter ratio at this budget (None: its preset's);
    # the others are matched to it (compare/plan.py::width_for_tokens_per_param)
    tokens_per_param: float | None = None
    mqar: RecallSetting | None = DEFAULT_MQAR
    contexts: tuple = DEFAULT_CONTEXTS
    decode_tokens: int = 16
    compile_decode: bool = False  # the decode column through the compiled step (generate/compiled.py)
    command: str = ""
    resume: bool = False  # continue the run in out_dir (a rerun with the same arguments does anyway)


# ----------------------------------------------------------------------------- checks


def _check_options(o: CompareOptions) -> None:
    o.presets = check_presets(o.presets)
    for name in o.presets:
        if is_checkpoint(name):  # a pretrained entry (compare/pretrained.py)
            if pretrained_inside(name, o.out_dir):
                raise SpeedlmError(f"{name} is inside {os.path.join(o.out_dir, 'models')}, which compare rewrites; "
                                   "copy the checkpoint elsewhere or choose another --out")
        elif not (name.endswith(".json") and os.path.isfile(name)):
            split_preset_name(name)  # unknown preset: one line, before any work
    if o.time_budget is not None:
        if o.budget is not None:
            raise SpeedlmError("give either --budget (training FLOPs) or --time-budget (seconds), not both")
        if not (is_number(o.time_budget) and 0 < o.time_budget < float("inf")):
            raise SpeedlmError(f"--time-budget must be a positive number of seconds per model, got {o.time_budget!r}")
    elif o.budget is None:
        o.budget = DEFAULT_BUDGET
    elif not (is_number(o.budget) and o.budget > 0 and o.budget != float("inf")):
        raise SpeedlmError(f"--budget must be a positive number of training FLOPs per model (e.g. 1e12), got {o.budget!r}")
    for name in ("seq_len", "batch_size", "eval_points", "eval_batches", "final_eval_batches", "decode_tokens"):
        check_int(name, getattr(o, name), 1)
    check_int("seed", o.seed, 0)
    if not (is_number(o.lr) and o.lr > 0):
        raise SpeedlmError(f"--lr must be positive, got {o.lr!r}")
    o.contexts = tuple(check_ints("contexts", o.contexts))
    check_match(o.match)
    if o.tokens_per_param is not None:
        if not (is_number(o.tokens_per_param) and 0 < o.tokens_per_param < float("inf")):
            raise SpeedlmError(f"--tokens-per-param must be a positive number, got {o.tokens_per_param!r}")
        if o.time_budget is not None or o.match == "none":
            raise SpeedlmError("--tokens-per-param sizes models for a FLOP budget with --match-params first; "
                               "it cannot be used with --time-budget or --match-params none")
    if o.mqar is not None:
        o.mqar.check()
    if not is_writable_dir(o.out_dir):
        raise SpeedlmError(f"output folder {o.out_dir} is not writable; choose another --out")


def _safe_name(name: str) -> str:
    if is_checkpoint(name):  # the whole path: two runs' step folders share a basename
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.normpath(name).strip(os.sep + ".")) or "checkpoint"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(name).removesuffix(".json"))


def _options_dict(o: CompareOptions) -> dict:
    """The options that decide the numbers (not the command line, where the report goes, or
    whether it was resumed), JSON-able."""
    return {
        k: (dataclasses.asdict(v) if dataclasses.is_dataclass(v) else list(v) if isinstance(v, tuple) else v)
        for k, v in dataclasses.asdict(o).items()
        if k not in ("command", "out_dir", "resume")
    }


def calibrate_steps(plan: ModelPlan, o: CompareOptions, data: dict) -> int:
    """The optimizer steps `plan`'s model takes in `o.time_budget` seconds of training on this
    machine: a few untimed-then-timed steps of a throwaway copy (the first window is warm-up)."""
    from speedlm.data import TokenStream
    from speedlm.train import train

    clear_process_caches()
    torch.manual_seed(o.seed)
    probe = dataclasses.replace(plan, steps=4, train_flops_budget=None)
    cfg = dataclasses.replace(_train_config(o, probe, os.path.join(o.out_dir, "calibration")), eval_every=0,
                              save_every=0, log_every=1, warmup_steps=1)
    summary = train(build_model(plan.config), cfg, TokenStream(data["train_ids"]), progress=False, persist=False)
    step_s = o.batch_size * o.seq_len / summary["tok_per_s"]
    return max(1, int(o.time_budget / step_s))


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
        "options": {**_options_dict(o), "out_dir": o.out_dir},
    }


# ----------------------------------------------------------------------------- one model


def _train_config(o: CompareOptions, plan: ModelPlan, out_dir: str) -> TrainConfig:
    steps = plan.steps
    eval_every = max(1, steps // o.eval_points)
    return TrainConfig(
        steps=steps,
        batch_size=o.batch_size,
        seq_len=o.seq_len,
        lr=o.lr,
        warmup_steps=min(steps, max(1, round(o.warmup_fraction * steps))),
        min_lr_ratio=o.min_lr_ratio,
        eval_every=eval_every,
        eval_batches=o.eval_batches,
        save_every=eval_every,  # a killed compare continues from here (compare/resume.py)
        keep=1,
        seed=o.seed,
        device=o.device,
        dtype=o.dtype,
        peak_flops=o.peak_flops,
        log_every=max(1, min(10, steps)),
        # FLOP budgets are spent at the cost each step ran at (adaptive span: its spans as they
        # grow); a time budget fixed the steps when it planned them
        flop_budget=plan.train_flops_budget,
        out_dir=out_dir,
    )


def _run_model(o: CompareOptions, plan: ModelPlan, data: dict, dev, infer_dtype, advance, reuse: bool) -> dict:
    """Train, score on MQAR and measure one model, stage by stage; the stages an earlier run of
    the same plan finished (`reuse`) are read back instead of run again. A pretrained entry is
    evaluated instead of trained, and has the zero-shot MQAR probe only (compare/pretrained.py)."""
    clear_process_caches()  # no model pays for, or profits from, another's plans and tables
    run_dir = os.path.join(o.out_dir, "models", _safe_name(plan.name))
    if not reuse and os.path.isdir(run_dir):
        shutil.rmtree(run_dir)  # compare's own run folder from an earlier report: start afresh
    stages = load_stages(run_dir) if reuse else {}
    trained, text = None, data["val_ids"]  # the model, and the text its inference reads (its own tokens)
    if plan.pretrained:
        if "pretrained" in stages:
            advance(evaluation_flops(plan, o))
        else:
            trained, text, results = pretrained_stage(o, plan, data["corpus"], data["tokenizer"], dev,
                                                      data["autocast_dtype"])
            advance(evaluation_flops(plan, o))
            save_stage(run_dir, stages, "pretrained", results)
    elif "train" in stages:
        advance(plan.train_flops)
    else:
        trained, results = _train_stage(o, plan, data, dev, run_dir, advance)
        save_stage(run_dir, stages, "train", results)

    # MQAR scores next-token recall of a model it trains: not a pretrained entry's weights
    if o.mqar is not None and plan.config.objective == "ar" and not plan.pretrained:
        if "mqar" in stages:
            advance(_mqar_work(plan, o))
        else:
            save_stage(run_dir, stages, "mqar", _mqar_stage(o, plan, dev, run_dir, advance))

    if "inference" in stages:
        advance(inference_flops(plan.config, o.contexts, o.decode_tokens))
    else:
        if trained is None and plan.pretrained:
            trained, tokenizer, _ = load_entry(plan.name, dev)
            text = own_val_ids(data["corpus"], tokenizer, o.seq_len, plan.name)
        elif trained is None:
            trained = load_pretrained(stages["train"]["checkpoint"], dev, tokenizer=False).model
        save_stage(run_dir, stages, "inference",
                   _inference_stage(o, plan, trained, text, dev, infer_dtype, advance))
    del trained

    row: dict = {"bound": plan.config.objective == "diffusion"}  # a diffusion LM's val loss is the NELBO bound
    if plan.pretrained and o.mqar is not None and plan.config.objective == "ar":
        row["mqar_skipped"] = MQAR_SKIPPED
    seconds = {}
    for stage in STAGES:
        if stage in stages:
            results = dict(stages[stage])
            seconds[stage] = results.pop("seconds")
            row.update(results)
    row["seconds"] = {**seconds, "total": sum(seconds.values())}
    return row


def _train_stage(o: CompareOptions, plan: ModelPlan, data: dict, dev, run_dir: str, advance):
    """Train (continuing from the last checkpoint a killed run left), then the final validation
    and the learned values on the trained weights: (the trained model, the stage's results)."""
    from speedlm.data import TokenStream
    from speedlm.train import evaluate, read_metrics, train

    t0 = time.perf_counter()
    torch.manual_seed(o.seed)
    model = build_model(plan.config)
    cfg = _train_config(o, plan, run_dir)
    per_step = plan.flops_per_token * o.batch_size * o.seq_len
    resume = os.path.exists(os.path.join(run_dir, "latest"))
    summary = train(
        model, cfg, TokenStream(data["train_ids"]), data["val_ids"], tokenizer=data["tokenizer"], progress=False,
        data_info=data["info"], on_step=lambda _: advance(per_step), resume=resume,
    )
    records = read_metrics(os.path.join(run_dir, "metrics.jsonl"))  # every step's, across a resume
    curve = [{"step": r["step"], "train_flops": r["flops"], "val_loss": r["val_loss"]} for r in records
             if r.get("val_loss") is not None]
    final = evaluate(model, data["val_ids"], o.batch_size, o.seq_len, o.final_eval_batches, dev, cfg.autocast_dtype(dev))
    val_bytes = scored_bytes(data["tokenizer"], data["val_ids"], final["tokens"])
    text = torch.as_tensor(data["val_ids"][: o.seq_len], dtype=torch.long)[None].to(dev)
    results = dict(
        checkpoint=summary["checkpoint"],
        curve=curve,
        train_loss=summary["loss"],
        val_loss=final["loss"],
        val_ppl=final["ppl"],
        val_tokens=final["tokens"],
        # bits per byte of the scored text: the figure a pretrained entry's own tokens share
        val_bytes=val_bytes,
        val_bits_per_byte=bits_per_byte(final["loss"], final["tokens"], val_bytes),
        steps=summary["step"],
        tokens=summary["tokens"],
        train_flops=summary["flops_spent"],
        # the mean cost per token it ran at (the plan's, unless its cost follows what it learns)
        train_flops_per_token=summary["flops_spent"] / summary["tokens"],
        train_tok_per_s=summary["tok_per_s"],
        train_flops_per_s=summary["flops_per_s"],
        mfu=summary["mfu"],
        peak_flops=summary["peak_flops"],
        peak_source=summary["peak_source"],
        train_resumed=resume,
        learned=learned_on(model, text),
        **_executed_flops(model, text),
        seconds=time.perf_counter() - t0,
    )
    return model, results


def _executed_flops(model, text: torch.Tensor) -> dict:
    """One training step (forward + backward) of the trained model on a validation sequence under
    FlopCounterMode: what it executes per token beside what the budget counts, so implementation
    overhead shows (README, "How FLOPs are counted"). `counted_visible`: the part of the count
    the counter can see (scans, FFTs and solves are elementwise to it)."""
    was_training = model.training
    m = compare_model(model, text, training=True)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return dict(executed_flops_per_token=m["executed"], counted_flops_per_token=m["counted"],
                counted_visible_flops_per_token=m["visible"])


def _mqar_config(plan: ModelPlan, o: CompareOptions) -> ModelConfig:
    """The probe's model: this architecture at its compare width with MQAR_HEADS heads."""
    return recall_config(plan.config, o.mqar, heads=MQAR_HEADS)


def _mqar_work(plan: ModelPlan, o: CompareOptions) -> float:
    """The probe's training FLOPs if it runs every step (the progress bar's share)."""
    mcfg = _mqar_config(plan, o)
    return _train_flops_per_token(mcfg, o.mqar.seq_len) * o.mqar.batch_size * o.mqar.seq_len * o.mqar.steps


def _mqar_stage(o: CompareOptions, plan: ModelPlan, dev, run_dir: str, advance) -> dict:
    t0 = time.perf_counter()
    mcfg = _mqar_config(plan, o)
    mqar_step = _train_flops_per_token(mcfg, o.mqar.seq_len) * o.mqar.batch_size * o.mqar.seq_len
    recall = train_recall(mcfg, o.mqar, seed=o.seed, device=dev, dtype=o.dtype, peak_flops=o.peak_flops,
                          on_step=lambda _: advance(mqar_step), out_dir=os.path.join(run_dir, "mqar"),
                          checkpoints=MQAR_CHECKPOINTS, stop_at=MQAR_STOP_AT)
    advance(mqar_step * (o.mqar.steps - recall["steps"]))  # the steps a solved probe did not need
    return dict(mqar_accuracy=recall["accuracy"], mqar_state_bytes=recall["state_bytes"],
                mqar_cache_bytes=recall["cache_bytes"], mqar_tok_per_s=recall["train_tok_per_s"],
                mqar_flag=recall["flag"], mqar_steps=recall["steps"], mqar_solved_at=recall["solved_at"],
                mqar_train_flops=mqar_step * recall["steps"],  # what the probe cost, beside the LM's training
                seconds=time.perf_counter() - t0)


def _inference_stage(o: CompareOptions, plan: ModelPlan, trained, text, dev, infer_dtype, advance) -> dict:
    """Prefill, decode and caches of `trained`, reading `text` (validation ids in its tokens)."""
    t0 = time.perf_counter()
    clear_process_caches()  # this model builds its own plans and tables, in its own timings
    elem = torch.tensor([], dtype=infer_dtype).element_size()
    per_context = {n: inference_flops(plan.config, [n], o.decode_tokens) for n in o.contexts}
    inf = measure_inference(trained, o.contexts, o.decode_tokens, dev, infer_dtype, text, seed=o.seed,
                            on_context=lambda n: advance(per_context[n]), compile_decode=o.compile_decode)
    return dict(
        prefill_tok_s=inf["prefill_tok_s"],
        decode_ms=inf["decode_ms"],
        cache_bytes=inf["cache_bytes"],  # measured: what the trained model's caches hold
        inference_errors=inf["errors"],
        state_bytes=state_curve(trained, elem, sorted(set(STATE_CONTEXTS) | set(o.contexts))),  # analytic, trained
        state_dtype=str(infer_dtype).removeprefix("torch."),
        seconds=time.perf_counter() - t0,
    )


def _train_flops_per_token(cfg, seq_len: int) -> float:
    with torch.device("meta"):
        return build_model(cfg).flops_per_token(seq_len, training=True)


def _finished_line(i: int, n: int, name: str, row: dict) -> str:
    if row["status"] != "ok":
        return f"[{i}/{n}] {name}: {row['status']}: {row.get('reason', '')}"
    own = f" in its own tokens ({row['tokenizer']['kind']})" if row.get("pretrained") else ""
    parts = [
        f"[{i}/{n}] {name}: d={row['d_model']}, {row['params']:,} params" + (", pretrained" if own else ""),
        f"val {'NELBO' if row.get('bound') else 'loss'} {row['val_loss']:.4f}{own} "
        f"(ppl {'<= ' if row.get('bound') else ''}{row['val_ppl']:.2f}"
        + (f", {row['val_bits_per_byte']:.3f} bits/byte)" if row.get("val_bits_per_byte") is not None else ")"),
    ]
    if "mqar_accuracy" in row:
        parts.append(f"MQAR {row['mqar_accuracy']:.3f}")
    if row.get("train_tok_per_s") is not None:
        parts.append(f"train {row['train_tok_per_s']:,.0f} tok/s")
    dec = row.get("decode_ms", {})
    if dec:
        parts.append("decode " + "/".join(f"{v:.2f}" for v in dec.values()) + " ms/token")
    parts.append(f"{row['seconds']['total']:.0f} s")
    return ", ".join(parts)


# ----------------------------------------------------------------------------- the job


def run_compare(o: CompareOptions, progress: bool = True, only: list | None = None, write_files: bool = True) -> dict:
    """Run the comparison (see module doc); returns the report dict (report.json's content)
    plus "files". Raises SpeedlmError for bad arguments before any training; re-raises
    KeyboardInterrupt after writing the report of the models finished so far.

    `only`: plan every model (widths are matched to the first) but run only these, leaving the
    others' stages to other processes (a sweep executor's task); `write_files=False` writes no
    report, plots or errors log removal (a later run over the finished stages merges them)."""
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
        "corpus": corpus, "autocast_dtype": train_dtype,  # a pretrained entry encodes the text its own way
        "info": {"spec": o.data, "name": corpus.name, "fingerprint": corpus.fingerprint},
    }
    print(f"data: {corpus.name}: {corpus.files} files, fingerprint {corpus.fingerprint}; "
          f"{tokenizer.spec()['kind']} tokenizer ({tokenizer.vocab_size} tokens): "
          f"{len(train_ids):,} train / {len(val_ids):,} validation tokens")
    fingerprint = {"options": _options_dict(o), "data": corpus.fingerprint, "tokenizer": tokenizer.spec(),
                   "speedlm": speedlm.__version__}
    checkpoints = {name: checkpoint_identity(name) for name in o.presets if is_checkpoint(name)}
    if checkpoints:  # a resumed run must find the same weights behind each path
        fingerprint["checkpoints"] = checkpoints
    reuse = open_plan(o.out_dir, fingerprint, o.resume)  # refuses other arguments before touching anything
    saved_steps = {name: p["steps"] for name, p in load_plans(o.out_dir).items()} if reuse else {}
    if reuse:
        print(f"resuming the compare run in {o.out_dir}: finished stages are reused")

    # ----- plans: widths and steps; bad arguments fail here, broken configs become rows -----
    rows: dict[str, dict] = {}
    plans: list[ModelPlan] = []
    too_small: list[str] = []
    target = None
    for name in o.presets:
        if is_checkpoint(name):  # measured as saved: its own width, weights and tokenizer, no training
            try:
                cfg = spec_config(name)
                require_language_model(cfg, name, diffusion=True)
                check_entry(name)
                plan = plan_pretrained(name, cfg, o.seq_len)
            except SpeedlmError as e:  # a corrupt folder is this entry's failure, not the job's
                rows[name] = {"name": name, "status": "failed", "pretrained": True, "reason": f"checkpoint: {e}"}
                continue
            if o.seq_len > cfg.max_seq_len:
                raise SpeedlmError(f"--seq-len {o.seq_len} is longer than {name} can hold "
                                   f"(max_seq_len={cfg.max_seq_len})")
            plans.append(plan)
            rows[name] = {"name": name, "status": "pending", **plan.to_dict()}
            continue
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
        preset_width = cfg.d_model
        if first and o.tokens_per_param is not None:  # a compute-efficient size for this budget
            cfg = width_for_tokens_per_param(cfg, o.budget, o.tokens_per_param, o.seq_len)
        try:
            plan = plan_model(name, cfg, o.budget, o.batch_size, o.seq_len, None if first else target, preset_width)
        except BudgetTooSmall as e:
            too_small.append(str(e))
            continue
        except SpeedlmError as e:
            rows[name] = {"name": name, "status": "failed", "reason": f"config: {e}"}
            continue
        if first:
            target = plan.params_active_non_embedding
        if o.time_budget is not None:  # the steps this model takes in that many seconds here
            steps = saved_steps.get(name) or calibrate_steps(plan, o, data)
            plan = dataclasses.replace(plan, steps=steps, tokens=steps * o.batch_size * o.seq_len,
                                       train_flops=steps * o.batch_size * o.seq_len * plan.flops_per_token,
                                       train_flops_budget=None)
        plans.append(plan)
        rows[name] = {"name": name, "status": "pending", **plan.to_dict()}
    if too_small:
        raise SpeedlmError(too_small[0] + (f" (and {len(too_small) - 1} more models)" if len(too_small) > 1 else ""))

    _print_plan(plans, o, target)
    env = _environment(o, dev, train_dtype, corpus)
    env["train_dtype"] = str(train_dtype or torch.float32).removeprefix("torch.")
    save_plan(o.out_dir, fingerprint, {p.name: {"d_model": p.width, "steps": p.steps} for p in plans})
    errors_log = os.path.join(o.out_dir, "errors.log")
    if os.path.exists(errors_log) and not reuse and write_files:
        os.remove(errors_log)
    if only is not None:
        plans = [p for p in plans if p.name in only]

    def work_of(plan: ModelPlan) -> float:
        if plan.pretrained:
            return evaluation_flops(plan, o) + inference_flops(plan.config, o.contexts, o.decode_tokens)
        w = plan.train_flops
        if o.mqar is not None and plan.config.objective == "ar":
            w += _mqar_work(plan, o)
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
                row.update(_run_model(o, plan, data, dev, infer_dtype, advance, reuse))
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
            row.update(status="not run", reason="interrupted before it started" if only is None else "run elsewhere")
    report = {"meta": env, "models": [rows[n] for n in o.presets]}
    if not write_files:
        if interrupted:
            raise KeyboardInterrupt
        return report
    plots = write_plots(report, o.out_dir)
    files = {**write_report(report, o.out_dir, plots), **plots}
    report["files"] = files
    print(leaderboard_markdown(report))
    if pretrained_note(report):
        print(pretrained_note(report))
    print(f"wrote {', '.join(files.values())}")
    if interrupted:
        raise KeyboardInterrupt
    return report


def _print_plan(plans: list[ModelPlan], o: CompareOptions, target: int | None) -> None:
    tokens_per_step = o.batch_size * o.seq_len
    budget = f"{o.time_budget:g} s of training" if o.time_budget is not None else f"{o.budget:.3g} training FLOPs"
    print(f"plan: {budget} per model, batches of {o.batch_size} x {o.seq_len} tokens "
          f"({tokens_per_step:,} per step), lr {o.lr}, seed {o.seed}")
    width = max([len(p.name) for p in plans] + [5])
    print(f"  {'model':<{width}}  d_model  params     active non-emb  vs first  MFLOP/token  steps   tokens")
    for p in plans:
        ratio = f"{p.params_active_non_embedding / target:.3f}" if target else "-"
        # a model whose cost follows what it learns spends its FLOP budget at the cost it runs at
        if p.pretrained:
            dynamic = " (pretrained: measured as saved, not trained)"
        else:
            dynamic = " (cost follows its learned values: counted as it trains)" if _data_dependent(p.config) else ""
        print(f"  {p.name:<{width}}  {p.width:<7}  {p.params:<9,}  {p.params_active_non_embedding:<14,}  {ratio:<8}  "
              f"{p.flops_per_token / 1e6:<11.3f}  {p.steps:<6}  {p.tokens:,}{dynamic}")
    sys.stdout.flush()


def _data_dependent(cfg) -> bool:
    with torch.device("meta"):
        return build_model(cfg).data_dependent_flops


__all__ = ["CompareOptions", "DEFAULT_BUDGET", "DEFAULT_CONTEXTS", "DEFAULT_MQAR", "DEFAULT_PRESETS", "REPORT_JSON",
           "REPORT_MD", "TIMING_FIELDS", "run_compare"]
