"""A request's messages as token ids, with the message text unable to make special tokens.

A chat template marks turns with special tokens (`<|im_start|>`, `<|im_end|>`, ...). Rendered
to text and encoded, a message that contains such a token's text becomes that token: a user
could close their own turn and open a system one. Here the text is checked first: when every
special token of the encoded prompt is one the template put there (the same ones, in the same
order, as the template gives for neutral text), the ids are exactly `Prompter.turns_ids`'s,
and so exactly what `lcc ask` reads for one question. Otherwise the template's text is encoded
as usual and each message's text on its own with `split_special_tokens=True`, as plain text.
"""

from __future__ import annotations

import uuid

from ..errors import UsageError

_NEUTRAL = "x"


def special_ids(tokenizer) -> set[int]:
    """Ids of the tokenizer's special tokens (those text may not produce)."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for tid, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(token, "special", False):
            ids.add(tid)
    return ids


def chat_ids(prompter, turns: list[tuple[str, str]]) -> list[int]:
    """`prompter.turns_ids(turns)`, unless a turn's text would make a special token."""
    specials = special_ids(prompter.tokenizer)
    ids = prompter.turns_ids(turns)
    wanted = _specials(prompter.turns_ids([(role, _NEUTRAL) for role, _ in turns]), specials)
    if _specials(ids, specials) == wanted:
        return ids
    safe = _as_plain_text(prompter, turns)
    if _specials(safe, specials) != wanted:  # a template this cannot take apart: refuse rather than guess
        raise UsageError("a message holds text this model reads as its special tokens (turn markers)")
    return safe


def _specials(ids: list[int], specials: set[int]) -> list[int]:
    return [i for i in ids if i in specials]


def _as_plain_text(prompter, turns: list[tuple[str, str]]) -> list[int]:
    """The conversation with each message's text encoded as plain text between the template's
    own pieces (found by rendering the template with a marker in place of each text)."""
    markers = [f"\ue000{uuid.uuid4().hex}{i}\ue001" for i in range(len(turns))]
    pieces = _rendered(prompter, [(role, m) for (role, _), m in zip(turns, markers)])
    ids: list[int] = []
    for (_, text), marker in zip(turns, markers):
        before, found, pieces = pieces.partition(marker)
        if not found:
            raise UsageError("a message holds text this model reads as its special tokens (turn markers)")
        ids += prompter.encode(before) + _plain(prompter.tokenizer, text)
    return ids + prompter.encode(pieces)


def _plain(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def _rendered(prompter, turns: list[tuple[str, str]]) -> str:
    """The text `Prompter.turns_ids` encodes for these turns (after the context turn)."""
    return prompter.turns_text(turns)
