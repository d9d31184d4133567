"""A checkpoint folder in `speedlm compare --presets` is a pretrained entry: measured as saved
(its own width, weights and tokenizer), never trained nor the width target, no trained MQAR
probe but the zero-shot one on its weights, its
loss in its own tokens and left unranked; the inference columns run on its weights. Resume
reuses its stages; a corrupt folder fails its own row only."""

import json
import math
import os

import pytest
import torch

from speedlm.compare import run_compare
from speedlm.compare.report import PRETRAINED_MARK, ranked
from speedlm.errors import SpeedlmError

from support.compare import _strip_timings, tiny_options

BPE_VOCAB = 300  # not the compare's byte tokenizer: the loss must be in the checkpoint's own tokens


def _bpe_tokenizer(folder):
    from speedlm.data.corpus import Corpus
    from speedlm.data.tokenizers import train_bpe

    text = "".join(f"def f{i}(x):\n    return x * {i} + len('abc')\n\n" for i in range(400))
    return train_bpe(Corpus("tiny", text, text, "tinybpe00000", 1), BPE_VOCAB, cache_dir=folder)


def _save_checkpoint(run_dir, tokenizer, seed: int = 1, d_model: int = 32):
    """A speedlm run folder of a 2-layer transformer (width 32, not transformer-tiny's 64) with
    a BPE tokenizer, as `speedlm hf import` writes one (step 0, no training state)."""
    from speedlm.checkpoint.files import publish_step
    from speedlm.models import build_model, resolve_config

    torch.manual_seed(seed)
    model = build_model(resolve_config("transformer-tiny", vocab_size=tokenizer.vocab_size, d_model=d_model))
    publish_step(run_dir, 0, model, {"tokenizer": tokenizer.spec()}, write_files=tokenizer.save)
    return str(run_dir)


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """One compare of [checkpoint, transformer-tiny] (the checkpoint first: it must not become
    the width target), with SPEEDLM_CACHE in a temporary folder (the BPE ids of the split)."""
    root = tmp_path_factory.mktemp("pretrained")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPEEDLM_CACHE", str(root / "cache"))
        tok = _bpe_tokenizer(root / "bpe")
        ckpt = _save_checkpoint(root / "ckpt", tok)
        options = dict(presets=[ckpt, "transformer-tiny"], budget=4e8)  # one step of transformer-tiny
        report = run_compare(tiny_options(root, "run", **options), progress=False)
        yield root, ckpt, tok, options, report


def test_a_checkpoint_is_evaluated_as_saved_in_its_own_tokens_and_not_trained(compared):
    from speedlm.checkpoint import load_pretrained
    from speedlm.data import encode_split, load_corpus
    from speedlm.train import evaluate

    root, ckpt, tok, _, report = compared
    rows = {m["name"]: m for m in report["models"]}
    pre, trained = rows[ckpt], rows["transformer-tiny"]
    assert pre["status"] == "ok" and trained["status"] == "ok", (pre.get("reason"), trained.get("reason"))
    assert pre["pretrained"] and "pretrained" not in trained
    # never trained, never resized; transformer-tiny (second) is the width target and keeps 64
    assert pre["steps"] == pre["tokens"] == 0 and pre["train_flops"] == 0 and pre["curve"] == []
    assert pre["d_model"] == 32 and trained["d_model"] == trained["preset_d_model"] == 64
    assert pre["config"]["vocab_size"] == BPE_VOCAB and trained["config"]["vocab_size"] == 256
    assert pre["tokenizer"] == tok.spec() and pre["same_tokenizer"] is False
    assert not os.path.exists(os.path.join(root, "run", "models", os.path.basename(ckpt), "latest"))  # no training run

    # its weights on the compare's validation text in its own tokens: `speedlm eval`'s number
    loaded = load_pretrained(ckpt)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPEEDLM_CACHE", str(root / "cache"))
        ids = encode_split(load_corpus("stdlib"), loaded.tokenizer, "val")
    direct = evaluate(loaded.model, ids, 4, 64, 2, "cpu")
    assert pre["val_loss"] == direct["loss"] and pre["val_tokens"] == direct["tokens"] == 2 * 4 * 64
    fresh = evaluate(_fresh(pre["config"]), ids, 4, 64, 2, "cpu")
    assert fresh["loss"] != direct["loss"]  # a freshly initialised model would not give it
    nbytes = len(tok.decode(ids[1 : direct["tokens"] + 1]).encode("utf-8"))
    assert pre["val_bytes"] == nbytes > direct["tokens"]  # BPE tokens hold more than a byte
    assert math.isclose(pre["val_bits_per_byte"], direct["loss"] * direct["tokens"] / nbytes / math.log(2))
    # a byte-tokenizer row: one token per byte
    assert trained["val_bytes"] == trained["val_tokens"]
    assert math.isclose(trained["val_bits_per_byte"], trained["val_loss"] / math.log(2))

    # no trained MQAR probe but the zero-shot one on its weights; inference columns like a trained model's
    assert "mqar_accuracy" not in pre and "pretrained" in pre["mqar_skipped"] and "mqar_accuracy" in trained
    assert "mqar_zero_shot" not in trained
    from speedlm.compare.zero_shot_recall import zero_shot_mqar

    setting = tiny_options(root, "x").mqar
    z = zero_shot_mqar(loaded.model, ids, setting, seed=0)
    assert pre["mqar_zero_shot"] == z["accuracy"] and pre["mqar_zero_shot_queries"] == z["queries"] > 0
    for key in ("prefill_tok_s", "decode_ms", "cache_bytes"):
        assert set(pre[key]) == {32, 64} and all(v > 0 for v in pre[key].values())
    assert pre["state_bytes"][64] == loaded.model.state_bytes(64, 1, 4)
    assert set(pre["seconds"]) == {"pretrained", "inference", "total"}


