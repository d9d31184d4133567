"""What `speedlm distill` does after the student: its from-scratch twin (`--scratch`), the
training-free baselines (`--baseline`, students with `--stages none`), and the report
(`--report`: `speedlm compare` over all of them plus the distillation section,
distill/report.py). Each part is reused when a rerun of the same command finds it finished.

The twin is the fair control for "did distillation help": the student's architecture from its
own initialisation (seeded by --seed), trained on the same corpus for as many tokens as all of
the student's stages together, with the teacher's training recipe (its learning rate, warm-up
share, decay, weight decay and clipping: the recipe that made the teacher, not the fine-tuning
rate of the stages). The teacher's own training tokens are counted for neither.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from speedlm.distill.report import SCRATCH_FILE  # in the twin's run folder: its student, tokens and recipe

SCRATCH_FOLDER = "scratch"
BASELINES_FOLDER = "baselines"
REPORT_FOLDER = "report"


def _scratch_config(args, teacher_state: dict, steps: int, seq_len: int, out: Path):
    from speedlm.commands.distill import EVAL_POINTS
    from speedlm.train import TrainConfig

    recipe = teacher_state.get("train_config") or {}
    base = TrainConfig()
    lr = recipe.get("lr", base.lr)
    warmup_share = recipe.get("warmup_steps", base.warmup_steps) / max(recipe.get("steps", base.steps), 1)
    cfg = TrainConfig(
        steps=steps, batch_size=args.batch_size, seq_len=seq_len, lr=lr,
        warmup_steps=min(steps, round(warmup_share * steps)),
        min_lr_ratio=recipe.get("min_lr_ratio", base.min_lr_ratio),
        weight_decay=recipe.get("weight_decay", base.weight_decay), grad_clip=recipe.get("grad_clip", base.grad_clip),
        eval_every=max(1, steps // EVAL_POINTS), eval_batches=args.eval_batches, save_every=args.save_every, seed=args.seed,
        device=args.device, dtype=args.dtype, log_every=max(1, min(10, steps // 10)), out_dir=str(out),
    )
    cfg.validate()
    return cfg


def run_scratch(args, teacher_loaded, student_step: Path) -> dict:
    """Train (or reuse) the student's architecture from scratch in `--out/scratch`; its record."""
    from speedlm.checkpoint.files import STATE_FILE, read_config, read_json, resolve_checkpoint
    from speedlm.commands.distill import REPORT_FILE, finished_run, started_run
    from speedlm.commands.train import encode_training_data, say_done
    from speedlm.data import TokenStream, load_corpus
    from speedlm.models import build_model
    from speedlm.train import train

    _, tokenizer, _, teacher_state = teacher_loaded
    out = Path(args.out)
    record = json.loads((out / REPORT_FILE).read_text())
    steps = sum(s["steps"] for s in record["stages"])
    seq_len = args.seq_len or teacher_state.get("train_config", {}).get("seq_len", 256)
    folder = out / SCRATCH_FOLDER
    cfg = _scratch_config(args, teacher_state, steps, seq_len, folder)
    student_config = read_config(resolve_checkpoint(student_step))  # the architecture, not the weights
    if not finished_run(folder, steps):
        spec = args.data or (teacher_state.get("data") or {}).get("spec", "stdlib")
        corpus = load_corpus(spec)
        train_ids, val_ids = encode_training_data(corpus, tokenizer)
        torch.manual_seed(args.seed)
        model = build_model(student_config)
        started = started_run(folder)
        print(f"from scratch: the student's architecture, {steps} steps of {cfg.tokens_per_step:,} tokens, "
              f"lr {cfg.lr:g} (the teacher's recipe) in {folder}" + (" (resumed)" if started else ""))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / SCRATCH_FILE).write_text(json.dumps(_scratch_of(folder, student_step, steps, cfg), indent=2))
        summary = train(model, cfg, TokenStream(train_ids), val_ids, tokenizer=tokenizer, resume=started,
                        data_info={"spec": spec, "name": corpus.name, "fingerprint": corpus.fingerprint})
        say_done(summary, model)
    else:
        print(f"from scratch: finished in {folder}, skipped")
    rec = json.loads((folder / SCRATCH_FILE).read_text())
    rec["val_loss"] = read_json(resolve_checkpoint(folder) / STATE_FILE)["metrics"]["val_loss"]
    (folder / SCRATCH_FILE).write_text(json.dumps(rec, indent=2))
    record["scratch"] = rec
    (out / REPORT_FILE).write_text(json.dumps(record, indent=2))
    print(f"from scratch: validation loss {rec['val_loss']:.4f} after {rec['tokens']:,} tokens "
          f"(student {record.get('validation', {}).get('student', float('nan')):.4f})")
    return rec


