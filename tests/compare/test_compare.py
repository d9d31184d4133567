"""`speedlm compare`: fair compute, a complete report, repeatable numbers, failures contained."""

import json
import math
import os

import pytest
import torch

from speedlm.cli import main
from speedlm.compare import plan_model, run_compare, steps_for_budget
from speedlm.compare.plan import BudgetTooSmall, count_params, match_width
from speedlm.models import build_model, resolve_config
from support.compare import _strip_timings, tiny_options

# ----- fair compute --------------------------------------------------------------------
def test_the_budget_scheduler_gives_each_model_the_steps_its_cost_implies():
    budget, batch, seq = 1e12, 8, 512
    plans = [plan_model(p, resolve_config(p), budget, batch, seq, None) for p in ("transformer-tiny", "sliding-window-tiny")]
    for p in plans:
        per_step = p.flops_per_token * batch * seq
        assert p.steps == math.floor(budget / per_step) == steps_for_budget(budget, p.flops_per_token, batch * seq)
        assert budget - per_step < p.train_flops <= budget  # the whole budget, to within one step
        assert p.tokens == p.steps * batch * seq
    full, window = plans
    assert window.flops_per_token < full.flops_per_token and window.steps > full.steps  # cheaper: more steps


def test_widths_are_chosen_so_non_embedding_parameters_match_the_first_model():
    target = count_params(resolve_config("transformer-tiny"))[1]
    gqa = resolve_config("gqa-tiny")  # fewer K/V parameters at the same width
    matched = match_width(gqa, target)
    gap = lambda cfg: abs(math.log(count_params(cfg)[1] / target))  # noqa: E731
    assert matched.d_model != gqa.d_model and matched.d_model % (2 * gqa.n_heads) == 0
    assert gap(matched) < gap(gqa) and gap(matched) < 0.05
    assert count_params(match_width(resolve_config("linear-attention-tiny"), target))[1] == target  # same shape: kept


def test_moe_models_are_matched_on_active_parameters_and_trained_for_active_flops():
    target = count_params(resolve_config("transformer-tiny"))[1]
    mixtral = resolve_config("mixtral-tiny")
    total, non_embedding, active = count_params(mixtral)
    assert active < non_embedding  # six of eight experts idle for each token
    matched = match_width(mixtral, target)
    assert matched.d_model < mixtral.d_model  # two full-width experts per token: narrower to match
    gap = lambda cfg: abs(math.log(count_params(cfg)[2] / target))  # noqa: E731
    assert gap(matched) < gap(mixtral)  # the closest of the widths in steps of 2 x n_heads
    plan = plan_model("mixtral-tiny", mixtral, 1e12, 4, 64, target)
    row = plan.to_dict()
    assert row["params_active"] < row["params"] and row["params_active_non_embedding"] == count_params(matched)[2]
    with torch.device("meta"):
        assert plan.flops_per_token == build_model(matched).flops_per_token(64)  # active FLOPs


def test_a_budget_below_one_step_is_refused():
    with pytest.raises(BudgetTooSmall, match="too small for one training step of transformer-tiny"):
        plan_model("transformer-tiny", resolve_config("transformer-tiny"), 1e6, 16, 256, None)


