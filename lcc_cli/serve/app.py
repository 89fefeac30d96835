"""The HTTP surface of `lcc serve`: OpenAI-compatible chat completions over cartridges.

FastAPI (with pydantic models for every request and response) under uvicorn, the common,
well-kept ASGI pair; server-sent events through sse-starlette. Endpoints:

- POST /v1/chat/completions: `model` names a cartridge (its file stem), several composed
  with `+` ("a+b", laid out as `lcc ask A B` lays them), or the plain model's name for no
  cartridge. messages, max_tokens, temperature, seed, stop, stream.
- GET /v1/models: the plain model and every cartridge, with its manifest summary, or the
  reason it is unavailable.
- GET /health.

Every limit answers with a 4xx and an OpenAI-style error body, never a 500 or a hang.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Literal, Optional, Union

from fastapi import Request  # at module level: FastAPI resolves handler annotations here
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import LccError, WindowError
from ..runtime.text import check_window
from .catalog import Catalog
from .engine import Engine, Job, QueueFull


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


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: Union[str, list[TextPart]]  # OpenAI's newer clients send a list of text parts

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields lcc does not use (top_p, ...)
    model: str
    messages: list[Message]
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    seed: int = 0
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1)


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


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "lcc"
    lcc: dict


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
        self.status, self.message, self.kind, self.code = status, message, kind, code


def create_app(loaded, catalog: Catalog, engine: Engine, limits: Limits, api_key: str | None = None):
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from sse_starlette.sse import EventSourceResponse

    app = FastAPI(title="lcc serve", docs_url=None, redoc_url=None, openapi_url=None)
    plain = loaded.model_id
    buffers: dict[tuple, object] = {}  # composed, converted buffers by (names, file signatures)
    buffers_lock = threading.Lock()

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return JSONResponse({"error": {"message": exc.message, "type": exc.kind, "param": None, "code": exc.code}},
                            status_code=exc.status)

    def authorise(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), api_key.encode())):
            raise ApiError(401, "a valid API key is required (Authorization: Bearer ...)", "authentication_error",
                           "invalid_api_key")

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise ApiError(413, f"the request body is over {limits.max_body_bytes:,} bytes", code="body_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_body_bytes:
                raise ApiError(413, f"the request body is over {limits.max_body_bytes:,} bytes", code="body_too_large")
        return bytes(body)

    def resolve(name: str):
        """(key, buffer or None) for a request's model name; 404 for anything not served. The
        key names the files' contents, so a cartridge replaced while requests wait never
        shares a batch with its old version. Runs in worker threads: the cache is locked."""
        if name == plain:
            return (), None
        parts = name.split("+")
        catalog.refresh()
        entries = [catalog.get(part) for part in parts]
        for part, entry in zip(parts, entries):
            if entry is None:
                raise ApiError(404, f"no model or cartridge named {part[:80]!r}", code="model_not_found")
            if not entry.available:
                raise ApiError(404, f"cartridge {part!r} is unavailable: {entry.reason}", code="model_unavailable")
        key = tuple((e.name, e.signature) for e in entries)
        with buffers_lock:
            buffer = buffers.get(key)
            if buffer is None:
                from ..runtime.memory import Whole, compose

                buffer = Whole(compose([e.cartridge for e in entries]), loaded).view("")
                buffers.clear()  # one composition kept: requests for one set come in runs
                buffers[key] = buffer
        return key, buffer

    def prompt_of(req: ChatRequest) -> list[int]:
        if len(req.messages) > limits.max_messages:
            raise ApiError(400, f"{len(req.messages)} messages; at most {limits.max_messages}", code="too_many_messages")
        if not req.messages or req.messages[-1].role != "user":
            raise ApiError(400, "the last message must be the user's")
        turns, system = [], []
        for m in req.messages:
            text = m.text
            if len(text) > limits.max_message_chars:
                raise ApiError(400, f"a message is {len(text):,} characters; at most "
                                    f"{limits.max_message_chars:,}", code="message_too_long")
            if not text.strip() and m.role == "user":
                raise ApiError(400, "a user message is empty")
            if m.role == "system":
                system.append(text.strip())
            else:
                turns.append((m.role, text))
        if system:
            # The cartridge (or the plain model's own instruction) holds the system turn, so the
            # client's system text leads the first user turn instead.
            first = next(i for i, (role, _) in enumerate(turns) if role == "user")
            turns[first] = ("user", "\n\n".join([*filter(None, system), turns[first][1]]))
        return loaded.prompter.turns_ids(turns)

    @app.get("/health")
    async def health():
        listing = catalog.listing()
        sizes = list(engine.batch_sizes)
        return {"status": "ok", "model": plain, "cartridges": sum(e.available for e in listing),
                "unavailable": sum(not e.available for e in listing), "load": engine.load(),
                "max_queue": limits.max_queue, "batches": len(sizes),
                "mean_batch": round(sum(sizes) / len(sizes), 2) if sizes else None}

    @app.get("/v1/models", response_model=ModelList)
    async def models(request: Request):
        authorise(request)
        await asyncio.to_thread(catalog.refresh)
        cards = [ModelCard(id=plain, lcc={"available": True, "cartridge": None})]
        cards += [ModelCard(id=e.name, lcc=e.summary()) for e in catalog.listing()]
        return ModelList(data=cards)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        authorise(request)
        body = await read_body(request)
        try:
            req = ChatRequest.model_validate_json(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(x) for x in first.get("loc", ()))
            raise ApiError(400, f"invalid request: {where + ': ' if where else ''}{first.get('msg', 'malformed')}"[:300],
                           code="invalid_request") from None
        key, buffer = await asyncio.to_thread(resolve, req.model)
        prompt = prompt_of(req)
        max_tokens = req.max_completion_tokens or req.max_tokens or limits.default_max_tokens
        if max_tokens > limits.max_tokens:
            raise ApiError(400, f"max_tokens {max_tokens} is over this server's limit of {limits.max_tokens}",
                           code="max_tokens_too_large")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > limits.max_stop:
            raise ApiError(400, f"at most {limits.max_stop} stop sequences")
        first = buffer.first_query_position if buffer is not None else len(loaded.prompter.context_ids(None))
        try:
            check_window(loaded, first + len(prompt), max_tokens, what="the prompt")
        except WindowError as exc:
            raise ApiError(400, exc.message, code="context_length_exceeded") from None
        if buffer is None:
            prompt = loaded.prompter.context_ids(None) + prompt  # the plain model: its own system turn
        job = Job(key, buffer, prompt, max_tokens, req.temperature, req.seed, stops, asyncio.get_running_loop(),
                  asyncio.Queue())
        try:
            engine.submit(job)
        except QueueFull as exc:
            raise ApiError(429, f"too many requests: {exc}", "rate_limit_error", "queue_full") from None
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        prompt_tokens = len(prompt) + (buffer.slots if buffer is not None else 0)

        if not req.stream:
            text, reason, completion = "", "stop", 0
            try:
                while True:
                    try:
                        event = await asyncio.wait_for(job.events.get(), timeout=0.5)
                    except asyncio.TimeoutError:
                        # Starlette does not cancel a handler whose client left; look, so
                        # that a client that gave up frees its place as a streaming one does.
                        if await request.is_disconnected():
                            return JSONResponse({}, status_code=499)
                        continue
                    if event[0] == "delta":
                        text += event[1]
                    elif event[0] == "end":
                        reason, completion = event[1], event[2]
                        break
                    else:
                        raise ApiError(503, event[1], "server_error")
            finally:
                engine.cancel(job)
            return ChatResponse(id=rid, created=created, model=req.model,
                                choices=[Choice(message=ChoiceMessage(content=text), finish_reason=reason)],
                                usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion,
                                            total_tokens=prompt_tokens + completion))

        def chunk(delta: Delta, reason: str | None = None) -> str:
            return ChatChunk(id=rid, created=created, model=req.model,
                             choices=[ChunkChoice(delta=delta, finish_reason=reason)]).model_dump_json(exclude_none=True)

        async def events():
            try:
                yield {"data": chunk(Delta(role="assistant", content=""))}
                while True:
                    event = await job.events.get()
                    if event[0] == "delta":
                        yield {"data": chunk(Delta(content=event[1]))}
                    elif event[0] == "end":
                        yield {"data": chunk(Delta(), event[1])}
                        break
                    else:
                        yield {"data": json.dumps({"error": {"message": event[1], "type": "server_error"}})}
                        break
                yield {"data": "[DONE]"}
            finally:  # also when the client disconnects: its place in the queue is freed
                engine.cancel(job)

        return EventSourceResponse(events(), ping=15)

    @app.exception_handler(LccError)
    async def _lcc_error(request, exc: LccError):
        return JSONResponse({"error": {"message": exc.message, "type": "invalid_request_error", "param": None,
                                       "code": None}}, status_code=400)

    return app
