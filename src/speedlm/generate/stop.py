"""Stop sequences: end decoding once the generated text contains one of some strings.

Strings, not token ids: a stop string such as "\\n\\n" may be split across tokens, or be part of
one token, differently in every context; only the decoded text says whether it was produced.
"""

from __future__ import annotations

import torch


class StopStrings:
    """`generate(stop=...)`: new ids (B, n) -> (B,) bool, True for the rows whose decoded new
    text contains one of `strings`. A row stays done once it is (the text only grows)."""

    def __init__(self, tokenizer, strings: list[str]):
        self.tokenizer = tokenizer
        self.strings = [s for s in strings if s]
        self._done: torch.Tensor | None = None

    def __call__(self, new_ids: torch.Tensor) -> torch.Tensor:
        if self._done is None:
            self._done = torch.zeros(new_ids.shape[0], dtype=torch.bool)
        for row in range(new_ids.shape[0]):
            if not self._done[row]:
                text = self.tokenizer.decode(new_ids[row].tolist())
                self._done[row] = any(s in text for s in self.strings)
        return self._done


def cut_at_stop(text: str, strings: list[str]) -> str:
    """`text` up to (not including) the earliest occurrence of any of `strings`."""
    cuts = [i for i in (text.find(s) for s in strings if s) if i >= 0]
    return text[: min(cuts)] if cuts else text