# ----- the job -------------------------------------------------------------------------
def test_a_tiny_compare_completes_with_every_model_and_column_and_repeats_exactly(tmp_path):
    first = run_compare(tiny_options(tmp_path, "a"), progress=False)
    models = {m["name"]: m for m in first["models"]}
    assert list(models) == ["transformer-tiny", "sliding-window-tiny"]
    for m in models.values():
        assert m["status"] == "ok"
        for key in ("params", "train_flops_per_token", "steps", "val_loss", "val_ppl", "mqar_accuracy",
                    "train_tok_per_s", "prefill_tok_s", "decode_ms", "state_bytes", "curve"):
            assert key in m, key
        assert m["val_ppl"] == pytest.approx(math.exp(m["val_loss"]))
        assert set(m["decode_ms"]) == {32, 64} and all(v > 0 for v in m["decode_ms"].values())
        assert m["state_bytes"][4096] > 0 and m["state_bytes"][65536] >= m["state_bytes"][4096]
        assert m["cache_bytes"][64] == m["state_bytes"][64]  # the measured cache is what was promised
        assert len(m["curve"]) >= 2 and m["curve"][-1]["train_flops"] == pytest.approx(m["train_flops"])
        # counted and executed FLOPs of a training step on the trained model, side by side
        assert m["counted_flops_per_token"] == pytest.approx(m["train_flops_per_token"])
        assert 0 < m["counted_visible_flops_per_token"] <= m["counted_flops_per_token"]
        assert m["executed_flops_per_token"] >= 0.99 * m["counted_visible_flops_per_token"]
    full, window = models["transformer-tiny"], models["sliding-window-tiny"]
    assert window["steps"] > full["steps"]
    # full attention executes what it counts; the window's band plan reads a few keys more than its
    # 32 (blocks of 10 queries read 41 keys), at most 1.5x of the attention products, a part of the step
    assert full["executed_flops_per_token"] == pytest.approx(full["counted_visible_flops_per_token"], rel=0.1)
    assert window["counted_visible_flops_per_token"] < window["executed_flops_per_token"] \
        <= 1.5 * window["counted_visible_flops_per_token"]
    assert full["state_bytes"][65536] == 16 * full["state_bytes"][4096]  # full KV cache: linear in context
    assert window["state_bytes"][65536] == window["state_bytes"][4096]  # window: bounded
    out = tmp_path / "a"
    md = (out / "report.md").read_text()
    assert "speedlm compare (test)" in md and first["meta"]["data"]["fingerprint"] in md
    assert "measured in one process" in md and "| 1 |" in md and "| 2 |" in md
    assert "## Counted and executed FLOPs" in md
    assert "What it cost:" in md and all(m["mqar_train_flops"] > 0 for m in models.values())  # the recall probe's cost
    for m in models.values():  # a probe stops once solved; one that did not is flagged or converged
        assert 1 <= m["mqar_steps"] <= first["meta"]["options"]["mqar"]["steps"] and "mqar_flag" in m
        if m["mqar_solved_at"] is not None:
            assert m["mqar_steps"] == m["mqar_solved_at"] and m["mqar_accuracy"] >= 0.99 and m["mqar_flag"] is None
    for name in ("compare_loss_vs_flops.png", "compare_decode_latency.png", "compare_cache_bytes.png", "compare_mqar_vs_state.png"):
        assert (out / name).stat().st_size > 1000
    saved = json.loads((out / "report.json").read_text())
    assert saved["models"][0]["val_loss"] == full["val_loss"]
    assert os.path.isdir(out / "models" / "transformer-tiny")  # each model's checkpoint, for eval / generate

    second = run_compare(tiny_options(tmp_path, "b"), progress=False)
    a, b = _strip_timings(first), _strip_timings(second)
    a["meta"]["options"].pop("out_dir"), b["meta"]["options"].pop("out_dir")
    a.pop("files"), b.pop("files")
    assert a == b  # same seed: identical numbers, timings aside


def test_a_failing_model_is_reported_and_the_others_finish(tmp_path):
    from speedlm.models.registry import MIXERS
    from support.parts import NoMixing

    class NaNMixer(NoMixing):  # a model whose loss is NaN: training diverges
        def mix(self, x, meta, cache=None):
            return super().mix(x, meta, cache) * float("nan")

    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"vocab_size": 256, "d_model": 32, "n_layers": 3, "pattern": "AA"}))  # does not tile
    diverging = tmp_path / "diverging.json"
    diverging.write_text(json.dumps({"vocab_size": 256, "d_model": 64, "n_layers": 2, "n_heads": 4, "max_seq_len": 512,
                                     "layers": {"A": {"mixer": {"name": "test_nan"}}}}))
    MIXERS.register("test_nan", NaNMixer, family="test", description="test", paper="-")
    try:
        report = run_compare(tiny_options(tmp_path, presets=["transformer-tiny", str(diverging), str(broken)]), progress=False)
    finally:
        MIXERS.unregister("test_nan")
    rows = {os.path.basename(m["name"]): m for m in report["models"]}
    assert rows["transformer-tiny"]["status"] == "ok"
    assert rows["diverging.json"]["status"] == "failed" and "diverged" in rows["diverging.json"]["reason"]
    assert rows["broken.json"]["status"] == "failed" and "does not tile" in rows["broken.json"]["reason"]
    md = (tmp_path / "run" / "report.md").read_text()
    assert "diverged" in md and "does not tile" in md and "| 1 | transformer-tiny |" in md
    assert "diverged" in (tmp_path / "run" / "errors.log").read_text()


