"""speedlm as lm-evaluation-harness's model "speedlm" (speedlm/harness): every request type
agrees with speedlm's own path for it (rolling log-likelihood with `speedlm eval`'s windows,
loglikelihood with a float64 forward, generate_until with `generate` and its stop strings),
cached scoring serves recurrent models, and `speedlm eval --tasks` runs local task YAMLs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402

from speedlm.cache.policies import make_policy  # noqa: E402
from speedlm.cli import main  # noqa: E402
from speedlm.data.tokenizers import ByteTokenizer  # noqa: E402
from speedlm.errors import SpeedlmError  # noqa: E402
from speedlm.generate import generate  # noqa: E402
from speedlm.generate.stop import StopStrings, cut_at_stop  # noqa: E402
from speedlm.harness.model import SpeedlmLM  # noqa: E402
from speedlm.models import build_model, preset_config  # noqa: E402
from speedlm.train import evaluate  # noqa: E402
from speedlm.train.checkpoint import save_checkpoint  # noqa: E402

TASKS = Path(__file__).resolve().parents[1] / "fixtures" / "lm_eval"
SEQ_LEN = 32
TEXT = "def f(x):\n    return x * 3\n\n" * 12


def tiny_checkpoint(folder: Path, preset: str, **overrides) -> Path:
    """A randomly initialised byte-level checkpoint, as `speedlm train` would leave it, that
    writes varied printable ASCII and newlines (the head's other rows zeroed, weights large
    enough not to repeat one byte), so generated texts and their stop strings are readable."""
    tok = ByteTokenizer()
    model = build_model(preset_config(preset, vocab_size=tok.vocab_size, init_std=0.2, **overrides))
    with torch.no_grad():
        keep = torch.zeros(tok.vocab_size, dtype=torch.bool)
        keep[32:127] = keep[10] = True
        model.lm_head.weight[~keep] = 0
    save_checkpoint(folder, 0, model, trainer_state={"tokenizer": tok.spec(), "train_config": {"seq_len": SEQ_LEN}},
                    extra_files_writer=tok.save)
    return folder


@pytest.fixture(scope="module")
def transformer(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("lm") / "transformer", "transformer-tiny", max_seq_len=128)


def requests(kind: str, *args) -> list[Instance]:
    return [Instance(kind, {}, a if isinstance(a, tuple) else (a,), i) for i, a in enumerate(args)]


def float64_loglikelihood(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """The reference: one uncached float64 forward over context + continuation."""
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logits = copy.deepcopy(model).double()(ids)[0, len(ctx) - 1:-1].log_softmax(-1)
    target = torch.tensor(cont)
    return float(logits.gather(-1, target[:, None]).sum()), bool((logits.argmax(-1) == target).all())


def test_registered_under_its_name():
    assert get_model("speedlm") is SpeedlmLM


@pytest.mark.parametrize("attention", ["full", "window"])
def test_rolling_loglikelihood_is_speedlm_eval(transformer, attention):
    """Texts of whole windows (1 + k * seq_len tokens): `speedlm eval`'s loss times its tokens."""
    lm = SpeedlmLM(checkpoint=str(transformer), device="cpu", batch_size=3, attention=attention, window=8)
    texts = [TEXT[: 1 + SEQ_LEN * k] for k in (1, 2, 3)]
    got = lm.loglikelihood_rolling(requests("loglikelihood_rolling", *texts))
    policy = make_policy(attention, window=8)
    for text, ll in zip(texts, got):
        ids = lm.tokenizer.encode(text)
        ref = evaluate(lm.model, ids, batch_size=2, seq_len=SEQ_LEN, device="cpu", kv_policy=policy)
        assert ll == pytest.approx(-ref["loss"] * ref["tokens"], rel=1e-6)


