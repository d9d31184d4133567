import json
import random

import numpy as np
import pytest
import torch

from speedlm.errors import SpeedlmError
from speedlm.train import build_optimizer, capture_rng, list_checkpoints, load_checkpoint, load_model, save_checkpoint
from speedlm.checkpoint import files as ckpt_files


def _trained(make_model, steps=2):
    """A model and optimizer with non-trivial Adam state."""
    model = make_model()
    opt = build_optimizer(model, lr=1e-2)
    for _ in range(steps):
        x = torch.randint(0, 64, (2, 16))
        model.loss(x, x.roll(-1, 1)).total.backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _draws():
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)], np.random.randn()


def test_round_trip_weights_optimizer_rng(tmp_path, make_model):
    model, opt = _trained(make_model)
    np.random.randn()  # leave a cached gaussian in numpy's state: it must survive too
    path = save_checkpoint(tmp_path, 2, model, opt, {"seed": 7, "tokens": 64})
    expected = _draws()  # what the RNGs produce right after the save

    assert path.name == "step_0000002"
    assert (tmp_path / "latest").read_text().strip() == "step_0000002"
    for f in ("model.safetensors", "config.json", "optimizer.safetensors", "trainer_state.json", "rng.safetensors"):
        assert (path / f).is_file()

    ck = load_checkpoint(tmp_path)  # run folder: follows latest
    assert ck.path == path and ck.step == 2 and ck.trainer_state["seed"] == 7
    assert ck.config == model.config

    model2 = make_model(seed=99)
    opt2 = build_optimizer(model2, lr=1e-2)
    ck.restore_model(model2)
    ck.restore_optimizer(opt2)
    for (n, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for idx in s1["state"]:
        for k, v in s1["state"][idx].items():
            torch.testing.assert_close(v, s2["state"][idx][k], rtol=0, atol=0)

    _draws()  # move every RNG on
    ck.restore_rng()
    assert _draws() == expected


def test_tied_embedding_stays_tied(tmp_path, make_model):
    model, opt = _trained(make_model)
    save_checkpoint(tmp_path, 1, model, opt)
    loaded, state = load_model(tmp_path, "cpu")
    assert loaded.lm_head.weight is loaded.embed.weight
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)
    assert not loaded.training
    assert state["step"] == 1 and state["checkpoint_path"].endswith("step_0000001")
    x = torch.randint(0, 64, (1, 8))
    torch.testing.assert_close(loaded(x), model.eval()(x))


def test_untied_model_round_trip(tmp_path, make_model):
    model = make_model(tie_embeddings=False)
    save_checkpoint(tmp_path, 1, model)
    loaded, _ = load_model(tmp_path)
    assert loaded.lm_head.weight is not loaded.embed.weight
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)


def test_extra_files_writer_goes_into_checkpoint(tmp_path, make_model):
    model = make_model()
    path = save_checkpoint(tmp_path, 3, model, extra_files_writer=lambda d: (d / "tok.json").write_text("{}"))
    assert (path / "tok.json").read_text() == "{}"


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, make_model, monkeypatch):
    model, opt = _trained(make_model)
    good = save_checkpoint(tmp_path, 1, model, opt)
    weights = {k: v.clone() for k, v in model.state_dict().items()}

    real = ckpt_files.write_json

    def crash(path, obj):  # model/optimizer/rng files are already written by now
        raise OSError("disk full (simulated)")

    with torch.no_grad():
        model.embed.weight.add_(1.0)
    monkeypatch.setattr(ckpt_files, "write_json", crash)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(tmp_path, 2, model, opt)
    monkeypatch.setattr(ckpt_files, "write_json", real)

    assert (tmp_path / "latest").read_text().strip() == "step_0000001"
    assert not (tmp_path / "step_0000002").exists()
    ck = load_checkpoint(tmp_path)
    assert ck.path == good
    torch.testing.assert_close(ck.state_dict()["embed.weight"], weights["embed.weight"], rtol=0, atol=0)

    # a crash during an extra-files writer is just as harmless
    def bad_writer(folder):
        raise RuntimeError("tokenizer save failed")

    with pytest.raises(RuntimeError):
        save_checkpoint(tmp_path, 2, model, opt, extra_files_writer=bad_writer)
    assert load_checkpoint(tmp_path).path == good

    # the next successful save publishes normally and cleans the leftovers
    save_checkpoint(tmp_path, 2, model, opt)
    assert load_checkpoint(tmp_path).step == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_keep_prunes_oldest(tmp_path, make_model):
    model = make_model()
    for step in (1, 2, 3, 4, 5):
        save_checkpoint(tmp_path, step, model, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000004", "step_0000005"]
    assert load_checkpoint(tmp_path).step == 5


def test_resave_same_step_replaces(tmp_path, make_model):
    model = make_model()
    save_checkpoint(tmp_path, 4, model, trainer_state={"tag": "a"})
    save_checkpoint(tmp_path, 4, model, trainer_state={"tag": "b"})
    assert load_checkpoint(tmp_path).trainer_state["tag"] == "b"
    assert len(list_checkpoints(tmp_path)) == 1


def test_step_folder_and_missing_path(tmp_path, make_model):
    model = make_model()
    path = save_checkpoint(tmp_path, 1, model)
    assert load_checkpoint(path).path == path
    with pytest.raises(SpeedlmError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SpeedlmError, match="no checkpoint at"):
        load_checkpoint(empty)


def test_truncated_safetensors_is_reported(tmp_path, make_model):
    model = make_model()
    path = save_checkpoint(tmp_path, 1, model)
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(SpeedlmError, match=r"model\.safetensors is corrupt"):
        load_checkpoint(tmp_path)
    f.write_bytes(f.read_bytes()[:3])  # too short even for the header length
    with pytest.raises(SpeedlmError, match=r"model\.safetensors is corrupt"):
        load_model(tmp_path)


@pytest.mark.parametrize("name", ["config.json", "trainer_state.json"])
def test_garbage_json_is_reported(tmp_path, make_model, name):
    model = make_model()
    path = save_checkpoint(tmp_path, 1, model)
    (path / name).write_text("{not json")
    with pytest.raises(SpeedlmError, match=rf"{name.replace('.', r'[.]')} is corrupt"):
        load_checkpoint(path)


def test_valid_json_wrong_content_is_reported(tmp_path, make_model):
    model = make_model()
    path = save_checkpoint(tmp_path, 1, model)
    (path / "config.json").write_text(json.dumps({"d_model": -3}))
    with pytest.raises(SpeedlmError, match=r"config\.json is corrupt"):
        load_checkpoint(path)


def test_bad_latest_pointer(tmp_path, make_model):
    save_checkpoint(tmp_path, 1, make_model())
    (tmp_path / "latest").write_text("step_0000009\n")
    with pytest.raises(SpeedlmError, match="latest"):
        load_checkpoint(tmp_path)
    (tmp_path / "latest").write_text("../../etc\n")
    with pytest.raises(SpeedlmError, match="latest is corrupt"):
        load_checkpoint(tmp_path)


def test_capture_rng_is_uint8(tmp_path):
    states = capture_rng()
    assert all(t.dtype == torch.uint8 for t in states.values())
