"""Data parallelism under torchrun (gloo, CPU, 2 processes), DDP and FSDP2: the same losses as
one process with the same global batch, checkpoints from rank 0 only in the single-process
format, resume from 2 processes onto 1 and from 1 onto 2 (sharded), and one-line errors for a
launch that does not fit."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from speedlm.cli import main
from speedlm.errors import SpeedlmError
from speedlm.train.distributed import Parallel

ARGS = ["--preset", "transformer-tiny", "--steps", "6", "--batch-size", "4", "--seq-len", "32", "--eval-every", "2",
        "--eval-batches", "2", "--warmup-steps", "1", "--save-every", "2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(run):
    return [(r["step"], r["loss"], r.get("val_loss")) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def _train(args, procs=1):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPEEDLM_PROGRESS": "off"}
    launch = [sys.executable, "-m", "speedlm", "train"]
    if procs > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs),
                  "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "speedlm", "train"]
    done = subprocess.run(launch + args, env=env, capture_output=True, text=True, timeout=600)
    if procs > 1 and done.returncode != 0 and "address already in use" in done.stderr.lower():
        # the free port is found by binding and releasing it; another test's processes (a local
        # Ray instance, another torchrun) can take it in between: once more on a new port
        launch[launch.index("--master-port") + 1] = str(_free_port())
        done = subprocess.run(launch + args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


@pytest.fixture(scope="module")
def single(corpus_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("single") / "run"
    _train([*ARGS, "--data", str(corpus_dir), "--out", str(run)])
    return run


def _rewind(run, tmp_path, name):
    """A copy of the run whose latest checkpoint is step 4."""
    copy = tmp_path / name
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "step_0000006")
    (copy / "latest").write_text("step_0000004\n")
    return copy


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_two_processes_match_one_and_resume_on_one(corpus_dir, single, tmp_path, kind):
    run = tmp_path / kind
    out = _train([*ARGS, "--data", str(corpus_dir), "--out", str(run), "--parallel", kind], procs=2)
    assert out.stdout.count("done: step 6") == 1  # one report, from rank 0
    for (s1, l1, v1), (s2, l2, v2) in zip(_losses(single), _losses(run), strict=True):
        assert s1 == s2 and abs(l1 - l2) < 1e-5 and abs(v1 - v2) < 1e-5
    # the 2-process checkpoint is the single-process format: same tensors, tied weight stored once
    from speedlm.checkpoint.files import read_weights

    tensors, tied = read_weights(run / "step_0000006")
    one_tensors, one_tied = read_weights(single / "step_0000006")
    assert tied == one_tied == {"lm_head.weight": "embed.weight"} and tensors.keys() == one_tensors.keys()
    assert max((tensors[k] - one_tensors[k]).abs().max().item() for k in tensors) < 1e-4
    # the 2-process checkpoint at step 4 (FSDP: gathered into the single-process format)
    # continues in one process to the same step-6 loss
    resumed = _rewind(run, tmp_path, "resumed")
    _train([*ARGS, "--data", str(corpus_dir), "--out", str(resumed), "--resume"])
    assert abs(_losses(resumed)[-1][1] - _losses(single)[-1][1]) < 1e-5


def test_a_one_process_checkpoint_resumes_sharded_on_two(corpus_dir, single, tmp_path):
    resumed = _rewind(single, tmp_path, "to_fsdp")
    _train([*ARGS, "--data", str(corpus_dir), "--out", str(resumed), "--resume", "--parallel", "fsdp"], procs=2)
    assert abs(_losses(resumed)[-1][1] - _losses(single)[-1][1]) < 1e-5


def test_launches_that_do_not_fit_are_one_line_errors(corpus_dir, tmp_path, capsys, monkeypatch):
    base = ["train", *ARGS, "--data", str(corpus_dir), "--out", str(tmp_path / "x")]
    assert main(base + ["--parallel", "ddp"]) == 2
    assert "runs under torchrun" in capsys.readouterr().err
    assert main(base + ["--parallel", "fsdp"]) == 2
    assert "runs under torchrun" in capsys.readouterr().err
    assert main(base + ["--parallel", "zero"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown --parallel" in err[0]
    assert main(base + ["--parallel", "ddp", "--dist-backend", "mpi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown --dist-backend 'mpi'" in err[0]
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(base + ["--parallel", "ddp", "--dist-backend", "nccl"]) == 2  # nccl without GPUs
    assert "use --dist-backend gloo" in capsys.readouterr().err
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(base) == 2
    assert "pass --parallel ddp" in capsys.readouterr().err
    with pytest.raises(SpeedlmError, match="does not split over 3 processes"):
        Parallel("ddp", 0, 3).check_batch(4)