def test_rolling_loglikelihood_scores_the_short_last_window(transformer):
    """A text that does not end on a window: its shorter last window counts too (eval drops it)."""
    lm = SpeedlmLM(checkpoint=str(transformer), device="cpu", dtype="float64")
    ids = lm.encode(TEXT[: SEQ_LEN + 10])
    first = float64_loglikelihood(lm.model, ids[:1], ids[1:SEQ_LEN + 1])[0]
    last = float64_loglikelihood(lm.model, ids[SEQ_LEN:SEQ_LEN + 1], ids[SEQ_LEN + 1:])[0]
    got = lm.loglikelihood_rolling(requests("loglikelihood_rolling", TEXT[: SEQ_LEN + 10]))[0]
    assert got == pytest.approx(first + last, rel=1e-12)


def test_loglikelihood_is_a_float64_forward(transformer):
    """Shared contexts (one prefill, copied caches), batched rows of equal lengths and single ones."""
    lm = SpeedlmLM(checkpoint=str(transformer), device="cpu", dtype="float64", batch_size=4)
    reqs = [("def f(x):\n    return x *", " 3"), ("def f(x):\n    return x *", " x + 1"),
            ("def f(x):\n    return x *", " def"), ("abc", " xy"), ("xyz", " ab"), ("def", " f(x):"),
            ("return x * 3\n\n", "def f(x):\n")]
    got = lm.loglikelihood(requests("loglikelihood", *reqs))
    for (ctx, cont), (ll, greedy) in zip(reqs, got):
        ref_ll, ref_greedy = float64_loglikelihood(lm.model, *lm._encode_pair(ctx, cont))
        assert ll == pytest.approx(ref_ll, rel=1e-12, abs=1e-12)
        assert greedy == ref_greedy
    # trailing spaces of the context move to the continuation, as the harness's causal models do
    assert lm._encode_pair("a b ", "c") == (list(b"a b"), list(b" c"))


@pytest.mark.parametrize("attention", ["window", "sepllm"])
def test_loglikelihood_runs_under_the_kv_policy(transformer, attention):
    """`attention=` reaches the caches the continuations are scored from: equal to one call over
    context + continuation through a fresh cache of that policy, and not to full attention.
    (Policies with original positions: under shifted ones, sink or a capped sepllm, a prefill and
    then the continuation is not one call, by design of those caches.)"""
    lm = SpeedlmLM(checkpoint=str(transformer), device="cpu", dtype="float64", attention=attention, window=6, sinks=2)
    ctx, cont = lm._encode_pair("def f(x):\n    return x *", " 3 + x")
    (ll, _), = lm.loglikelihood(requests("loglikelihood", ("def f(x):\n    return x *", " 3 + x")))
    with torch.no_grad():
        logits = lm.model(torch.tensor([ctx + cont]), lm.model.init_cache(lm.policy))[0, len(ctx) - 1:-1]
    ref = float(logits.log_softmax(-1).gather(-1, torch.tensor(cont)[:, None]).sum())
    assert ll == pytest.approx(ref, rel=1e-12)
    assert ll != pytest.approx(float64_loglikelihood(lm.model, ctx, cont)[0], rel=1e-6)


@pytest.mark.parametrize("preset", ["mamba-tiny", "gated-deltanet-tiny"])
def test_recurrent_models_score_through_their_cache(tmp_path, preset):
    """Context prefilled into the recurrent state, continuations continued from it (copied per
    choice) == the uncached forward."""
    lm = SpeedlmLM(checkpoint=str(tiny_checkpoint(tmp_path / "m", preset)), device="cpu", dtype="float64")
    ctx = "def f(x):\n    return x * 3\n\ndef f(x):\n    return"
    reqs = [(ctx, " x * 3"), (ctx, " 4"), (ctx, " f(x)\n"), ("x = 1\n", "y = 2")]
    for (c, k), (ll, greedy) in zip(reqs, lm.loglikelihood(requests("loglikelihood", *reqs))):
        ref_ll, ref_greedy = float64_loglikelihood(lm.model, *lm._encode_pair(c, k))
        assert ll == pytest.approx(ref_ll, rel=1e-10) and greedy == ref_greedy


