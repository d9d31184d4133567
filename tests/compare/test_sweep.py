"""The scaling sweep: statistics over seeds, the fitted law, a tiny ladder end to end (resumed
without retraining), the Ray executor against the local one, and bad input."""

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from speedlm.cli import main
from speedlm.compare import TIMING_FIELDS
from speedlm.compare.plan import count_params, width_for_tokens_per_param
from speedlm.compare.scaling import FAR_FACTOR, Fit, crossings
from speedlm.compare.stats import mean_interval, rank_stability, ranks, separated
from speedlm.compare.sweep import SweepOptions, run_sweep
from speedlm.models import ModelConfig, build_model, resolve_config
from support.compare import tiny_options


# ----------------------------------------------------------------------------- statistics


def test_the_interval_is_students_t_of_the_mean():
    xs = [2.0, 2.2, 2.1, 2.5]
    got = mean_interval(xs)
    half = scipy_stats.t.ppf(0.975, 3) * np.std(xs, ddof=1) / 2
    assert got["mean"] == pytest.approx(2.2) and got["n"] == 4
    assert (got["lo"], got["hi"]) == pytest.approx((2.2 - half, 2.2 + half))
    one = mean_interval([3.0])
    assert one["mean"] == 3.0 and one["lo"] is None  # one seed: no interval
    assert mean_interval([None, float("nan")])["mean"] is None


def test_neighbours_are_separated_only_when_their_intervals_do_not_overlap():
    a, b, c = mean_interval([1.0, 1.1, 1.2]), mean_interval([2.0, 2.1, 2.2]), mean_interval([1.15, 1.3, 1.2])
    assert separated(a, b) is True and separated(a, c) is False
    assert separated(a, mean_interval([5.0])) is None


def test_rank_stability_counts_orders_across_seeds():
    same = rank_stability([{"a": 1.0, "b": 2.0, "c": 3.0}, {"a": 1.1, "b": 2.1, "c": 3.3}])
    assert same["kendall_tau_mean"] == pytest.approx(1.0) and same["ranks"]["c"] == [3, 3]
    flipped = rank_stability([{"a": 1.0, "b": 2.0}, {"a": 2.0, "b": 1.0}])
    assert flipped["kendall_tau_mean"] == pytest.approx(-1.0) and flipped["ranks"] == {"a": [1, 2], "b": [2, 1]}
    assert ranks({"x": 1.0, "y": 1.0}) == {"x": 1, "y": 2}  # ties broken by name


# ----------------------------------------------------------------------------- the law


def _points(e, a, alpha, budgets, seeds, noise, rng):
    return [(c, e + a * c ** -alpha + rng.normal(0, noise), s) for c in budgets for s in range(seeds)]


def test_the_fit_recovers_a_known_law_and_predicts_it():
    budgets = [1e10, 3e10, 1e11, 3e11, 1e12]
    fit = Fit(_points(1.7, 300.0, 0.27, budgets, 1, 0.0, np.random.default_rng(0)))
    s = fit.summary()
    assert (s["E"], s["A"], s["alpha"]) == pytest.approx((1.7, 300.0, 0.27), rel=1e-3)
    assert fit.prediction(1e13)["loss"] == pytest.approx(1.7 + 300.0 * 1e13 ** -0.27, rel=1e-4)
    three = Fit(_points(1.7, 300.0, 0.27, budgets[:3], 1, 0.0, np.random.default_rng(0)))
    assert "interval" not in three.prediction(1e13)  # no more points than parameters: no interval


def test_intervals_shrink_when_seeds_are_added():
    budgets = [1e10, 3e10, 1e11, 3e11, 1e12]
    truth = 1.7 + 300.0 * 3e12 ** -0.27
    widths = {2: [], 8: []}
    for draw in range(4):  # the width of one small sample is itself noisy: compare averages
        for seeds in widths:
            fit = Fit(_points(1.7, 300.0, 0.27, budgets, seeds, 0.02, np.random.default_rng(draw)))
            lo, hi = fit.prediction(3e12)["interval"]
            widths[seeds].append(hi - lo)
    assert np.mean(widths[8]) < 0.7 * np.mean(widths[2]), widths
    assert abs(Fit(_points(1.7, 300.0, 0.27, budgets, 8, 0.02, np.random.default_rng(9))).prediction(3e12)["loss"]
               - truth) < 0.05


