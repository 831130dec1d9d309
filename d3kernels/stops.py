"""Stop strings, matched on the new text only (docs/design.md section 4.3).

Each generated token's text is found by decoding only the tokens since the previous one's text was read
(vLLM's incremental detokenization: the decode starts a few tokens back, so a piece's leading space or a
character split over several byte tokens comes out as it does in the whole text; a text that ends in an
incomplete character waits for the next token). The stop strings are looked for in that new text after
the end of the text before it, as long as the longest stop string less one character, so a stop string
that spans tokens is found and a step costs the same however long the output grows.
"""
from __future__ import annotations

from typing import Sequence


class StopStrings:
    """Watches `rows` rows of generated tokens for any of `stops`; tokenizer: anything with decode(ids)."""

    def __init__(self, tokenizer, stops: Sequence[str], rows: int):
        self.tokenizer, self.stops = tokenizer, [s for s in stops if s]
        self.keep = max((len(s) for s in self.stops), default=1) - 1
        self.tokens = [[] for _ in range(rows)]
        self.offsets = [(0, 0) for _ in range(rows)]   # per row: where the decode starts, where its new text starts
        self.tail = ["" for _ in range(rows)]           # per row: the last `keep` characters read

    def add(self, b: int, token: int) -> bool:
        """Row b generated `token`: whether a stop string now appears in the row's text."""
        toks = self.tokens[b]
        toks.append(int(token))
        start, read = self.offsets[b]
        before = self.tokenizer.decode(toks[start:read])
        now = self.tokenizer.decode(toks[start:])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return False                     # no new complete character yet
        self.offsets[b] = (read, len(toks))
        text = self.tail[b] + now[len(before):]
        self.tail[b] = text[-self.keep:] if self.keep else ""
        return any(s in text for s in self.stops)
