"""Every data test gets its own cache folder, so nothing touches ~/.cache/speedlm."""

import pytest


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEEDLM_CACHE", str(tmp_path / "speedlm-cache"))


# A few KB of mixed prose, code and non-ASCII text: enough for a BPE of ~300-400 tokens to
# learn real merges in well under a second.
SAMPLE_TEXTS = {
    "alpha.txt": "The quick brown fox jumps over the lazy dog.\n" * 40,
    "beta.md": "# Notes\n\nCafé crème, naïve façade, jalapeño — déjà vu.\n" * 30,
    "gamma.py": "def add(a, b):\n    return a + b\n\n\nclass Point:\n    x: int = 0\n" * 30,
    "delta.txt": "日本語のテキスト。Привет, мир! 🚀 emoji and\ttabs\r\n" * 20,
    "epsilon.rst": "Section\n=======\n\nSome *emphasis* and ``literal`` text here.\n" * 30,
}


@pytest.fixture
def sample_folder(tmp_path):
    """tmp folder `corpus/` holding SAMPLE_TEXTS, one file in a subfolder."""
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    for i, (name, text) in enumerate(SAMPLE_TEXTS.items()):
        target = root / "sub" / name if i == 0 else root / name
        target.write_text(text, encoding="utf-8")
    return root


@pytest.fixture
def sample_texts():
    return dict(SAMPLE_TEXTS)
