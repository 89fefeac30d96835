"""Token ids to the text a user sees, and the window check: one path for `lcc ask`, eval's
baselines and the server.

An answer's text is its tokens without stop ids, detokenised. While tokens still arrive
(streaming), `TextStream` shows only what can no longer change: a trailing half-decoded
character (U+FFFD) waits for the rest of its bytes, and an ending that could still grow into
a stop string waits until it cannot (text once shown is never taken back).
"""

from __future__ import annotations

from typing import Callable

from ..errors import WindowError


def answer_text(tokenizer, tokens: list[int], stop_ids: set[int]) -> tuple[list[int], str]:
    """(the tokens without stop ids, their text)."""
    kept = [t for t in tokens if t not in stop_ids]
    return kept, tokenizer.decode(kept, skip_special_tokens=True)


class TextStream:
    """Feed it every token so far (`push`); it calls `on_text(piece)` with what is new.
    `stops`: strings that end the text (cut before them). `trim`: the server's convention,
    leading whitespace dropped and, once the text is final, trailing whitespace too."""

    def __init__(self, tokenizer, stop_ids: set[int], on_text: Callable[[str], None], stops=(), trim: bool = False):
        self.tokenizer, self.stop_ids, self.on_text = tokenizer, stop_ids, on_text
        self.stops, self.trim = StopStrings(stops), trim
        self.shown = ""

    def push(self, tokens: list[int], final: bool = False) -> bool:
        """Show what is new; True if a stop string ended the text (it is then final)."""
        text = answer_text(self.tokenizer, tokens, self.stop_ids)[1]
        if self.trim:
            text = text.lstrip()
        text, stopped = self.stops.visible(text, final)
        final = final or stopped
        if final and self.trim:
            text = text.rstrip()
        if len(text) > len(self.shown) and (final or not text.endswith("\ufffd")):
            self.on_text(text[len(self.shown):])
            self.shown = text
        return stopped


class StopStrings:
    """Where stop strings cut a growing text, in time linear in what is added: one
    Knuth-Morris-Pratt automaton per stop string, fed only the new characters (trying every
    prefix of a 240,000-character stop string at every token took seconds a token)."""

    def __init__(self, stops=()):
        self.stops = [s for s in stops if s]
        self.fail = [_failure(s) for s in self.stops]
        self.fed = ""
        self.state = [0] * len(self.stops)

    def visible(self, text: str, final: bool) -> tuple[str, bool]:
        """What may be shown of `text`, and whether a stop string ended it: cut before the first
        stop string; while decoding goes on, hold back the longest ending that starts one."""
        if not self.stops:
            return text, False
        fresh = not self.fed or not text.startswith(self.fed)  # first look, or an ending changed
        if fresh:
            found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
            if found:
                return text[:min(found)], True
            # only the last characters can hold the start of a stop string
            start, self.state = max(0, len(text) - max(map(len, self.stops))), [0] * len(self.stops)
        else:
            start = len(self.fed)
        cut = -1
        for j, (stop, fail) in enumerate(zip(self.stops, self.fail)):
            k = self.state[j]
            for i in range(start, len(text)):
                while k and text[i] != stop[k]:
                    k = fail[k - 1]
                if text[i] == stop[k]:
                    k += 1
                if k == len(stop):
                    cut = i + 1 - k if cut < 0 else min(cut, i + 1 - k)
                    k = fail[k - 1]
                    break
            self.state[j] = k
        self.fed = text
        if cut >= 0:
            return text[:cut], True
        if final:
            return text, False
        return text[:len(text) - max(self.state)], False


def _failure(stop: str) -> list[int]:
    """KMP's failure function: for each prefix, the longest proper prefix that is also its suffix."""
    fail, k = [0] * len(stop), 0
    for i in range(1, len(stop)):
        while k and stop[i] != stop[k]:
            k = fail[k - 1]
        if stop[i] == stop[k]:
            k += 1
        fail[i] = k
    return fail


def visible(text: str, stops: list[str], final: bool) -> tuple[str, bool]:
    """`StopStrings(stops).visible(text, final)` for a text seen once."""
    return StopStrings(stops).visible(text, final)


def check_window(loaded, prompt_end: int, max_new_tokens: int, what: str = "the question") -> None:
    """WindowError if a prompt ending at position `prompt_end` plus `max_new_tokens` new tokens
    would run past the model's window (refused with the numbers instead of decoding nonsense)."""
    limit = loaded.facts.max_positions
    if limit and prompt_end + max_new_tokens > limit:
        raise WindowError(f"{what} needs positions up to {prompt_end} plus {max_new_tokens} new tokens, "
                          f"past the model's {limit}-position window",
                          hint="shorten the question or the answer, or use fewer cartridges")
