"""A compare that survives being killed: the plan file and each model's finished stages.

`compare_plan.json` in the output folder holds what decides every number (the options, less the
output folder and the command line, the data's fingerprint, the tokenizer, the speedlm version)
and the plan made from them. A rerun with the same arguments into the same folder reuses it;
different arguments are refused, naming the first difference, before anything is touched.

Each model keeps `models/<name>/stages.json`: the results of every stage it finished (train with
its final validation, or for a checkpoint folder its evaluation as saved; MQAR; inference),
written atomically after each one. A checkpoint folder's identity (step folder, config and state
hashes, weights size) joins the fingerprint, so a resume never reuses stages of other weights. A rerun skips the
finished stages and continues an interrupted training or MQAR run from its last checkpoint
(the trainer's resume is exact), so every number except the timings equals an uninterrupted
run's; a stage's timings are those of the process that finished it.
"""

from __future__ import annotations

import json
import os

from speedlm.data.cachedir import atomic_write_text
from speedlm.errors import SpeedlmError

PLAN_FILE = "compare_plan.json"
STAGES_FILE = "stages.json"
STAGES = ("pretrained", "train", "mqar", "inference")  # a pretrained entry's first stage evaluates it


def _first_difference(saved, now, path: str = "") -> str | None:
    """'key: saved vs now' for the first place two JSON values differ (None: equal)."""
    if isinstance(saved, dict) and isinstance(now, dict):
        for key in sorted(set(saved) | set(now)):
            if key not in saved or key not in now:
                return f"{path}{key}: {'absent' if key not in saved else repr(saved[key])} there, " \
                       f"{'absent' if key not in now else repr(now[key])} now"
            found = _first_difference(saved[key], now[key], f"{path}{key}.")
            if found:
                return found
        return None
    if saved != now:
        return f"{path.rstrip('.')}: {saved!r} there, {now!r} now"
    return None


def open_plan(out_dir: str, fingerprint: dict, resume: bool, plan_file: str = PLAN_FILE) -> bool:
    """Check `out_dir`'s plan against this run's fingerprint (JSON-able). Returns True when an
    earlier run with the same arguments is there (its finished stages are reused); raises a
    one-line SpeedlmError when its arguments differ, or when `resume` asks for a run that is not
    there. A new plan is written by `save_plan`."""
    path = os.path.join(out_dir, plan_file)
    if not os.path.exists(path):
        if resume:
            raise SpeedlmError(f"--resume: {out_dir} holds no earlier compare run ({plan_file} is missing)")
        return False
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)["fingerprint"]
    except (OSError, ValueError, KeyError) as e:
        raise SpeedlmError(f"{path} is not a compare plan ({e}); remove it or choose another --out") from None
    diff = _first_difference(saved, json.loads(json.dumps(fingerprint)))
    if diff:
        raise SpeedlmError(f"{out_dir} holds a compare run with other arguments ({diff}); rerun it with the same "
                           "arguments, or choose another --out")
    return True


def save_plan(out_dir: str, fingerprint: dict, plans: dict, plan_file: str = PLAN_FILE) -> None:
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_text(os.path.join(out_dir, plan_file), json.dumps({"fingerprint": fingerprint, "plans": plans}, indent=2) + "\n")


def load_plans(out_dir: str) -> dict:
    with open(os.path.join(out_dir, PLAN_FILE), encoding="utf-8") as f:
        return json.load(f).get("plans", {})


def load_stages(run_dir: str) -> dict:
    """{stage: its results} of the stages this model finished (empty if none)."""
    path = os.path.join(run_dir, STAGES_FILE)
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f, object_hook=_int_keys)


def save_stage(run_dir: str, stages: dict, stage: str, results: dict) -> None:
    """Record one finished stage (atomically: a kill leaves the file before or after it)."""
    stages[stage] = results
    os.makedirs(run_dir, exist_ok=True)
    atomic_write_text(os.path.join(run_dir, STAGES_FILE), json.dumps(stages, indent=2) + "\n")


def _int_keys(d: dict) -> dict:
    """Per-context dicts are keyed by ints in memory, strings in JSON: read them back as ints."""
    return {int(k) if k.isdigit() else k: v for k, v in d.items()}
