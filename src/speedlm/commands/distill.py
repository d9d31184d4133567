"""`speedlm distill`: a teacher checkpoint -> a student checkpoint whose chosen attention layers
are other mixers started from the attention weights (speedlm.distill), then trained in stages,
each one `train(student, ..., objective=...)` of the trainer (checkpoints, resume, progress,
metrics, --parallel and autocast are its own):

- transfer (stage 1): only the new mixers train, each to reproduce the attention it replaces on
  the teacher's hidden states (AttentionTransferObjective), in `--out/stage1-transfer`;
- distill (stage 2): the student's next-token distribution is pulled towards the teacher's (KL
  plus a weighted LM loss, DistillationObjective), the new mixers or everything trainable
  (`--train`), in `--out/stage2-distill`.

The final student is a checkpoint in `--out` itself (with the teacher's tokenizer, so every
command that takes a checkpoint takes it), beside `distill_report.json`. Rerunning the same
command continues an unfinished stage from its checkpoint and skips the finished ones.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

STAGES = ("transfer", "distill")  # in this order; "none" builds and saves the student only
STAGE_FOLDERS = {"transfer": "stage1-transfer", "distill": "stage2-distill"}
REPORT_FILE = "distill_report.json"
TEACHER_FOLDER = "teacher"  # in --out: a Hugging Face teacher, converted
STAGE_FILE = "distill_stage.json"  # in a stage folder: the objective's parts before and after it
EVAL_POINTS = 4  # validation losses along each stage (the report's curve)


def _stages(text: str) -> list[str]:
    from speedlm.errors import SpeedlmError

    stages = [s.strip() for s in text.split(",") if s.strip()]
    if stages == ["none"]:
        return []
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages or stages != [s for s in STAGES if s in stages]:
        what = f"unknown stage {unknown[0]!r}" if unknown else f"--stages {text!r}"
        raise SpeedlmError(f"{what}: --stages takes none, transfer, distill or transfer,distill (in that order)")
    return stages


def _teacher(path: str, out: Path):
    """(model, tokenizer, step folder, trainer_state) of the teacher; one without a tokenizer is
    refused. A Hugging Face folder is converted in memory (`speedlm hf import`'s converters) and
    its step folder is `--out/teacher/step_0000000`, written by `_publish_teacher` once nothing
    more can be refused (a rerun finds it there)."""
    from speedlm.checkpoint import load_pretrained
    from speedlm.checkpoint.files import STATE_FILE, read_json, resolve_checkpoint
    from speedlm.data.tokenizers import SPEC_FILE
    from speedlm.errors import SpeedlmError
    from speedlm.hf.imports import is_hf_folder

    if is_hf_folder(path):
        imported = out / TEACHER_FOLDER
        if started_run(imported) and read_json(resolve_checkpoint(imported) / STATE_FILE).get("imported_from") == \
                str(Path(path)):
            path = str(imported)  # converted by an earlier run of this command
        else:
            from speedlm.hf.imports import load_hf

            model, tokenizer, state = load_hf(path)
            return model.eval(), tokenizer, imported / "step_0000000", state
    folder = resolve_checkpoint(path)
    if read_json(folder / STATE_FILE).get("tokenizer") is None and not (folder / SPEC_FILE).is_file():
        raise SpeedlmError(f"the teacher {path} has no tokenizer; the student is saved with the teacher's, so "
                           "distil a checkpoint from `speedlm train` or `speedlm hf import`")
    p = load_pretrained(folder)
    if p.model.config.objective != "ar":
        raise SpeedlmError(f"the teacher {path} has objective {p.model.config.objective!r}; distil a causal LM ('ar')")
    return p.model, p.tokenizer, folder, p.trainer_state


def _publish_teacher(teacher) -> None:
    """Write a Hugging Face teacher converted in memory to its step folder (nothing if it is there)."""
    from speedlm.checkpoint.files import publish_step

    model, tokenizer, folder, state = teacher
    if not folder.exists():
        publish_step(folder.parent, 0, model, state, write_files=tokenizer.save)
        print(f"teacher: {state['imported_from']} converted to {folder}")


def _command(args, folder, stages) -> dict:
    """What a rerun must repeat to reuse the finished student in --out."""
    keys = ("replace", "graft", "tokens", "data", "batch_size", "seq_len", "lr", "kl_weight", "lm_weight", "temperature",
            "train", "seed") + (("lora_rank", "lora_alpha") if getattr(args, "train", "all") == "lora" else ())
    return {"teacher": str(folder), "stages": stages, **{k: getattr(args, k, None) for k in keys}}


def _finished_student(out: Path, command: dict):
    """The student checkpoint a previous run of this same command left in `out` (None: there is
    none); a checkpoint from another command is refused."""
    from speedlm.checkpoint.files import STATE_FILE, read_json, resolve_checkpoint
    from speedlm.errors import SpeedlmError

    if not started_run(out):
        return None
    folder = resolve_checkpoint(out)
    recorded = read_json(folder / STATE_FILE).get("distill_command") or {}
    # an option added since that run was saved counts as left at its default (None)
    if {**{k: None for k in command}, **recorded} != command:
        raise SpeedlmError(f"--out {out} already holds a checkpoint from another command; choose a new folder")
    return folder


def _train_config(args, stage: str, seq_len: int, device, out: Path):
    from speedlm.errors import SpeedlmError
    from speedlm.train import TrainConfig

    if args.tokens < 1:
        raise SpeedlmError(f"--tokens must be >= 1, got {args.tokens}")
    steps = max(1, math.ceil(args.tokens / (args.batch_size * seq_len)))
    cfg = TrainConfig(
        steps=steps, batch_size=args.batch_size, seq_len=seq_len, lr=args.lr, warmup_steps=steps // 10,
        eval_every=max(1, steps // EVAL_POINTS), eval_batches=args.eval_batches, save_every=args.save_every, seed=args.seed,
        device=device, dtype=args.dtype, log_every=max(1, min(10, steps // 10)),
        out_dir=str(out / STAGE_FOLDERS[stage]),
    )
    cfg.validate()
    cfg.autocast_dtype(cfg.resolve_device())  # bf16 on a CPU without bf16 units is refused now, not mid-run
    return cfg


def _probe_batch(val_ids, seq_len: int, rows: int = 4):
    """A few validation windows every stage's objective is measured on before and after it."""
    from speedlm.data.dataset import require_tokens

    require_tokens(len(val_ids), seq_len, "validation set")
    rows = max(1, min(rows, (len(val_ids) - 1) // seq_len))
    ids = torch.as_tensor(val_ids[: rows * seq_len + 1].astype("int64"))
    return ids[:-1].view(rows, seq_len), ids[1:].view(rows, seq_len)


def _measure(objective, student, probe, device) -> dict:
    """The objective's parts on the probe batch, in float32, without training anything."""
    x, y = (t.to(device) for t in probe)
    training = student.training
    student.to(device).eval()
    with torch.no_grad():
        loss = objective(student, x, y)
    student.train(training)
    return {"total": float(loss.total), **{k: float(v) for k, v in loss.parts.items()}}


def _objective(stage: str, args, teacher, student, layers):
    from speedlm.distill.objectives import AttentionTransferObjective, DistillationObjective

    if stage == "transfer":
        return AttentionTransferObjective(teacher, student, layers)
    return DistillationObjective(teacher, args.kl_weight, args.lm_weight, args.temperature)


def _trainable(stage: str, args, student, layers):
    """Stage 1 and `--train new` train the new mixers only; `--train all` everything; `--train
    lora` the new mixers and LoRA adapters on the kept layers (merged into them after the stage)."""
    from contextlib import ExitStack, nullcontext

    from speedlm.distill.lora import lora_adapters
    from speedlm.distill.objectives import freeze_all_but

    if stage == "transfer" or args.train == "new":
        return freeze_all_but(student, layers)
    if args.train == "lora":
        stack = ExitStack()
        stack.enter_context(freeze_all_but(student, layers))
        stack.enter_context(lora_adapters(student, layers, args.lora_rank, args.lora_alpha, args.seed))
        return stack
    return nullcontext()


def finished_run(folder: Path, steps: int) -> bool:
    """Whether training run `folder` holds its last step."""
    from speedlm.checkpoint.files import STATE_FILE, read_json, resolve_checkpoint

    return started_run(folder) and read_json(resolve_checkpoint(folder) / STATE_FILE).get("step", 0) >= steps


def started_run(folder: Path) -> bool:
    from speedlm.checkpoint import list_checkpoints

    return bool(list_checkpoints(folder)) or (folder / "latest").exists()


def _run_stage(stage, cfg, student, objective, data, probe, device, parallel, say) -> dict:
    """One stage: skipped (its weights loaded) when its folder holds its last step, else
    trained (fresh or resumed); returns its record for the report."""
    from speedlm.commands.train import say_done
    from speedlm.data import TokenStream
    from speedlm.train import train
    from speedlm.train.checkpoint import load_checkpoint

    folder = Path(cfg.out_dir)
    if finished_run(folder, cfg.steps):
        load_checkpoint(folder).restore_model(student)
        say(f"{stage}: finished in {folder}, skipped")
        record = json.loads((folder / STAGE_FILE).read_text())
        if "end" not in record:  # the run stopped between its last checkpoint and this record
            record["end"] = _measure(objective, student, probe, device)
        return record
    started = started_run(folder)
    record = {"stage": stage, "out": str(folder), "steps": cfg.steps, "tokens": cfg.steps * cfg.tokens_per_step}
    if started and (folder / STAGE_FILE).is_file():
        record = json.loads((folder / STAGE_FILE).read_text())
    else:
        record["start"] = _measure(objective, student, probe, device)
        if parallel.main:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / STAGE_FILE).write_text(json.dumps(record, indent=2))
    say(f"{stage}: {cfg.steps} steps of {cfg.tokens_per_step:,} tokens in {folder}"
        + (" (resumed)" if started else ""))
    train_ids, val_ids, data_info, tokenizer = data
    summary = train(student, cfg, TokenStream(train_ids), val_ids, tokenizer=tokenizer, resume=started,
                    data_info=data_info, parallel=parallel, objective=objective)
    say_done(summary, student, say)
    record["end"] = _measure(objective, student, probe, device)
    if parallel.main:
        (folder / STAGE_FILE).write_text(json.dumps(record, indent=2))
    return record


def _report_lines(report: dict) -> list[str]:
    lines = []
    for s in report["stages"]:
        parts = [k for k in s["end"] if k != "total"]
        lines.append(f"{s['stage']}: " + ", ".join(f"{k} {s['start'][k]:.4g} -> {s['end'][k]:.4g}" for k in parts))
    v = report.get("validation")
    if v:
        lines.append(f"validation loss over {v['tokens']:,} tokens (seq_len {v['seq_len']}): "
                     f"student {v['student']:.4f}, teacher {v['teacher']:.4f}")
    return lines


def _prepare_stages(args, stages, teacher_state, tokenizer, student, device, out: Path, say):
    """Each stage's TrainConfig, the encoded data and the probe batch, checked before anything is
    written: (configs, (train_ids, val_ids, data_info, tokenizer), probe, seq_len)."""
    from speedlm.commands.train import encode_training_data
    from speedlm.data import load_corpus

    seq_len = args.seq_len or teacher_state.get("train_config", {}).get("seq_len", 256)
    cfgs = {stage: _train_config(args, stage, seq_len, device, out) for stage in stages}
    for cfg in cfgs.values():
        cfg.check_model(student.config)
    spec = args.data or (teacher_state.get("data") or {}).get("spec", "stdlib")
    corpus = load_corpus(spec)
    say(f"data: {corpus.name}: {corpus.files} files, fingerprint {corpus.fingerprint}")
    train_ids, val_ids = encode_training_data(corpus, tokenizer, say)
    data_info = {"spec": spec, "name": corpus.name, "fingerprint": corpus.fingerprint}
    return cfgs, (train_ids, val_ids, data_info, tokenizer), _probe_batch(val_ids, seq_len), seq_len


def run_distill(args) -> Path:
    """The student (built, trained in stages, saved), then its from-scratch twin (`--scratch`),
    the training-free baselines (`--baseline`) and the report (`--report`); returns the student's
    step folder. Everything that can be refused is refused before anything is written."""
    from speedlm.distill.graft import load_donors, parse_graft
    from speedlm.distill.layers import parse_replace
    from speedlm.errors import SpeedlmError

    stages = _stages(args.stages)
    if getattr(args, "train", "all") not in ("new", "all", "lora"):
        raise SpeedlmError(f"--train {args.train!r}: choose new (only the new mixers), all, or lora (the new mixers "
                           "and LoRA adapters on the kept layers)")
    if getattr(args, "train", "all") == "lora":
        if not (isinstance(args.lora_rank, int) and args.lora_rank >= 1):
            raise SpeedlmError(f"--lora-rank must be >= 1, got {args.lora_rank}")
        if not args.lora_alpha > 0:
            raise SpeedlmError(f"--lora-alpha must be positive, got {args.lora_alpha}")
    if "transfer" in stages and getattr(args, "parallel", "none") == "fsdp":
        raise SpeedlmError("attention transfer calls the new mixers outside their blocks, which FSDP's sharding hooks "
                           "do not see; run it on one process or with --parallel ddp")
    extras = _extras(args, stages)
    teacher = _teacher(args.teacher, Path(args.out))
    n_layers = teacher[0].config.n_layers
    replace = parse_replace(args.replace, n_layers) if args.replace is not None else {}
    grafts = parse_graft(args.graft, n_layers) if getattr(args, "graft", None) is not None else []
    if not replace and not grafts:
        raise SpeedlmError("give --replace (the teacher's layers to swap), --graft (layers from other checkpoints) "
                           "or both")
    donors = load_donors(grafts, teacher[0].config, teacher[1])
    for spec in extras["baselines"]:
        parse_replace(spec, n_layers)
    step = _distill_student(args, stages, teacher, replace, grafts, donors)
    if extras["main"]:
        from speedlm.commands.distill_extras import run_extras

        run_extras(args, extras, teacher, step)
    return step


def _extras(args, stages) -> dict:
    """--scratch, --baseline, --report and --compare-with, checked."""
    from speedlm.models.build import is_checkpoint
    from speedlm.errors import SpeedlmError

    scratch, report = getattr(args, "scratch", False), getattr(args, "report", False)
    baselines, others = list(getattr(args, "baseline", None) or []), list(getattr(args, "compare_with", None) or [])
    if scratch and not stages:
        raise SpeedlmError("--scratch trains the student's architecture on as many tokens as its stages; "
                           "--stages none has none")
    if (report or baselines or others) and getattr(args, "parallel", "none") != "none":
        raise SpeedlmError("--report, --baseline and --compare-with run on one process: rerun the same command "
                           "without --parallel once the student is trained (its stages are reused)")
    if (baselines or others) and not report:
        raise SpeedlmError("--baseline and --compare-with add entries to the report: give --report too")
    for name in others:
        if not is_checkpoint(name):
            raise SpeedlmError(f"--compare-with {name}: not a checkpoint folder")
    main = (scratch or report) and (getattr(args, "parallel", "none") == "none" or _rank() == 0)
    return {"scratch": scratch, "report": report, "baselines": baselines, "others": others, "main": main}


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", "0"))


def _distill_student(args, stages, teacher_loaded, replace, grafts=(), donors=None) -> Path:
    from speedlm.checkpoint.files import publish_step
    from speedlm.distill.student import build_student
    from speedlm.train import evaluate
    from speedlm.train.distributed import init_parallel

    out = Path(args.out)
    teacher, tokenizer, folder, teacher_state = teacher_loaded
    command = _command(args, folder, stages)
    done = _finished_student(out, command)
    if done is not None:
        print(f"{out} already holds this command's student: {done}")
        if (out / REPORT_FILE).is_file():
            print("\n".join(_report_lines(json.loads((out / REPORT_FILE).read_text()))))
        return done
    torch.manual_seed(getattr(args, "seed", 0))  # the new mixers' own init, the same on a rerun
    student, init = build_student(teacher, replace, grafts=grafts, donors=donors)
    layers = sorted(set(replace) | {g.layer for g in grafts})
    parallel, device = (init_parallel(args.parallel, args.device, args.dist_backend) if stages
                        else (None, "cpu"))
    say = print if parallel is None or parallel.main else (lambda *a, **k: None)
    state = {
        "tokenizer": tokenizer.spec(),
        "distilled_from": str(folder),
        "replace": args.replace,
        "graft": getattr(args, "graft", None),
        "stages": stages,
        "distill_command": command,
        "distill_report": [
            {"layer": r.layer, "mixer": r.mixer, "init": r.init, "copied": r.copied, "reason": r.reason} for r in init
        ],
    }
    report = {"teacher": str(folder), "replace": args.replace, "graft": state["graft"],
              "layers": state["distill_report"], "stages": []}
    prepared = _prepare_stages(args, stages, teacher_state, tokenizer, student, device, out, say) if stages else None
    if _rank() == 0:
        _publish_teacher(teacher_loaded)  # a Hugging Face teacher, converted, once nothing more can be refused
    for line in init:
        say(line)
    if prepared is not None:
        cfgs, data, probe, seq_len = prepared
        _, val_ids, data_info, _ = data
        run_device = cfgs[stages[0]].resolve_device()
        for stage in stages:
            objective = _objective(stage, args, teacher, student, layers)
            with _trainable(stage, args, student, layers):
                report["stages"].append(
                    _run_stage(stage, cfgs[stage], student, objective, data, probe, run_device, parallel, say))
        last = cfgs[stages[-1]]
        state.update(data=data_info, train_config=last.to_dict())
        val = {"seq_len": seq_len}
        for name, model in (("student", student), ("teacher", teacher)):
            ev = evaluate(model.to(run_device), val_ids, args.batch_size, seq_len, max_batches=args.eval_batches,
                          device=run_device)
            val[name], val["tokens"] = ev["loss"], ev["tokens"]
        report["validation"] = val
    if parallel is not None and not parallel.main:
        return out
    steps = sum(s["steps"] for s in report["stages"])
    step = publish_step(out, steps, student.cpu(), state, write_files=tokenizer.save)
    report["student"] = str(step)
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2))
    for line in _report_lines(report):
        print(line)
    mapped = sum(r.init == "from attention" for r in init)
    grafted = sum(r.init.startswith("grafted") for r in init)
    print(f"student of {folder}: {len(init) - grafted} layer(s) replaced, {mapped} from attention"
          + (f", {grafted} grafted" if grafted else "") + f"; saved to {step}")
    print(f"report: {out / REPORT_FILE}")
    return step
