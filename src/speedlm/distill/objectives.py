"""The two distillation stages as trainer objectives (speedlm/train/objective.py): each is
`objective(student, x, y, **meta) -> Loss`, passed as `train(student, ..., objective=...)`, so
checkpoints, resume, DDP/FSDP, autocast, progress and metrics are the trainer's own.

Stage 1, attention transfer (`AttentionTransferObjective`; LoLCATs, arXiv:2410.10254, and
MOHAWK's stage 2, arXiv:2408.10189): every new mixer learns to reproduce the attention it
replaces, on the teacher's own hidden states, with everything else frozen (`freeze_all_but`).
Stage 2, end-to-end distillation (`DistillationObjective`): the student's next-token
distribution is pulled towards the teacher's (KL at a temperature) plus a weighted LM loss.

The teacher is held by the objective, never by the student: it is put in eval mode and frozen
in place, moved to the student's device on the first step, and never trained, synchronised
or saved. A checkpoint records the objective's `spec()`, and resuming it needs an objective
with the same spec (and the same teacher, which the spec can only fingerprint).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from speedlm.errors import SpeedlmError
from speedlm.layers.context import AuxLosses
from speedlm.models.causal_lm import Loss, lm_cross_entropy


class FrozenParameters:
    """What `freeze_all_but` changed: `restore()` (or leaving a `with` block) puts every
    parameter's requires_grad back as it was."""

    def __init__(self, model: nn.Module, trainable: list[nn.Module]):
        self.saved = [(p, p.requires_grad) for p in model.parameters()]
        model.requires_grad_(False)
        for module in trainable:
            module.requires_grad_(True)

    def restore(self) -> None:
        for p, flag in self.saved:
            p.requires_grad_(flag)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()
        return False


def _mixer(model: nn.Module, i: int, role: str) -> nn.Module:
    blocks = model.blocks
    if not 0 <= i < len(blocks):
        raise SpeedlmError(f"layer {i} is out of range; the {role} has {len(blocks)} layers (0-{len(blocks) - 1})")
    mixer = getattr(blocks[i], "mixer", None)
    if mixer is None:
        raise SpeedlmError(f"layer {i} of the {role} is a {type(blocks[i]).__name__}, which has no single mixer to "
                           "transfer attention into")
    return mixer


def freeze_all_but(model: nn.Module, layers) -> FrozenParameters:
    """Freeze every parameter of `model` except those of the mixers of `layers` (attention
    transfer trains only the new mixers). Call it before `train`: the trainer's optimizer and
    DDP's gradient hooks take the parameters that require grad when they are built."""
    return FrozenParameters(model, [_mixer(model, i, "student") for i in layers])


def _on_device(teacher: nn.Module, device: torch.device) -> nn.Module:
    """The trainer moves the student to its device; the teacher follows on the first step."""
    if next(teacher.parameters()).device != device:
        teacher.to(device)
    return teacher