def pre_row(report, name):
    return next(m for m in report["models"] if m["name"] == name)


def _fresh(config: dict):
    from speedlm.models import ModelConfig, build_model

    torch.manual_seed(0)
    return build_model(ModelConfig.from_dict(config))


def test_the_report_lists_a_pretrained_entry_unranked_with_its_footnote(compared):
    root, ckpt, _, _, report = compared
    assert all(os.path.exists(p) for p in report["files"].values())  # the plots draw a pretrained entry too
    md = (root / "run" / "report.md").read_text()
    assert "| 1 | transformer-tiny |" in md
    assert f"| {PRETRAINED_MARK} | {ckpt} |" in md and f"(own tokens){PRETRAINED_MARK}" in md
    assert "0 (pretrained)" in md and "listed unranked" in md and f"{ckpt}: bpe, {BPE_VOCAB} tokens" in md
    assert f"{pre_row(report, ckpt)['mqar_zero_shot']:.3f}ᶻ" in md and "Zero-shot, on the checkpoint's own weights" in md
    assert "Not probed" not in md and f"| {ckpt} | 32 (as saved) |" in md
    saved = json.loads((root / "run" / "report.json").read_text())
    row = next(m for m in saved["models"] if m["name"] == ckpt)
    assert row["pretrained"] and row["tokenizer"]["kind"] == "bpe" and row["val_bits_per_byte"] > 0
    # a pretrained entry is listed after the trained models even with a lower loss
    models = [{"name": "t", "status": "ok", "val_loss": 5.0}, {"name": "p", "status": "ok", "val_loss": 1.0, "pretrained": True},
              {"name": "f", "status": "failed"}]
    assert [m["name"] for m in ranked(models)] == ["t", "p", "f"]


def test_a_rerun_reuses_the_pretrained_stages_and_other_weights_are_refused(compared, monkeypatch):
    import speedlm.compare.run as run

    root, ckpt, tok, options, report = compared
    monkeypatch.setenv("SPEEDLM_CACHE", str(root / "cache"))

    def never(*a, **k):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(run, "write_plots", lambda report, out_dir: {})  # drawn once, in the fixture
    monkeypatch.setattr(run, "pretrained_stage", never)
    monkeypatch.setattr(run, "_train_stage", never)
    again = run_compare(tiny_options(root, "run", resume=True, **options), progress=False)
    a, b = _strip_timings(again), _strip_timings(report)
    for r in (a, b):
        r["meta"].pop("date", None), r.pop("files", None)
        r["meta"]["options"].pop("resume", None)
    assert a["models"] == b["models"]
    # the same path now holding other weights (a newer step): refused, naming the difference
    from speedlm.checkpoint.files import publish_step
    from speedlm.checkpoint import load_pretrained

    publish_step(ckpt, 1, load_pretrained(ckpt).model, {"tokenizer": tok.spec()}, write_files=tok.save)
    with pytest.raises(SpeedlmError, match=r"other arguments \(checkpoints\."):
        run_compare(tiny_options(root, "run", **options), progress=False)