def test_generate_until_is_speedlm_generate_with_its_stop_strings(transformer):
    lm = SpeedlmLM(checkpoint=str(transformer), device="cpu", batch_size=2)
    prompt = "def f(x):\n    return"
    ids = torch.tensor([list(prompt.encode())])
    free = lm.tokenizer.decode(generate(lm.model, ids, 20).ids[0, ids.shape[1]:].tolist())
    stop = free[8:10]  # a string the model does produce: decoding must end there
    assert free.find(stop) > 0, free
    kwargs = {"until": [stop], "max_gen_toks": 20, "do_sample": False}
    out = lm.generate_until(requests("generate_until", (prompt, kwargs), (prompt, {"max_gen_toks": 20})))
    ref = generate(lm.model, ids, 20, stop=StopStrings(lm.tokenizer, [stop]))
    assert ref.new_tokens < 20
    assert out[0] == cut_at_stop(lm.tokenizer.decode(ref.ids[0, ids.shape[1]:].tolist()), [stop])
    assert out[0] == free[: free.find(stop)]
    assert out[1] == free
    with pytest.raises(SpeedlmError, match="num_beams"):
        lm.generate_until(requests("generate_until", (prompt, {"num_beams": 2})))


def test_generate_until_batches_rows_that_stop_apart(transformer):
    """Two prompts of one length in one batch: each row is cut at its own first stop string, the
    batch decodes until both are done, and each equals its own batch-of-one generation."""
    lm = SpeedlmLM(checkpoint=str(transformer), device="cpu", batch_size=2)
    prompts = ["def f(x):\n    return", "def g(y):\n    yield"]
    frees = [lm.generate_texts([lm.encode(p)], until=[], max_gen_toks=24)[0] for p in prompts]
    until = [frees[0][6:8], frees[1][12:14]]
    kwargs = {"until": until, "max_gen_toks": 24}
    out = lm.generate_until(requests("generate_until", *[(p, kwargs) for p in prompts]))
    assert out == [cut_at_stop(f, until) for f in frees]
    assert len(out[0]) != len(out[1])


def test_speedlm_generate_stop_flag(transformer, capsys):
    base = ["generate", "--checkpoint", str(transformer), "--prompt", "def", "--max-new-tokens", "16",
            "--device", "cpu"]
    assert main(base) == 0
    free = capsys.readouterr().out.split("\n[")[0].rstrip("\n")[len("def"):]
    assert free.find(free[5:7]) > 0, free
    assert main([*base, "--stop", free[5:7]]) == 0
    assert capsys.readouterr().out.split("\n[")[0].rstrip("\n") == "def" + free[: free.find(free[5:7])]


def test_cli_runs_local_tasks(transformer, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(TASKS)  # the task YAMLs name their data files relative to the working directory
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # the results' environment report (torch's collect_env: pip, nvidia-smi, ...) takes ~15 s
    monkeypatch.setattr("lm_eval.evaluator.add_env_info", lambda results: None)
    out = tmp_path / "results.json"
    args = ["eval", "--checkpoint", str(transformer), "--tasks", "speedlm_mc,speedlm_ppl,speedlm_gen",
            "--include-path", str(TASKS), "--limit", "2", "--device", "cpu", "--bootstrap-iters", "0",
            "--output", str(out)]
    assert main(args) == 0
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"speedlm_mc", "speedlm_ppl", "speedlm_gen"}
    assert 0 <= results["speedlm_mc"]["acc,none"] <= 1 and results["speedlm_ppl"]["byte_perplexity,none"] > 1
    assert "speedlm_mc" in capsys.readouterr().out


def test_cli_unknown_task_is_one_line(transformer, capsys):
    args = ["eval", "--checkpoint", str(transformer), "--tasks", "no_such_task", "--include-path", str(TASKS),
            "--no-builtin-tasks", "--device", "cpu"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("speedlm: error: unknown lm-eval task no_such_task"), err


def test_cli_without_lm_eval_says_which_extra(transformer, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    assert main(["eval", "--checkpoint", str(transformer), "--tasks", "speedlm_mc", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "install the `eval` extra" in err[0], err
