"""Text from tokens as they are generated, for printing or streaming it as it comes.

A token can end inside a character (UTF-8 split across byte tokens) and how a token reads (its
leading space) can depend on the one before it, so each time all tokens so far (after the
prompt) are decoded and only the new suffix goes out, held back while it ends in U+FFFD (a
character not complete yet) or could still be the start of a stop string. Special tokens (the
eos) are skipped, as the tokenizer's decode does by default and vLLM does.
"""
from __future__ import annotations

from typing import Sequence


class TextStream:
    """A completion's text, from its tokens as they come: `add` returns the text to send next
    (module docstring), and whether a stop string ended the completion (the text stops before it).
    tokenizer: a `tokenizers.Tokenizer`; prompt_ids: what the completion follows; stop: strings
    that end it."""

    def __init__(self, tokenizer, prompt_ids: list[int], stop: Sequence[str] = ()):
        self.tokens: list[int] = []
        self._tokenizer, self._prompt, self._stop = tokenizer, list(prompt_ids), list(stop)
        self._start = len(self._decode(self._prompt))
        self._sent = 0  # characters of the completion sent so far

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, tokens: list[int], final: bool) -> tuple[str, bool]:
        """final: these are the request's last tokens, so nothing is held back."""
        self.tokens += tokens
        # Decode everything: a token can end inside a character, and how a token reads (its
        # leading space) can depend on the one before it.
        text = self._decode(self._prompt + self.tokens)[self._start:]
        # Text already sent never holds the start of a stop string (it was held back), so
        # searching the rest finds the first occurrence.
        hits = [i for i in (text.find(s, self._sent) for s in self._stop) if i >= 0]
        stopped = bool(hits)
        if stopped:
            text, final = text[:min(hits)], True
        if not final:
            if text.endswith("\ufffd"):
                return "", False
            text = text[:len(text) - self._held(text)]
        new, self._sent = text[self._sent:], max(self._sent, len(text))
        return new, stopped

    def _held(self, text: str) -> int:
        """How many unsent characters at the end of text could begin a stop string."""
        longest = min(max((len(s) - 1 for s in self._stop), default=0), len(text) - self._sent)
        return next((k for k in range(longest, 0, -1)
                     if any(s.startswith(text[-k:]) for s in self._stop)), 0)
