"""The distillation objectives under torchrun (gloo, CPU, 2 processes), with every parameter but
the new mixer frozen: DDP runs attention transfer and FSDP2 end-to-end distillation with the
losses of one process on the same global batch, and the sharded run resumes from its checkpoint;
FSDP refuses attention transfer (it calls mixers outside their sharded blocks) in one line. Both
objectives reach DDP and FSDP through the same wrapper (train/distributed.py), so one stage each
covers the paths."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SRC = HERE.parents[1] / "src"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(kind, stage, out, procs=1, resume=False, expect=0):
    # the subprocesses import this checkout's source, whichever clone is pip-installed
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(SRC), str(HERE)])}
    script = [str(HERE / "distributed_stage.py"), kind, stage, str(out)] + (["--resume"] if resume else [])
    launch = [sys.executable]
    if procs > 1:
        launch += ["-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-addr", "127.0.0.1",
                   "--master-port", str(_free_port())]
    done = subprocess.run(launch + script, env=env, capture_output=True, text=True, timeout=600)
    if procs > 1 and done.returncode != 0 and "address already in use" in done.stderr.lower():
        launch[launch.index("--master-port") + 1] = str(_free_port())
        done = subprocess.run(launch + script, env=env, capture_output=True, text=True, timeout=600)
    assert (done.returncode == 0) == (expect == 0), done.stderr[-3000:]
    return done


def _losses(run):
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


@pytest.mark.parametrize("kind,stage", [("ddp", "transfer"), ("fsdp", "distill")])
def test_two_processes_match_one_with_an_objective_and_frozen_parameters(tmp_path, kind, stage):
    single, run = tmp_path / "single", tmp_path / kind
    _run("none", stage, single)
    _run(kind, stage, run, procs=2)
    for (s1, l1), (s2, l2) in zip(_losses(single), _losses(run), strict=True):
        assert s1 == s2 and abs(l1 - l2) <= 1e-4 * abs(l1), (l1, l2)  # stage 1's MSE is ~1e-5
    if kind == "fsdp":  # the gathered optimizer state of the trainable parameters re-shards on resume
        shutil.rmtree(run / "step_0000006")
        (run / "latest").write_text("step_0000004\n")
        _run(kind, stage, run, procs=2, resume=True)
        last = _losses(single)[-1][1]
        assert abs(_losses(run)[-1][1] - last) <= 1e-4 * abs(last)


def test_fsdp_refuses_attention_transfer_in_one_line(tmp_path):
    done = _run("fsdp", "transfer", tmp_path / "fsdp", procs=2, expect=2)
    assert "run it on one process or with --parallel ddp" in done.stderr