def test_crossings_are_where_two_laws_meet():
    budgets = [1e10, 1e11, 1e12]
    f = Fit(_points(2.0, 100.0, 0.2, budgets, 1, 0.0, np.random.default_rng(0)))
    g = Fit(_points(1.5, 1000.0, 0.3, budgets, 1, 0.0, np.random.default_rng(0)))
    found = crossings(f, g, 1e8, 1e16)
    assert len(found) == 1
    assert f.predict(found[0]) == pytest.approx(g.predict(found[0]), abs=1e-9)


# ----------------------------------------------------------------------------- end to end


def _sweep_options(tmp_path, name, **kw):
    o = tiny_options(tmp_path, name, budget=None, mqar=None, contexts=(32,), presets=["transformer-tiny", "hgrn-tiny"])
    return SweepOptions(compare=o, **kw)


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items()
                if k not in TIMING_FIELDS and k not in ("out_dir", "command", "files", "executor", "runs")}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def test_a_tiny_ladder_fits_every_model_predicts_and_resumes_without_training(tmp_path, monkeypatch):
    s = _sweep_options(tmp_path, "ladder", budgets=[1e9, 2e9, 4e9], seeds=2, target_budget=1e11)
    report = run_sweep(s, progress=False)
    assert [b["budget"] for b in report["budgets"]] == [1e9, 2e9, 4e9]
    for b in report["budgets"]:
        assert sorted(b["leaderboard"]) == ["hgrn-tiny", "transformer-tiny"]
        for e in b["models"]:
            assert e["runs"] == 2 and len(e["val_loss"]["values"]) == 2
            assert e["val_loss"]["lo"] <= e["val_loss"]["mean"] <= e["val_loss"]["hi"]
            assert e["train_tok_per_s"]["timing"] and "lo" not in e["train_tok_per_s"]
        first = next(e for e in b["models"] if e["name"] == b["leaderboard"][0])
        assert first["separated_from_next"] in (True, False)
        assert len(b["rank_stability"]["ranks"]["hgrn-tiny"]) == 2
    fits = report["fits"]
    for name in ("transformer-tiny", "hgrn-tiny"):
        f = fits["models"][name]
        assert f["ok"] and f["points"] == 6 and f["dof"] == 3 and f["alpha"] > 0
        assert f["alpha_interval"][0] <= f["alpha"] <= f["alpha_interval"][1]
    target = fits["target"]
    assert target["far"] is (1e11 > FAR_FACTOR * 4e9) and sorted(target["ranking"]) == ["hgrn-tiny", "transformer-tiny"]
    saved = json.loads((tmp_path / "ladder" / "sweep.json").read_text())
    assert saved["fits"]["models"]["hgrn-tiny"]["alpha"] == pytest.approx(fits["models"]["hgrn-tiny"]["alpha"])
    md = (tmp_path / "ladder" / "sweep.md").read_text()
    assert "Predicted at 1e+11 FLOPs" in md and "Warning" in md and "rank per seed" in md
    assert (tmp_path / "ladder" / "scaling_loss_vs_compute.png").stat().st_size > 1000

    import speedlm.train as train_module

    def no_training(*a, **k):
        raise AssertionError("a resumed sweep trained again")

    monkeypatch.setattr(train_module, "train", no_training)
    again = run_sweep(_sweep_options(tmp_path, "ladder", budgets=[1e9, 2e9, 4e9], seeds=2, target_budget=1e11),
                      progress=False)
    assert _strip(again["budgets"]) == _strip(report["budgets"])


def _tokens_per_param_gap(cfg, budget: float, ratio: float) -> float:
    with torch.device("meta"):
        fpt = build_model(cfg).flops_per_token(256, training=True)
    return abs(math.log(budget / fpt / count_params(cfg)[2] / ratio))


