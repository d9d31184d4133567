"""Progress bars that suit where they are read.

On a terminal: tqdm's live bar. Anywhere else (CI, `nohup`, a log file, a pipe): the same
progress as plain lines, at most one every `PLAIN_INTERVAL_S` seconds, with no carriage-return
redraws or cursor movements, so that a log reads top to bottom. `SPEEDLM_PROGRESS=bar|plain|off`
overrides the choice.
"""

from __future__ import annotations

import os
import re
import sys

from tqdm import tqdm

PLAIN_INTERVAL_S = 5.0
_CONTROL = re.compile(r"\r|\x1b\[[0-9;]*[A-Za-z]")


class _PlainLines:
    """A file-like object for tqdm that turns each redraw into one line and drops the
    blank redraws tqdm uses to clear a bar."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        line = _CONTROL.sub("", text).rstrip()
        if line:
            self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def progress_mode(stream=None) -> str:
    """"bar" on a terminal, "plain" elsewhere, or what SPEEDLM_PROGRESS says."""
    forced = os.environ.get("SPEEDLM_PROGRESS", "").strip().lower()
    if forced in ("bar", "plain", "off"):
        return forced
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return "bar" if callable(isatty) and isatty() else "plain"


def progress_bar(total=None, desc: str | None = None, unit: str = "it", disable: bool = False, stream=None, **kw) -> tqdm:
    """A tqdm bar on a terminal; plain lines every few seconds elsewhere (see the module doc)."""
    stream = sys.stderr if stream is None else stream
    mode = progress_mode(stream)
    if mode == "off":
        disable = True
    if mode == "plain":
        kw.setdefault("mininterval", PLAIN_INTERVAL_S)
        kw.setdefault("maxinterval", PLAIN_INTERVAL_S * 4)
        return tqdm(total=total, desc=desc, unit=unit, disable=disable, file=_PlainLines(stream), ascii=True, ncols=110, dynamic_ncols=False, **kw)
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, file=stream, dynamic_ncols=True, **kw)


def progress_write(bar: tqdm, line: str) -> None:
    """Print a line above a live bar (or as a plain line), whichever mode the bar is in."""
    if bar.disable:
        print(line, file=sys.stdout, flush=True)
    else:
        bar.write(line, file=sys.stdout)