def _eval_teacher(teacher: nn.Module) -> nn.Module:
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def _refuse_cache(meta: dict, what: str) -> None:
    if meta.get("cache") is not None:
        raise SpeedlmError(f"{what} compares whole windows with the teacher's; it cannot run in segment mode "
                           "(--segments), drop it")


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                    temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) over the vocabulary at `temperature`, times temperature^2 (Hinton et
    al. 2015: the gradients keep their size as the temperature changes), averaged over the tokens
    whose target is not -100 (the positions the LM loss scores). In float32."""
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    per_token = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    scored = (targets != -100).to(per_token.dtype)
    return (per_token * scored).sum() / scored.sum().clamp(min=1.0) * temperature**2


class DistillationObjective:
    """Stage 2: kl_weight * KL(teacher || student) at `temperature` (times T^2) + lm_weight * the
    student's cross-entropy + the student's auxiliary losses (unweighted, as `model.loss` adds
    them: they are regularisers with their own coefficients). Parts logged: "kl" (T^2-scaled),
    "lm" (the plain cross-entropy, comparable with the validation loss) and the auxiliary parts.

    The teacher runs on the same input ids under torch.no_grad, in eval mode, under the same
    autocast as the student (the trainer's, around the whole objective). lm_weight's default
    0.1 keeps the student anchored to the data where the teacher is wrong while the KL leads;
    it is a choice, not a value taken from one of the papers."""

    def __init__(self, teacher: nn.Module, kl_weight: float = 1.0, lm_weight: float = 0.1, temperature: float = 1.0):
        if kl_weight < 0 or lm_weight < 0 or kl_weight + lm_weight == 0:
            raise SpeedlmError(f"kl_weight ({kl_weight}) and lm_weight ({lm_weight}) must be >= 0, one of them > 0")
        if not temperature > 0:
            raise SpeedlmError(f"the distillation temperature must be > 0, got {temperature}")
        self.teacher = _eval_teacher(teacher)
        self.kl_weight, self.lm_weight, self.temperature = float(kl_weight), float(lm_weight), float(temperature)

    def __call__(self, student, x, y, **meta) -> Loss:
        _refuse_cache(meta, "distillation")
        if student.config.vocab_size != self.teacher.config.vocab_size:
            raise SpeedlmError(f"the student's vocabulary ({student.config.vocab_size}) differs from the teacher's "
                               f"({self.teacher.config.vocab_size}); distillation compares distributions over one "
                               "vocabulary")
        teacher = _on_device(self.teacher, x.device)
        with torch.no_grad():
            teacher_logits = teacher(x, **meta)
        aux = AuxLosses()
        logits = student(x, aux=aux, **meta)
        kl = distillation_kl(logits, teacher_logits, y, self.temperature)
        lm = lm_cross_entropy(logits, y)
        total = self.kl_weight * kl + self.lm_weight * lm + aux.total()
        return Loss(total, {"kl": kl, "lm": lm, **aux.parts}, aux.metrics)

    def spec(self) -> dict:
        return {"name": "distillation", "kl_weight": self.kl_weight, "lm_weight": self.lm_weight,
                "temperature": self.temperature, "teacher_params": self.teacher.num_params()}

    def flops_per_token(self, student, context_len: int) -> float:
        """The student's training step and the teacher's forward."""
        teacher = self.teacher.flops_per_token(context_len, training=False)
        return student.flops_per_token(context_len, training=True) + teacher


class _Recorded(Exception):
    """Raised by the last recording hook: the teacher's layers after it and its head are not needed."""


class AttentionTransferObjective:
    """Stage 1: for each layer i of `layers`, the student's new mixer at i gets the input the
    teacher's attention at i saw (the normed hidden state, on the teacher's own hidden states)
    and its output is compared with that attention's output: total = sum over the layers of
    MSE(student mixer_i(h_i), teacher attention_i(h_i)) (+ the new mixers' auxiliary losses).
    Each mixer's parameters meet only their own term, so the sum trains every layer as if alone
    (a mean would divide each one's learning rate by the number of layers). Parts logged:
    "mse_layer{i}".

    The teacher runs once per step under torch.no_grad, recording with forward hooks on its
    blocks[i].mixer, and stops after the last replaced layer; the student's full forward is not
    run. Only the new mixers may be trainable (`freeze_all_but(student, layers)` before `train`):
    nothing else meets the loss. The student's mixers are called directly, not through their
    blocks, which FSDP's sharding hooks need: run this stage on one process or under DDP."""

    def __init__(self, teacher: nn.Module, student: nn.Module, layers):
        self.layers = sorted(set(int(i) for i in layers))
        if not self.layers:
            raise SpeedlmError("attention transfer needs at least one replaced layer")
        if teacher.config.d_model != student.config.d_model:
            raise SpeedlmError(f"the student's width ({student.config.d_model}) differs from the teacher's "
                               f"({teacher.config.d_model}); a replaced mixer reads the teacher's hidden states")
        for i in self.layers:  # both have a mixer there
            _mixer(teacher, i, "teacher")
            _mixer(student, i, "student")
        self.teacher = _eval_teacher(teacher)
        self.checked = False

    def _check_student(self, student) -> None:
        """Once, on the first step (the trainer has wrapped the student by then)."""
        mixers = [_mixer(student, i, "student") for i in self.layers]
        try:
            from torch.distributed.fsdp import FSDPModule
        except ImportError:
            FSDPModule = ()
        if any(isinstance(student.blocks[i], FSDPModule) for i in self.layers):
            raise SpeedlmError("attention transfer calls the new mixers outside their blocks, which FSDP's sharding "
                               "hooks do not see; run it on one process or with --parallel ddp")
        new = {id(p) for m in mixers for p in m.parameters()}
        stray = [n for n, p in student.named_parameters() if p.requires_grad and id(p) not in new]
        if stray:
            raise SpeedlmError(f"attention transfer trains only the new mixers, but {stray[0]} (and {len(stray) - 1} "
                               "more) would train too; call freeze_all_but(student, layers) before train()")
        self.checked = True

    def record(self, x: torch.Tensor, **meta) -> dict[int, tuple]:
        """{layer: (mixer input, its SeqMeta, teacher mixer output)} from one teacher forward
        without gradients."""
        teacher = _on_device(self.teacher, x.device)
        seen: dict[int, tuple] = {}
        last = self.layers[-1]

        def hook_for(i):
            def hook(module, args, kwargs, output):
                h = args[0] if args else kwargs["x"]
                seq = args[1] if len(args) > 1 else kwargs["meta"]
                seen[i] = (h, seq, output)
                if i == last:
                    raise _Recorded

            return hook

        handles = [teacher.blocks[i].mixer.register_forward_hook(hook_for(i), with_kwargs=True) for i in self.layers]
        try:
            with torch.no_grad():
                teacher(x, **meta)
        except _Recorded:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return seen

    def __call__(self, student, x, y, **meta) -> Loss:
        _refuse_cache(meta, "attention transfer")
        if not self.checked:
            self._check_student(student)
        seen = self.record(x, **meta)
        aux = AuxLosses()
        parts, total = {}, 0.0
        for i in self.layers:
            h, seq, target = seen[i]
            out = student.blocks[i].mixer(h, dataclasses.replace(seq, aux=aux), None)
            parts[f"mse_layer{i}"] = F.mse_loss(out.float(), target.float())
            total = total + parts[f"mse_layer{i}"]
        return Loss(total + aux.total(), {**parts, **aux.parts}, aux.metrics)

    def spec(self) -> dict:
        return {"name": "attention_transfer", "layers": self.layers, "teacher_params": self.teacher.num_params()}

    def flops_per_token(self, student, context_len: int) -> float:
        """The teacher's blocks up to the last replaced one (forward), and the new mixers
        (forward and backward: 3x)."""
        teacher = sum(self.teacher.blocks[j].flops_per_token(context_len) for j in range(self.layers[-1] + 1))
        return teacher + 3.0 * sum(student.blocks[i].mixer.flops_per_token(context_len) for i in self.layers)