def test_a_corrupt_checkpoint_folder_fails_its_own_row(tmp_path, monkeypatch):
    import speedlm.compare.run as run

    monkeypatch.setattr(run, "write_plots", lambda report, out_dir: {})  # drawn in the fixture's run
    monkeypatch.setenv("SPEEDLM_CACHE", str(tmp_path / "cache"))
    tok = _bpe_tokenizer(tmp_path / "bpe")
    good = _save_checkpoint(tmp_path / "good", tok)
    bad_config = _save_checkpoint(tmp_path / "bad_config", tok)
    bad_weights = _save_checkpoint(tmp_path / "bad_weights", tok)
    no_tokenizer = _save_checkpoint(tmp_path / "no_tokenizer", tok)
    (tmp_path / "bad_config" / "step_0000000" / "config.json").write_text("{not json")
    weights = tmp_path / "bad_weights" / "step_0000000" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    os.remove(tmp_path / "no_tokenizer" / "step_0000000" / "tokenizer.json")
    presets = [good, bad_config, bad_weights, no_tokenizer]
    report = run_compare(tiny_options(tmp_path, presets=presets, mqar=None), progress=False)
    rows = {m["name"]: m for m in report["models"]}
    assert rows[good]["status"] == "ok"
    for name, words in ((bad_config, "config.json is corrupt"), (bad_weights, "model.safetensors"),
                        (no_tokenizer, "tokenizer.json is missing")):
        assert rows[name]["status"] == "failed" and words in rows[name]["reason"], rows[name]
        assert "\n" not in rows[name]["reason"]
    md = (tmp_path / "run" / "report.md").read_text()
    assert "## Models that did not finish" in md and "config.json is corrupt" in md


def test_checkpoint_folders_inside_the_output_or_in_a_sweep_are_one_line(tmp_path):
    from speedlm.compare.sweep import SweepOptions, check_sweep

    inside = tmp_path / "run" / "models" / "x"
    inside.mkdir(parents=True)
    with pytest.raises(SpeedlmError, match="which compare rewrites"):
        run_compare(tiny_options(tmp_path, presets=[str(inside), "transformer-tiny"]), progress=False)
    elsewhere = tmp_path / "ckpt"
    elsewhere.mkdir()
    sweep = SweepOptions(compare=tiny_options(tmp_path, presets=[str(elsewhere), "transformer-tiny"], budget=None),
                         budgets=[1e9, 2e9])
    with pytest.raises(SpeedlmError, match="measured as saved: a sweep trains"):
        check_sweep(sweep)


def test_a_hugging_face_import_joins_as_a_pretrained_entry(tmp_path, monkeypatch):
    """`speedlm hf import`'s folder (a tiny random Llama with a byte-level tokenizer.json) in
    --presets: evaluated and measured as imported, its origin kept in the row."""
    pytest.importorskip("transformers")
    import speedlm.compare.run as run
    from support.hf_models import tiny_hf_model

    from speedlm.checkpoint import load_pretrained
    from speedlm.data import encode_split, load_corpus
    from speedlm.data.tokenizers import ByteTokenizer
    from speedlm.hf import import_model, to_hf_tokenizer
    from speedlm.train import evaluate

    monkeypatch.setattr(run, "write_plots", lambda report, out_dir: {})  # drawn in the fixture's run
    monkeypatch.setenv("SPEEDLM_CACHE", str(tmp_path / "cache"))
    hf = tiny_hf_model("llama", dtype=torch.float32, vocab_size=256)
    hf.save_pretrained(tmp_path / "hf")
    to_hf_tokenizer(ByteTokenizer()).save_pretrained(tmp_path / "hf")
    ckpt = str(tmp_path / "imported")
    import_model(tmp_path / "hf", ckpt)
    report = run_compare(tiny_options(tmp_path, presets=[ckpt]), progress=False)
    (row,) = report["models"]
    assert row["status"] == "ok", row.get("reason")
    assert row["pretrained"] and row["steps"] == 0 and row["imported_from"] == str(tmp_path / "hf")
    assert row["d_model"] == 32 and "mqar_skipped" in row and set(row["decode_ms"]) == {32, 64}
    loaded = load_pretrained(ckpt)
    direct = evaluate(loaded.model, encode_split(load_corpus("stdlib"), loaded.tokenizer, "val"), 4, 64, 2, "cpu")
    assert row["val_loss"] == direct["loss"]
