"""Progress: a live bar on a terminal, plain lines in logs."""

import io

from speedlm.progress import progress_bar, progress_mode


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_a_log_gets_plain_lines_without_redraws(monkeypatch):
    monkeypatch.delenv("SPEEDLM_PROGRESS", raising=False)
    log = io.StringIO()
    assert progress_mode(log) == "plain"
    bar = progress_bar(total=1000, desc="train", stream=log, mininterval=0)
    for _ in range(1000):
        bar.update(1)
    bar.write("a finished model", file=log)
    bar.close()
    text = log.getvalue()
    assert "\r" not in text and "\x1b[" not in text
    lines = text.splitlines()
    assert all(line.strip() for line in lines)  # no blank clearing lines
    assert lines[0].startswith("train:") and "1000/1000" in lines[-1]
    assert "a finished model" in lines


def test_plain_lines_come_every_few_seconds_not_every_update(monkeypatch):
    monkeypatch.delenv("SPEEDLM_PROGRESS", raising=False)
    log = io.StringIO()
    bar = progress_bar(total=10_000, stream=log)  # default interval: 5 s
    for _ in range(10_000):
        bar.update(1)
    bar.close()
    assert len(log.getvalue().splitlines()) <= 3  # first state, and the final one


def test_a_terminal_gets_the_live_bar_and_the_environment_can_choose(monkeypatch):
    monkeypatch.delenv("SPEEDLM_PROGRESS", raising=False)
    assert progress_mode(FakeTTY()) == "bar"
    for mode in ("plain", "bar", "off"):
        monkeypatch.setenv("SPEEDLM_PROGRESS", mode)
        assert progress_mode(FakeTTY()) == mode
    log = io.StringIO()
    with progress_bar(total=5, stream=log) as bar:
        bar.update(5)
    assert log.getvalue() == ""  # off
