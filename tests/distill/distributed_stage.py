"""One distillation stage through the trainer, launched by tests/distill/test_objectives_distributed.py
on one process or under torchrun: `python distributed_stage.py KIND STAGE OUT [--resume]`."""

import sys
from pathlib import Path

import torch

from speedlm.distill.objectives import AttentionTransferObjective, DistillationObjective, freeze_all_but
from speedlm.errors import SpeedlmError
from speedlm.train import train
from speedlm.train.distributed import init_parallel
from test_objectives import REPLACED, config, markov_stream, student_of, teacher_model


def main(kind: str, stage: str, out: str, resume: bool) -> int:
    torch.set_num_threads(1)
    parallel, device = init_parallel(kind, "cpu", "gloo")
    teacher = teacher_model()
    student = student_of(teacher)
    freeze_all_but(student, [REPLACED])  # both stages: only the new layer trains (frozen parameters under DDP/FSDP)
    if stage == "transfer":
        objective = AttentionTransferObjective(teacher, student, [REPLACED])
    else:
        objective = DistillationObjective(teacher, lm_weight=0.3, temperature=2.0)
    cfg = config(Path(out).parent, Path(out).name, steps=6, save_every=2, keep=5)
    try:
        train(student, cfg, markov_stream(), progress=False, parallel=parallel, objective=objective, resume=resume)
    except SpeedlmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3], "--resume" in sys.argv))
