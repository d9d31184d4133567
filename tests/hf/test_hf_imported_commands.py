"""An imported Hugging Face checkpoint runs every speedlm command that fits it (`eval`,
`generate` with KV policies, `stream`, `bench decode`, `bench speed`) on its own weights, and
`speedlm hf import` refuses bad folders in one line with exit code 2, writing nothing."""

import json

import pytest
import torch

pytest.importorskip("transformers")

from support.hf_models import tiny_hf_model  # noqa: E402

from speedlm.bench.common import build_seeded  # noqa: E402
from speedlm.checkpoint.pretrained import load_pretrained  # noqa: E402
from speedlm.cli import main  # noqa: E402
from speedlm.data.tokenizers import ByteTokenizer  # noqa: E402
from speedlm.hf import to_hf_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A tiny random Llama with a byte-level tokenizer, imported by `speedlm hf import`."""
    root = tmp_path_factory.mktemp("imported")
    hf = tiny_hf_model("llama", dtype=torch.float32, vocab_size=256, max_position_embeddings=4096)
    hf.save_pretrained(root / "hf")
    to_hf_tokenizer(ByteTokenizer()).save_pretrained(root / "hf")
    assert main(["hf", "import", "--model", str(root / "hf"), "--out", str(root / "run")]) == 0
    return root / "run"


def test_benchmarks_measure_the_checkpoint_weights_not_a_fresh_init(imported):
    ours = load_pretrained(imported, tokenizer=False).model
    bench = build_seeded(str(imported), seed=0, device="cpu", dtype=torch.float32, min_seq_len=8192)
    assert bench.config.max_seq_len == 8192
    for (name, a), (_, b) in zip(ours.state_dict().items(), bench.state_dict().items()):
        assert torch.equal(a, b), name


def test_eval_generate_and_stream_run_on_an_imported_checkpoint(imported, tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(imported), "--batches", "2", "--seq-len", "64"]) == 0
    assert "val loss" in capsys.readouterr().out
    for policy in ("full", "sepllm", "sink"):
        assert main(["generate", "--checkpoint", str(imported), "--prompt", "def f(x):", "--max-new-tokens", "6",
                     "--attention", policy, "--window", "8"]) == 0
    assert "6 tokens" in capsys.readouterr().out
    assert main(["stream", "--checkpoint", str(imported), "--tokens", "96", "--policy", "sepllm", "--window", "16",
                 "--out", str(tmp_path / "stream")]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_bench_decode_and_speed_take_a_checkpoint_folder(imported, tmp_path):
    assert main(["bench", "decode", "--presets", str(imported), "--contexts", "32,64", "--steps", "2",
                 "--out", str(tmp_path)]) == 0
    decode = json.loads((tmp_path / "bench_decode.json").read_text())["presets"][str(imported)]
    assert decode["state_bytes"] == 2 * 2 * 2 * 64 * 8 * 4  # layers x (k, v) x kv heads x 64 keys x head_dim x fp32
    assert main(["bench", "speed", "--presets", str(imported), "--lengths", "64", "--repeats", "1",
                 "--decode-tokens", "2", "--out", str(tmp_path)]) == 0
    (row,) = json.loads((tmp_path / "bench_speed.json").read_text())["results"]
    assert row["preset"] == str(imported) and row["params"] == load_pretrained(imported).model.num_params()
    assert {m["status"] for m in row["metrics"].values()} == {"ok"}


def _last_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_import_folders_are_one_line_exit_2_and_write_nothing(tmp_path, capsys):
    from transformers import GPT2Config

    hf_dir = tmp_path / "hf"
    tiny_hf_model("llama", dtype=torch.float32, vocab_size=256).save_pretrained(hf_dir)
    out = tmp_path / "run"
    # a model folder without its tokenizer
    assert main(["hf", "import", "--model", str(hf_dir), "--out", str(out)]) == 2
    assert "tokenizer.json" in _last_error(capsys)
    # a folder with a config and a tokenizer but no weights
    to_hf_tokenizer(ByteTokenizer()).save_pretrained(hf_dir)
    for weights in hf_dir.glob("*.safetensors"):
        weights.unlink()
    assert main(["hf", "import", "--model", str(hf_dir), "--out", str(out)]) == 2
    assert "cannot load the Hugging Face model" in _last_error(capsys)
    # an architecture speedlm has no converter for
    GPT2Config(vocab_size=256, n_embd=32, n_layer=1, n_head=2).save_pretrained(hf_dir)
    assert main(["hf", "import", "--model", str(hf_dir), "--out", str(out)]) == 2
    assert "no speedlm import for Hugging Face model type 'gpt2'" in _last_error(capsys)
    # a config field speedlm cannot honour
    tiny_hf_model("llama", dtype=torch.float32, vocab_size=256, hidden_act="gelu").save_pretrained(hf_dir)
    assert main(["hf", "import", "--model", str(hf_dir), "--out", str(out)]) == 2
    assert "activation 'gelu'" in _last_error(capsys)
    assert not out.exists()