def test_tokens_per_param_sizes_the_first_model_for_each_budget():
    cfg = resolve_config("transformer-tiny")
    small, large = (width_for_tokens_per_param(cfg, b, 20, 256) for b in (1e11, 1e13))
    assert small.d_model < cfg.d_model < large.d_model
    for chosen, budget in ((small, 1e11), (large, 1e13)):  # the closest ratio the width steps allow
        for width in (chosen.d_model - 2 * chosen.n_heads, chosen.d_model + 2 * chosen.n_heads):
            other = ModelConfig.from_dict(dict(chosen.to_dict(), d_model=width))
            assert _tokens_per_param_gap(chosen, budget, 20) <= _tokens_per_param_gap(other, budget, 20) + 1e-12


def test_the_ray_executor_merges_the_same_report_as_the_local_one(tmp_path):
    pytest.importorskip("ray")
    local = run_sweep(_sweep_options(tmp_path, "local", budgets=[1e9, 2e9], seeds=2), progress=False)
    ray = run_sweep(_sweep_options(tmp_path, "ray", budgets=[1e9, 2e9], seeds=2, executor="ray", cpus_per_run=1),
                    progress=False)
    assert _strip(ray["budgets"]) == _strip(local["budgets"])
    assert (tmp_path / "ray" / "runs").is_dir() and (tmp_path / "ray" / "sweep.md").exists()


def test_a_time_ladder_under_ray_trains_the_steps_calibrated_beside_nothing(tmp_path, monkeypatch):
    """Time budgets under Ray: this process calibrates every run's steps before any task starts
    (with a task's threads), and each task trains exactly those steps, calibrating nothing."""
    pytest.importorskip("ray")
    import speedlm.compare.run as run_module
    from speedlm.compare.resume import load_plans

    calibrated = []
    real = run_module.calibrate_steps

    def counted(plan, o, data):
        calibrated.append((plan.name, o.time_budget, torch.get_num_threads()))
        return real(plan, o, data)

    monkeypatch.setattr(run_module, "calibrate_steps", counted)
    s = _sweep_options(tmp_path, "time", time_budgets=[0.5, 1.0], executor="ray", cpus_per_run=1)
    s.compare.presets = ["hgrn-tiny"]
    report = run_sweep(s, progress=False)
    assert sorted(calibrated) == [("hgrn-tiny", 0.5, 1), ("hgrn-tiny", 1.0, 1)]  # here, once per run, 1 thread
    for run_dir in sorted((tmp_path / "time" / "runs").iterdir()):
        steps = load_plans(str(run_dir))["hgrn-tiny"]["steps"]
        saved = json.loads((run_dir / "report.json").read_text())
        assert saved["models"][0]["status"] == "ok" and saved["models"][0]["steps"] == steps
    assert [b["budget"] for b in report["budgets"]] == [0.5, 1.0]


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "args, message",
    [
        (["--budgets", "2e9,1e9"], "--budgets must increase"),
        (["--budgets", "1e9,-2e9"], "--budgets must be positive"),
        (["--budgets", "1e9,2e9", "--budget", "1e9"], "--budgets replaces --budget"),
        (["--budgets", "1e9", "--time-budgets", "5"], "either --budgets"),
        (["--seeds", "0"], "--seeds must be an integer >= 1"),
        (["--budgets", "1e9,2e9,4e9", "--target-budget", "5e8"], "is below the ladder"),
        (["--budgets", "1e9,2e9", "--target-budget", "1e10"], "at least 3 budgets"),
        (["--seeds", "2", "--cpus-per-run", "2"], "--cpus-per-run is an option of --executor ray"),
        (["--seeds", "2", "--ray-address", "auto"], "--ray-address is an option of --executor ray"),
        (["--time-budgets", "1,2", "--tokens-per-param", "20"], "--tokens-per-param sizes models"),
    ],
)
def test_bad_sweep_input_is_one_line_and_exit_code_2(args, message, tmp_path, capsys):
    assert main(["compare", "--presets", "transformer-tiny", "--out", str(tmp_path / "x"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "x" / "runs").exists()


def test_ray_without_ray_installed_is_one_line_with_the_install_hint(tmp_path, capsys, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_ray(name, *a, **k):
        if name == "ray":
            raise ImportError("no ray")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    assert main(["compare", "--presets", "transformer-tiny", "--executor", "ray", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "speedlm[sweep]" in err and len(err.splitlines()) == 1
