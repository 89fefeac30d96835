"""The shapes of `lcc serve`'s requests and responses (pydantic, as OpenAI's API has them), and
the server's limits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from ..config import Selector
from ..runtime.text import StopStrings

MIN_TEMPERATURE = 1e-5  # below it, sampling divides logits into inf and NaN: decoded greedily instead
MAX_SEED = 2 ** 63 - 1  # OpenAI's seed is a 64-bit signed integer


@dataclass
class Limits:
    max_body_bytes: int = 1 << 20
    max_messages: int = 64
    max_message_chars: int = 32_000  # a message is cut off in characters before it is tokenised
    max_tokens: int = 1024  # new tokens per request
    default_max_tokens: int = 256
    max_queue: int = 32  # requests waiting or running; more get 429
    max_batch: int = 8  # rows decoded together
    max_stop: int = 4
    max_parts: int = 16  # cartridges one model name may compose (a repeated one counts each time)
    cache_bytes: int = 1024 << 20  # decoded buffers kept in RAM (--cache-mb)
    body_timeout: float = 10.0  # seconds for a body to arrive once its headers have
    header_timeout: float = 10.0  # seconds for a request's headers, from connecting or the last response
    max_connections: int = 1000  # open connections; past it the longest-idle one is closed
    verify_wait: float = 60.0  # seconds a request waits for files it names to be verified


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "user", "assistant"]
    content: Union[str, list[TextPart]]  # OpenAI's newer clients send a list of text parts

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ReadOptions(BaseModel):
    """The request's own read of indexed cartridges and the library (`lcc` in the body; an
    OpenAI client sends it with `extra_body={"lcc": {...}}`): ReadConfig's fields, checked as
    strictly as every other field. Unset fields keep the server's settings."""

    model_config = ConfigDict(extra="forbid", strict=True)
    budget: Optional[int] = Field(None, ge=1, le=1 << 20)
    ratio: Optional[float] = Field(None, ge=1.0, le=1e6, allow_inf_nan=False)
    selector: Optional[Selector] = None
    reencode: Optional[int] = Field(None, ge=0, le=4096)
    prefix: Optional[bool] = None
    pages: bool = True  # report the pages read in the response's `lcc.pages`


class ChatRequest(BaseModel):
    # strict, as OpenAI's API is: "10" is not an integer, true is not a number
    model_config = ConfigDict(extra="ignore", strict=True)  # clients send fields lcc does not use (top_p, ...)
    model: str
    messages: list[Message]
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0, allow_inf_nan=False)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1)
    lcc: Optional[ReadOptions] = None


class ChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: ChoiceMessage
    finish_reason: str


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    # what was read: {"pages": [...], "read": {...}, "prefix": ...} (indexed cartridges and the library)
    lcc: Optional[dict] = None


class Delta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Optional[str] = None


class ChatChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    lcc: Optional[dict] = None  # on the last chunk, as in ChatResponse


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "lcc"
    lcc: dict


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


@dataclass
class Prepared:
    """A parsed request made ready for the engine, off the event loop."""

    prompt: list[int]
    stop: StopStrings
    max_tokens: int
    temperature: float
