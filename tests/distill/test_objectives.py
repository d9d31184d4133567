"""The distillation stages as trainer objectives: the KL is zero between copies and matches its
formula, gradients reach only what is trainable, attention transfer lowers every replaced layer's
MSE through the ordinary trainer with everything else bit-identical and out of the optimizer,
and a checkpointed run with an objective resumes to the uninterrupted run's weights."""

import copy

import numpy as np
import pytest
import torch

from speedlm.data.dataset import TokenStream
from speedlm.distill.objectives import (
    AttentionTransferObjective,
    DistillationObjective,
    distillation_kl,
    freeze_all_but,
)
from speedlm.errors import SpeedlmError
from speedlm.models import build_model
from speedlm.models.presets import preset_config
from speedlm.train import TrainConfig, load_checkpoint, read_metrics, train
from speedlm.train.trainer import Trainer

REPLACED = 1  # the layer the hand-made student swaps (transformer-tiny has 2)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def teacher_model(seed=0):
    torch.manual_seed(seed)
    return build_model(preset_config("transformer-tiny"))


def student_of(teacher, mixer="linear_attention", seed=1):
    """The teacher with layer REPLACED's attention swapped for `mixer` (its own init), every other
    weight copied: a stand-in for the distill student builder."""
    cfg = copy.deepcopy(teacher.config)
    cfg.pattern = "AN"
    cfg.layers = {"A": {"mixer": {"name": "attention"}}, "N": {"mixer": {"name": mixer}}}
    torch.manual_seed(seed)
    student = build_model(cfg)
    new = f"blocks.{REPLACED}.mixer."
    kept = {k: v for k, v in teacher.state_dict().items() if not k.startswith(new)}
    missing, unexpected = student.load_state_dict(kept, strict=False)
    assert not unexpected and all(k.startswith(new) for k in missing)
    return student


def markov_stream(vocab=256, n=20_000, seed=0):
    rs = np.random.RandomState(seed)
    ids = np.empty(n, dtype=np.int64)
    ids[0] = 0
    noise, rand = rs.rand(n) < 0.1, rs.randint(0, vocab, size=n)
    for i in range(1, n):
        ids[i] = rand[i] if noise[i] else (5 * ids[i - 1] + 3) % vocab
    return TokenStream(ids)


def config(tmp_path, name="run", **kw):
    base = dict(steps=12, batch_size=4, seq_len=32, lr=1e-2, warmup_steps=2, save_every=4, keep=2, log_every=1,
                device="cpu", dtype="auto", seed=0, out_dir=str(tmp_path / name))
    return TrainConfig(**{**base, **kw})


def batch(seed=0, b=2, t=24, vocab=256):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(0, vocab, (b, t + 1), generator=g)
    return w[:, :-1], w[:, 1:]


# ----- stage 2: the distillation loss ----------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_the_kl_is_zero_when_student_and_teacher_are_copies(temperature):
    teacher = teacher_model()
    student = copy.deepcopy(teacher)
    x, y = batch()
    out = DistillationObjective(teacher, kl_weight=1.0, lm_weight=0.5, temperature=temperature)(student, x, y)
    assert out.parts["kl"].item() == 0.0
    lm = student.loss(x, y).parts["lm"]
    torch.testing.assert_close(out.parts["lm"], lm, rtol=0, atol=0)
    torch.testing.assert_close(out.total, 0.5 * lm, rtol=1e-6, atol=0)


def test_the_kl_is_the_teachers_divergence_from_the_student_at_the_temperature_over_scored_tokens():
    g = torch.Generator().manual_seed(0)
    s, t = (torch.randn(2, 5, 11, generator=g, dtype=torch.float64) for _ in range(2))
    y = torch.randint(0, 11, (2, 5), generator=g)
    y[0, 1] = y[1, 4] = -100  # left out, as the LM loss leaves them out
    temp = 1.7
    p, q = torch.softmax(t / temp, -1), torch.softmax(s / temp, -1)
    per_token = (p * (p.log() - q.log())).sum(-1)
    want = per_token[y != -100].mean() * temp**2
    torch.testing.assert_close(distillation_kl(s, t, y, temp).double(), want, rtol=1e-6, atol=0)
    assert distillation_kl(s, t, y, temp) > 0


def test_distillation_gradients_reach_only_the_trainable_parameters_and_never_the_teacher():
    teacher = teacher_model()
    student = student_of(teacher)
    x, y = batch()
    with freeze_all_but(student, [REPLACED]):
        DistillationObjective(teacher)(student, x, y).total.backward()
        for name, p in student.named_parameters():
            trainable = name.startswith(f"blocks.{REPLACED}.mixer.")
            assert p.requires_grad == trainable
            assert (p.grad is not None and p.grad.abs().sum() > 0) if trainable else p.grad is None, name
    assert all(p.requires_grad for p in student.parameters())  # restored on leaving the block
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not teacher.training


def test_bad_distillation_settings_are_one_line_errors():
    teacher = teacher_model()
    with pytest.raises(SpeedlmError, match="temperature"):
        DistillationObjective(teacher, temperature=0)
    with pytest.raises(SpeedlmError, match="lm_weight"):
        DistillationObjective(teacher, kl_weight=0, lm_weight=0)
    other = build_model(preset_config("transformer-tiny", vocab_size=128))
    x, y = batch(vocab=128)
    with pytest.raises(SpeedlmError, match="vocabulary"):
        DistillationObjective(teacher)(other, x, y)


# ----- stage 1: attention transfer through the trainer -----------------------------------------


