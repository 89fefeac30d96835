"""How documents, questions and instructions become token ids, for every condition alike.

The document goes into a system turn; the question into a user turn. A cartridge replaces
exactly the tokens of that system turn, so `ask --context`, `ask` with a cartridge and the
no-context baseline share one user turn and one decoding path. Models without a chat
template (the tiny test models) get a plain-text layout with the same split.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from importlib import resources

from ..errors import ModelError

SYSTEM_WITH_DOCUMENT = "Answer using the document below. Be brief.\n\nDocument:\n{document}"
SYSTEM_PLAIN = "Answer the question. Be brief."
RECONSTRUCT_INSTRUCTION = "Repeat the document word for word."
# Words after the question (ReadConfig.answer_format). "Answer in a few words." was the best
# plain-model prompt measured on the long bench (shared/DESIGN.md 4d: 0.30 against 0.25).
ANSWER_FORMATS = {"plain": "", "words": " Answer in a few words."}


def prompt_record() -> dict:
    """What a manifest and an eval report record of the prompt: the system turns and the
    answer formats (the words a read may put after the question)."""
    return {"system": SYSTEM_WITH_DOCUMENT, "system_plain": SYSTEM_PLAIN, "answer_formats": ANSWER_FORMATS}


@dataclass
class Prompter:
    """Formats turns for one tokenizer: the one place a chat template is rendered."""

    tokenizer: object
    family: object = None  # families.Family: how its chat template is rendered (None: Llama's way)

    @cached_property
    def chat(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _render(self, messages: list[dict], generation: bool = False) -> str:
        if self.family is not None:
            return self.family.render(self.tokenizer, messages, generation)
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)

    def context_text(self, document: str | None) -> str:
        """The turn that a cartridge replaces, as text: the document (or nothing, for `none`)."""
        system = SYSTEM_PLAIN if document is None else SYSTEM_WITH_DOCUMENT.format(document=document)
        if not self.chat:
            return system + "\n\n"
        return self._render([{"role": "system", "content": system}])

    def context_ids(self, document: str | None) -> list[int]:
        """The turn that a cartridge replaces, as token ids."""
        return self.encode(self.context_text(document))

    def turns_text(self, turns: list[tuple[str, str]]) -> str:
        """A conversation after the context turn, as text: (role, text) pairs of user and
        assistant turns ending with a user turn, then the assistant header. Without a chat
        template: "Question: ... Answer:" lines."""
        if not self.chat:
            if len(turns) == 1:
                return f"Question: {turns[0][1]}\nAnswer:"
            return "".join(f"Question: {t}\n" if role == "user" else f"Answer: {t}\n" for role, t in turns) + "Answer:"
        # rendered after a placeholder system turn, which is then cut off: the template's own
        # default system turn (SmolLM2 adds one when none is given) must not appear
        system = [{"role": "system", "content": "x"}]
        head = self._render(system)
        full = self._render(system + [{"role": r, "content": t} for r, t in turns], generation=True)
        if not full.startswith(head):
            raise ModelError("the model's chat template does not render the system turn as a prefix",
                             hint="lcc needs a template with a system role")
        return full[len(head):]

    def turns_ids(self, turns: list[tuple[str, str]]) -> list[int]:
        """`turns_text` as token ids."""
        return self.encode(self.turns_text(turns))

    def query_ids(self, question: str, answer_format: str = "plain") -> list[int]:
        """A user turn and the assistant header, as it follows the context turn (the answer
        format's words after the question)."""
        return self.turns_ids([("user", question + ANSWER_FORMATS[answer_format])])

    def document_ids(self, document: str) -> list[int]:
        """The reconstruction target: the document's tokens followed by the end of the turn."""
        return self.encode(document) + self.end_ids

    @cached_property
    def end_ids(self) -> list[int]:
        eos = self.tokenizer.eos_token_id
        return [eos] if eos is not None else []

    @cached_property
    def stop_ids(self) -> set[int]:
        ids = set(self.end_ids)
        for token in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
            tid = self.tokenizer.convert_tokens_to_ids(token)
            if isinstance(tid, int) and tid != getattr(self.tokenizer, "unk_token_id", None):
                ids.add(tid)
        return ids


def generic_instructions() -> tuple[list[str], list[str]]:
    """The shipped instructions for the KL regulariser (package data), as two lists:
    context-agnostic ones, and ones that refer to "the document" without depending on it."""
    text = resources.files("lcc_cli").joinpath("data/instructions.txt").read_text(encoding="utf-8")
    sections: list[list[str]] = [[]]
    for line in text.splitlines():
        if line.startswith("# Section 2"):
            sections.append([])
        elif line.strip() and not line.startswith("#"):
            sections[-1].append(line.strip())
    agnostic, about_document = sections
    return agnostic, about_document
