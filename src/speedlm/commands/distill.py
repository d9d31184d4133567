"""`speedlm distill`: a teacher checkpoint -> a student checkpoint whose chosen attention layers
are other mixers started from the attention weights (speedlm.distill). Only the student is built
so far (`--stages none`); the training stages come with the distillation objectives."""

from __future__ import annotations

from pathlib import Path

STAGES = ("none",)  # attention transfer and end-to-end distillation are not wired in yet


def _stages(text: str) -> list[str]:
    from speedlm.errors import SpeedlmError

    stages = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if not stages or unknown:
        raise SpeedlmError(f"--stages {text!r}: only 'none' (build and save the student, no training) is available yet")
    return stages


def _teacher(path: str):
    """(model, tokenizer, step folder) of the teacher; a teacher without a tokenizer is refused."""
    from speedlm.checkpoint import load_pretrained
    from speedlm.checkpoint.files import STATE_FILE, read_json, resolve_checkpoint
    from speedlm.data.tokenizers import SPEC_FILE
    from speedlm.errors import SpeedlmError

    folder = resolve_checkpoint(path)
    if read_json(folder / STATE_FILE).get("tokenizer") is None and not (folder / SPEC_FILE).is_file():
        raise SpeedlmError(f"the teacher {path} has no tokenizer; the student is saved with the teacher's, so "
                           "distil a checkpoint from `speedlm train` or `speedlm hf import`")
    p = load_pretrained(folder)
    if p.model.config.objective != "ar":
        raise SpeedlmError(f"the teacher {path} has objective {p.model.config.objective!r}; distil a causal LM ('ar')")
    return p.model, p.tokenizer, folder


def run_distill(args) -> Path:
    from speedlm.checkpoint import list_checkpoints
    from speedlm.checkpoint.files import publish_step
    from speedlm.distill.layers import parse_replace
    from speedlm.distill.student import build_student
    from speedlm.errors import SpeedlmError

    _stages(args.stages)
    out = Path(args.out)
    if out.exists() and (list_checkpoints(out) or (out / "latest").exists()):
        raise SpeedlmError(f"--out {out} already holds a checkpoint; choose a new folder")
    teacher, tokenizer, folder = _teacher(args.teacher)
    replace = parse_replace(args.replace, teacher.config.n_layers)
    student, report = build_student(teacher, replace)
    for line in report:
        print(line)
    state = {
        "tokenizer": tokenizer.spec(),
        "distilled_from": str(folder),
        "replace": args.replace,
        "stages": [],
        "distill_report": [
            {"layer": r.layer, "mixer": r.mixer, "init": r.init, "copied": r.copied, "reason": r.reason} for r in report
        ],
    }
    step = publish_step(out, 0, student, state, write_files=tokenizer.save)
    mapped = sum(r.init == "from attention" for r in report)
    print(f"student of {folder}: {len(report)} layer(s) replaced, {mapped} from attention; saved to {step}")
    return step