def test_ctrl_c_writes_the_report_of_the_models_finished_so_far(tmp_path, monkeypatch):
    import speedlm.compare.run as run

    real = run._run_model

    def interrupt_second(o, plan, *args):
        if plan.name == "sliding-window-tiny":
            raise KeyboardInterrupt
        return real(o, plan, *args)

    monkeypatch.setattr(run, "_run_model", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        run_compare(tiny_options(tmp_path, presets=["transformer-tiny", "sliding-window-tiny", "linear-attention-tiny"]),
                    progress=False)
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert [m["status"] for m in saved["models"]] == ["ok", "interrupted", "not run"]


# ----- bad input -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, message",
    [
        (["--presets", "transformer-tiny,warp-drive"], "unknown preset 'warp-drive'"),
        (["--budget", "0"], "--budget must be a positive"),
        (["--budget=-5e12"], "--budget must be a positive"),
        (["--budget", "1e6"], "too small for one training step"),
        (["--seq-len", "4096"], "longer than transformer-tiny can hold"),
        (["--budget", "1e12", "--time-budget", "60"], "not both"),
        (["--time-budget", "0"], "--time-budget must be a positive"),
        (["--time-budget=-3"], "--time-budget must be a positive"),
        (["--resume"], "holds no earlier compare run"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(args, message, tmp_path, capsys):
    argv = ["compare", "--presets", "transformer-tiny", "--out", str(tmp_path / "x"), *args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_an_unwritable_output_folder_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["compare", "--out", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not writable" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("preset", sorted(__import__("speedlm.models.presets", fromlist=["presets_for"]).presets_for("ar")))
def test_every_preset_plans_on_the_meta_device(preset):
    """compare sizes models on the meta device: FLOPs and parameters must not need real tensors,
    and must be what the real model reports."""
    cfg = resolve_config(f"{preset}-tiny")
    plan = plan_model(preset, cfg, 1e12, 2, 64, None)
    real = build_model(cfg)
    assert plan.flops_per_token == pytest.approx(real.flops_per_token(64))
    assert count_params(cfg)[0] == real.num_params()


def test_a_diffusion_lm_joins_the_comparison_with_its_bound_and_without_next_token_rows(tmp_path):
    report = run_compare(tiny_options(tmp_path, presets=["transformer-tiny", "mdlm-tiny"]), progress=False)
    rows = {m["name"]: m for m in report["models"]}
    ar, dm = rows["transformer-tiny"], rows["mdlm-tiny"]
    assert ar["status"] == dm["status"] == "ok"
    assert dm["bound"] and not ar["bound"]
    assert "mqar_accuracy" in ar and "mqar_accuracy" not in dm  # next-token recall does not apply
    assert dm["decode_ms"] == {} and set(dm["prefill_tok_s"]) == {32, 64}
    assert abs(dm["params_non_embedding"] / ar["params_non_embedding"] - 1) < 0.05  # matched like any other model
    md = (tmp_path / "run" / "report.md").read_text()
    assert "(bound)" in md and "≤ " in md


def test_inference_state_and_mqar_columns_are_measured_on_the_trained_models(tmp_path):
    """A fresh mod-tiny routes about half of all tokens, a trained one what its router learned:
    the row's caches, state and learned values are the trained checkpoint's (loaded here again,
    independently), not a fresh model's."""
    from speedlm.checkpoint import load_pretrained
    from speedlm.data import encode_corpus, load_corpus, make_tokenizer

    report = run_compare(tiny_options(tmp_path, presets=["mod-tiny", "adaptive-span-tiny"], budget=2e10), progress=False)
    corpus = load_corpus("stdlib")
    _, val = encode_corpus(corpus, make_tokenizer("byte", corpus))
    for row in report["models"]:
        assert row["status"] == "ok", row.get("reason")
        trained = load_pretrained(row["checkpoint"]).model
        ids = torch.as_tensor(val[:80], dtype=torch.long)[None]
        for n in (32, 64):  # what the trained model's cache holds after n tokens of the same text
            cache = trained.init_cache()
            with torch.no_grad():
                trained(ids[:, :n], cache)
            assert row["cache_bytes"][n] == cache.nbytes()
            assert row["state_bytes"][n] == trained.state_bytes(n, 1, 4)  # declared at the learned values
        summary = trained.learned_summary()
        if row["name"] == "adaptive-span-tiny":
            assert [layer["spans"] for layer in row["learned"]] == [layer["spans"] for layer in summary]
        else:
            assert 0 <= row["learned"][1]["routed_fraction"] <= 1 and row["learned"][1]["capacity"] == 0.125
        assert row["mqar_cache_bytes"] is not None and row["mqar_state_bytes"] > 0
    md = open(os.path.join(tmp_path / "run", "report.md")).read()
    assert "## Data-dependent models as trained" in md and "spans" in md


def test_an_equal_time_compare_calibrates_steps_and_resumes_with_them(tmp_path):
    opts = dict(presets=["transformer-tiny", "linear-attention-tiny"], budget=None, time_budget=1.5, mqar=None)
    report = run_compare(tiny_options(tmp_path, "t", **opts), progress=False)
    plan = json.loads((tmp_path / "t" / "compare_plan.json").read_text())["plans"]
    for m in report["models"]:
        assert m["status"] == "ok" and m["steps"] == plan[m["name"]]["steps"] >= 1
        assert m["train_flops"] == pytest.approx(m["steps"] * 4 * 64 * m["planned_flops_per_token"])
    md = (tmp_path / "t" / "report.md").read_text()
    assert "1.5 s of training on this machine" in md
    again = run_compare(tiny_options(tmp_path, "t", **opts), progress=False)  # the calibrated steps are reused
    assert [m["steps"] for m in again["models"]] == [m["steps"] for m in report["models"]]
