"""`speedlm distill --parallel ddp` under torchrun (gloo, CPU, 2 processes): the command itself,
both stages, gives the student one process gives on the same global batches (the trainer's
DDP path is tested in tests/train and test_objectives_distributed.py; this runs the CLI's own
wiring: ranks, the report written once, the student saved once)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from speedlm.checkpoint import load_pretrained

from distill.test_distill_cli import save_teacher
from distill.test_objectives_distributed import _free_port

SRC = Path(__file__).resolve().parents[2] / "src"


def _distill(tmp_path, corpus_dir, out, procs):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC), "SPEEDLM_PROGRESS": "off"}
    args = ["-m", "speedlm", "distill", "--teacher", str(tmp_path / "teacher"), "--replace", "1=gated_deltanet",
            "--out", str(out), "--data", str(corpus_dir), "--tokens", "1024", "--batch-size", "4", "--seq-len", "32",
            "--lr", "3e-3", "--eval-batches", "2", "--device", "cpu"]
    launch = [sys.executable]
    if procs > 1:
        launch += ["-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-addr", "127.0.0.1",
                   "--master-port", str(_free_port())]
        args += ["--parallel", "ddp", "--dist-backend", "gloo"]
    done = subprocess.run(launch + args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_the_command_under_torchrun_matches_one_process(tmp_path, corpus_dir):
    save_teacher(tmp_path / "teacher")
    one, two = tmp_path / "one", tmp_path / "two"
    _distill(tmp_path, corpus_dir, one, 1)
    said = _distill(tmp_path, corpus_dir, two, 2).stdout
    assert said.count("saved to") == 1  # rank 0 reports and saves; rank 1 is silent
    r1, r2 = (json.loads((d / "distill_report.json").read_text()) for d in (one, two))
    for s1, s2 in zip(r1["stages"], r2["stages"], strict=True):
        assert s1["steps"] == s2["steps"] and s1["tokens"] == s2["tokens"]
        for k, v in s1["end"].items():
            assert abs(s2["end"][k] - v) <= 1e-3 * abs(v) + 1e-7, (s1["stage"], k, v, s2["end"][k])
    a, b = load_pretrained(one).model.state_dict(), load_pretrained(two).model.state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-5, msg=k)