def _scratch_of(folder: Path, student_step: Path, steps: int, cfg) -> dict:
    from speedlm.distill.report import run_folder

    return {"student": str(run_folder(str(student_step))), "out": str(folder), "steps": steps,
            "tokens": steps * cfg.tokens_per_step, "lr": cfg.lr}


def build_baselines(args, specs: list[str], teacher_loaded) -> list[str]:
    """Each --baseline SPEC as a training-free student (`--stages none`) in `--out/baselines/`;
    their step folders."""
    from speedlm.commands.distill import run_distill
    from speedlm.distill.layers import parse_replace

    steps = []
    for i, spec in enumerate(specs):
        mixers = "-".join(sorted({m["name"] for m in parse_replace(spec, teacher_loaded[0].config.n_layers).values()}))
        sub = argparse.Namespace(**{**vars(args), "teacher": str(teacher_loaded[2]), "replace": spec,
                                    "stages": "none", "scratch": False,
                                    "report": False, "baseline": [], "compare_with": [],
                                    "out": str(Path(args.out) / BASELINES_FOLDER / f"{i}-{mixers}")})
        steps.append(str(run_distill(sub)))
    return steps


def run_report(args, teacher_loaded, student_step: Path, baselines: list[str]) -> dict:
    """compare over [teacher, student, its twin, baselines, --compare-with] into `--out/report`,
    plus the distillation section."""
    import shlex
    import sys

    from speedlm.commands.distill import REPORT_FILE, finished_run
    from speedlm.compare import CompareOptions, run_compare
    from speedlm.distill.report import append_distill_section

    out = Path(args.out)
    entries = [str(teacher_loaded[2]), str(student_step)]
    record = json.loads((out / REPORT_FILE).read_text())
    if record.get("scratch") and finished_run(out / SCRATCH_FOLDER, record["scratch"]["steps"]):
        entries.append(str(out / SCRATCH_FOLDER))
    entries += baselines + list(args.compare_with or [])
    teacher_state = teacher_loaded[3]
    seq_len = (record.get("validation", {}).get("seq_len") or args.seq_len
               or teacher_state.get("train_config", {}).get("seq_len", 256))
    options = CompareOptions(
        presets=entries, data=args.data or (teacher_state.get("data") or {}).get("spec", "stdlib"),
        out_dir=str(out / REPORT_FOLDER), seq_len=seq_len,
        batch_size=args.batch_size, final_eval_batches=args.eval_batches, seed=args.seed, device=args.device,
        dtype=args.dtype, contexts=tuple(args.contexts), decode_tokens=args.decode_tokens,
        command="speedlm " + " ".join(shlex.quote(a) for a in getattr(args, "argv", sys.argv[1:])),
    )
    report = run_compare(options)
    section = append_distill_section(report, options.out_dir)
    print(f"distillation section: {options.out_dir}/report.md ({len(section['students'])} student(s), "
          f"{len(section['scratch'])} from scratch)")
    return report


def run_extras(args, extras: dict, teacher_loaded, student_step: Path) -> None:
    if extras["scratch"]:
        run_scratch(args, teacher_loaded, student_step)
    if extras["report"]:
        baselines = build_baselines(args, extras["baselines"], teacher_loaded)
        run_report(args, teacher_loaded, student_step, baselines)
