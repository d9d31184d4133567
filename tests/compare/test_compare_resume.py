"""A killed `speedlm compare` resumes: rerun into the same folder, it reuses the finished stages,
continues an interrupted training or MQAR run from its last checkpoint, and writes the report an
uninterrupted run writes (timings aside). Different arguments into that folder are refused."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from speedlm.compare import run_compare
from speedlm.errors import SpeedlmError

from support.compare import _strip_timings, tiny_options

RESUME_FIELDS = ("train_resumed",)  # says how the run went, not what it found


def _comparable(report):
    out = _strip_timings(report)
    out["meta"]["options"].pop("out_dir")
    out.pop("files", None)
    for m in out["models"]:
        for key in RESUME_FIELDS:
            m.pop(key, None)
    return out


def _kill_during(tmp_path, name: str, where: str, step: int) -> None:
    """Run the tiny compare into tmp_path/name in a child process that kills itself (SIGKILL: no
    handler runs, nothing is flushed) at `step` of `where` ('train:<model>' or 'mqar:<model>')."""
    stage, model = where.split(":")
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path[:0] = {sys.path!r}
        from speedlm.train.trainer import Trainer
        real = Trainer.step
        def step(self):
            out = real(self)
            folder = str(self.out_dir)
            in_stage = folder.endswith(os.sep + "mqar") if {stage!r} == "mqar" else not folder.endswith(os.sep + "mqar")
            if {model!r} in folder and in_stage and self.steps_done == {step}:
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        Trainer.step = step
        from speedlm.compare import run_compare
        from support.compare import tiny_options
        from pathlib import Path
        run_compare(tiny_options(Path({str(tmp_path)!r}), {name!r}), progress=False)
    """)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]  # killed where asked, not finished or failed


@pytest.mark.parametrize("where, step", [("train:sliding-window-tiny", 9), ("mqar:transformer-tiny", 2)])
def test_a_compare_killed_mid_model_resumes_to_the_uninterrupted_report(tmp_path, where, step):
    whole = run_compare(tiny_options(tmp_path, "whole"), progress=False)
    _kill_during(tmp_path, "killed", where, step)
    assert not (tmp_path / "killed" / "report.json").exists()  # it died before writing a report
    resumed = run_compare(tiny_options(tmp_path, "killed"), progress=False)
    assert _comparable(resumed) == _comparable(whole)
    model = where.split(":")[1]
    rows = {m["name"]: m for m in resumed["models"]}
    if where.startswith("train"):
        assert rows[model]["train_resumed"]  # continued from its checkpoint, not retrained
    # a third run reuses every stage and writes the same report again
    again = run_compare(tiny_options(tmp_path, "killed"), progress=False)
    assert _comparable(again) == _comparable(whole)
    assert json.loads((tmp_path / "killed" / "report.json").read_text())["models"][0]["val_loss"] == whole["models"][0]["val_loss"]


def test_other_arguments_into_a_finished_folder_and_resume_without_a_run_are_one_line(tmp_path):
    run_compare(tiny_options(tmp_path, "a", presets=["transformer-tiny"], mqar=None), progress=False)
    before = (tmp_path / "a" / "report.json").read_text()
    with pytest.raises(SpeedlmError, match=r"other arguments \(options.seed: 0 there, 1 now\)"):
        run_compare(tiny_options(tmp_path, "a", presets=["transformer-tiny"], mqar=None, seed=1), progress=False)
    assert (tmp_path / "a" / "report.json").read_text() == before  # nothing of the earlier run touched
    with pytest.raises(SpeedlmError, match="holds no earlier compare run"):
        run_compare(tiny_options(tmp_path, "empty", resume=True), progress=False)