def test_attention_transfer_feeds_the_new_mixer_the_teachers_input_and_compares_with_its_attention():
    """With the teacher's own attention as the 'new' mixer, the MSE is exactly zero: input,
    positions and target are the teacher's."""
    teacher = teacher_model()
    student = copy.deepcopy(teacher)
    freeze_all_but(student, [0, 1])
    out = AttentionTransferObjective(teacher, student, [0, 1])(student, *batch())
    assert set(out.parts) == {"mse_layer0", "mse_layer1"} and out.total.item() == 0.0
    other = student_of(teacher)
    freeze_all_but(other, [REPLACED])
    assert AttentionTransferObjective(teacher, other, [REPLACED])(other, *batch()).total.item() > 0


def test_attention_transfer_refuses_a_student_with_more_trainable_than_the_new_mixers():
    teacher = teacher_model()
    student = student_of(teacher)
    with pytest.raises(SpeedlmError, match="freeze_all_but"):
        AttentionTransferObjective(teacher, student, [REPLACED])(student, *batch())
    with pytest.raises(SpeedlmError, match="out of range"):
        AttentionTransferObjective(teacher, student, [2])


@pytest.mark.parametrize("mixer", ["linear_attention", "gated_deltanet"])
def test_attention_transfer_lowers_the_layer_mse_and_leaves_the_rest_untouched(tmp_path, mixer):
    teacher = teacher_model()
    student = student_of(teacher, mixer)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    freeze_all_but(student, [REPLACED])
    objective = AttentionTransferObjective(teacher, student, [REPLACED])
    trainer = Trainer(student, config(tmp_path, steps=40, lr=3e-3), markov_stream(), progress=False, persist=False,
                      objective=objective)
    summary = trainer.run()
    mse = [r[f"loss/mse_layer{REPLACED}"] for r in summary["history"]]
    assert np.mean(mse[-5:]) < 0.5 * np.mean(mse[:5]), mse
    new = f"blocks.{REPLACED}.mixer."
    after = student.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if not k.startswith(new))
    assert any(not torch.equal(after[k], v) for k, v in before.items() if k.startswith(new))
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in student.blocks[REPLACED].mixer.parameters()}
    assert all(not p.requires_grad for p in teacher.parameters())
    # the objective's FLOPs, not a full student step: the teacher up to the layer and the mixer trained
    assert summary["flops_per_token"] == objective.flops_per_token(student, 32) < student.flops_per_token(32)


# ----- resume ----------------------------------------------------------------------------------


def _stage(name, teacher, student):
    if name == "transfer":
        freeze_all_but(student, [REPLACED])
        return AttentionTransferObjective(teacher, student, [REPLACED])
    return DistillationObjective(teacher, lm_weight=0.3, temperature=2.0)


@pytest.mark.parametrize("stage", ["transfer", "distill"])
def test_a_checkpointed_run_with_an_objective_resumes_to_the_uninterrupted_weights(tmp_path, stage):
    teacher = teacher_model()
    whole = student_of(teacher)
    a = train(whole, config(tmp_path, "a"), markov_stream(), progress=False, objective=_stage(stage, teacher, whole))

    cfg_b = config(tmp_path, "b")
    first = student_of(teacher)
    train(first, cfg_b, markov_stream(), progress=False, stop_at_step=6, objective=_stage(stage, teacher, first))
    ckpt = load_checkpoint(cfg_b.out_dir)
    assert ckpt.trainer_state["objective"]["name"] == ("attention_transfer" if stage == "transfer" else "distillation")
    trainable = [p for p in first.parameters() if p.requires_grad]
    assert len({k.split(".")[1] for k in ckpt.optimizer_tensors}) == len(trainable)  # frozen ones hold no state
    frozen = [n for n, p in first.named_parameters() if not p.requires_grad]
    assert ckpt.trainer_state.get("frozen", []) == frozen and bool(frozen) == (stage == "transfer")

    resumed = student_of(teacher, seed=99)  # a different init: everything must come from the checkpoint
    b = train(resumed, cfg_b, markov_stream(), progress=False, resume=True, objective=_stage(stage, teacher, resumed))
    assert b["start_step"] == 6 and b["step"] == 12
    for k, v in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k
    losses_b = [r["loss"] for r in read_metrics(f"{cfg_b.out_dir}/metrics.jsonl")]
    assert losses_b == [r["loss"] for r in a["history"]]
    key = f"loss/mse_layer{REPLACED}" if stage == "transfer" else "loss/kl"
    assert all(key in r for r in a["history"])


def test_resuming_needs_the_same_objective_and_the_same_frozen_parameters(tmp_path):
    teacher = teacher_model()
    student = student_of(teacher)
    cfg = config(tmp_path, steps=6)
    train(student, cfg, markov_stream(), progress=False, stop_at_step=3, objective=_stage("transfer", teacher, student))
    plain = student_of(teacher)
    freeze_all_but(plain, [REPLACED])
    with pytest.raises(SpeedlmError, match="same objective"):
        train(plain, cfg, markov_stream(), progress=False, resume=True)
    thawed = student_of(teacher)
    freeze_all_but(thawed, [0, REPLACED])
    with pytest.raises(SpeedlmError, match="freeze the same"):
        train(thawed, cfg, markov_stream(), progress=False, resume=True,
              objective=AttentionTransferObjective(teacher, thawed, [REPLACED]))


def test_a_model_with_every_parameter_frozen_is_refused(tmp_path):
    student = teacher_model()
    student.requires_grad_(False)
    with pytest.raises(SpeedlmError, match="nothing to train"):
        train(student, config(tmp_path), markov_stream(), progress=False, persist=False)
