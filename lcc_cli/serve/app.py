"""The HTTP surface of `lcc serve`: OpenAI-compatible chat completions over cartridges.

FastAPI (with pydantic models for every request and response) under uvicorn, the common,
well-kept ASGI pair; server-sent events through sse-starlette. Endpoints:

- POST /v1/chat/completions: `model` names a cartridge (its file stem), several composed
  with `+` ("a+b", laid out as `lcc ask A B` lays them; at most `max_parts`), `library` for
  the served folder asked as one (its indexed cartridges, through DIR/.lcc-index.sqlite), or
  the plain model's name for no cartridge. messages, max_tokens, temperature, seed, stop,
  stream. For indexed cartridges and the library, the last user message chooses the pages
  read, and the response's extra field `lcc.pages` says which (cartridge, page, text).
- GET /v1/models: the plain model and every cartridge, with its manifest summary, or the
  reason it is unavailable.
- GET /health: counts the catalog already holds; it never waits for a file.

Every client mistake is a 4xx with an OpenAI-style error body, never a 500, a traceback in
the log or a hang: fields are typed strictly (a "10" is not a number), a body must be JSON and
arrive within `body_timeout`, a request's window is checked from the manifests before any
tensor is built, and work that reads files or tokenises long text runs in worker threads, off
the event loop. Browsers are kept out by guard.py.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Optional, Union

from fastapi import Request  # at module level: FastAPI resolves handler annotations here
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import LccError, WindowError
from ..runtime.text import StopStrings, check_window
from .cache import BufferCache
from .catalog import LIBRARY, Catalog, composed_first
from .engine import Engine, Job, QueueFull
from .guard import Access, Guard, error_body
from .errors import ApiError, ClientGone
from .memories import PagedCartridges, ServedLibrary
from .prompt import chat_ids

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
    lcc: Optional[dict] = None  # indexed cartridges and the library: {"pages": [...]} the answer read


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


def create_app(loaded, catalog: Catalog, engine: Engine, limits: Limits, api_key: str | None = None,
               access: Access | None = None):
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response
    from sse_starlette.sse import EventSourceResponse
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect

    app = FastAPI(title="lcc serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, access=access or Access())
    plain = loaded.model_id
    buffers = BufferCache(limits.cache_bytes)  # composed, converted buffers by their cartridges' digests
    paged = PagedCartridges(loaded, catalog)  # indexed cartridges, held open, each question its own pages
    libraries = [ServedLibrary(loaded, folder) for folder in catalog.folders[:1]]
    app.state.buffers, app.state.catalog = buffers, catalog

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return JSONResponse(error_body(exc.message, exc.kind, exc.code), status_code=exc.status,
                            headers={"connection": "close"} if exc.close else None)

    @app.exception_handler(LccError)
    async def _lcc_error(request, exc: LccError):
        return JSONResponse(error_body(exc.message), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = ("no such endpoint: this server answers POST /v1/chat/completions, GET /v1/models and GET /health"
                   if exc.status_code in (404, 405) else str(exc.detail))
        return JSONResponse(error_body(message, code=code), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(ClientGone)
    async def _gone(request, exc: ClientGone):
        return Response(status_code=499)  # never arrives: the client has left

    def authorise(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), api_key.encode())):
            raise ApiError(401, "a valid API key is required (Authorization: Bearer ...)", "authentication_error",
                           "invalid_api_key")

    async def read_body(request: Request) -> bytes:
        """The JSON body, at most `max_body_bytes`, arrived within `body_timeout` seconds."""
        media, _, params = request.headers.get("content-type", "").partition(";")
        charset = params.strip().lower().removeprefix("charset=").strip('"') if "charset" in params.lower() else ""
        if media.strip().lower() != "application/json" or charset not in ("", "utf-8"):
            raise ApiError(415, "the body must be JSON (Content-Type: application/json)", code="unsupported_media_type",
                           close=True)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise ApiError(413, f"the request body is over {limits.max_body_bytes:,} bytes", code="body_too_large",
                           close=True)
        body = bytearray()
        try:
            async with asyncio.timeout(limits.body_timeout):
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > limits.max_body_bytes:
                        raise ApiError(413, f"the request body is over {limits.max_body_bytes:,} bytes",
                                       code="body_too_large", close=True)
        except TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {limits.body_timeout:g} seconds",
                           code="body_timeout", close=True) from None
        except ClientDisconnect:
            raise ClientGone() from None
        return bytes(body)

    def parse(body: bytes) -> ChatRequest:
        try:
            return ChatRequest.model_validate_json(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(x) for x in first.get("loc", ()))
            raise ApiError(400, f"invalid request: {where + ': ' if where else ''}{first.get('msg', 'malformed')}"[:300],
                           code="invalid_request") from None

    async def refreshed(names=None) -> None:
        """The catalog looked at again and `names` (default: every file) verified, waited for
        without holding a thread; buffers of cartridges no longer served freed."""
        await asyncio.to_thread(catalog.refresh, tuple(names or ()))
        deadline = time.monotonic() + limits.verify_wait
        while not catalog.settled(names) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        live = catalog.digests()
        buffers.retain(lambda key: all(d in live for d in key))
        paged.retain(live)

    def resolve(name: str, admit: Callable[[int], None], question: str):
        """(key, buffer or None, pages or None) for a request's model name; 404 for anything
        not served. `admit(position)` gets where the prompt would start, known from the
        manifests (for indexed cartridges, from the pages `question` chose) before anything
        larger is built, and raises if the request cannot be served there (its window
        included). The key names the cartridges' contents (and the pages chosen), so a
        cartridge replaced while requests wait never shares a batch (or a buffer) with its old
        version. Runs in worker threads."""
        if name == plain:
            admit(len(loaded.prompter.context_ids(None)))
            return (), None, None
        if name == LIBRARY and libraries:
            return libraries[0].view(question, admit)
        parts = name.split("+")
        if len(parts) > limits.max_parts:
            raise ApiError(400, f"{len(parts)} cartridges in one model name; at most {limits.max_parts}",
                           code="too_many_cartridges")
        entries = [catalog.get(part) for part in parts]
        for part, entry in zip(parts, entries):
            if entry is None:
                raise ApiError(404, f"no model or cartridge named {part[:80]!r}", code="model_not_found")
            if entry.pending:
                raise ApiError(503, f"cartridge {part!r} is still being verified: try again", "server_error",
                               "model_verifying")
            if not entry.available:
                raise ApiError(404, f"cartridge {part!r} is unavailable: {entry.reason}", code="model_unavailable")
        key = tuple(e.facts.digest for e in entries)
        if any(e.facts.indexed for e in entries):
            if not all(e.facts.indexed for e in entries):
                raise ApiError(400, "indexed cartridges are read page by page and cannot be composed with ones that "
                                    "are not", code="model_unavailable")
            return paged.view(key, entries, question, admit)
        admit(composed_first([e.facts for e in entries]))

        def build():
            from ..runtime.memory import Whole, compose

            carts: dict[str, object] = {}
            for e in entries:
                if e.facts.digest not in carts:
                    try:
                        carts[e.facts.digest] = catalog.read(e)
                    except (LccError, OSError):
                        raise ApiError(503, f"cartridge {e.name!r} changed on disk: try again", "server_error",
                                       "model_changed") from None
            return Whole(compose([carts[e.facts.digest] for e in entries]), loaded).view("")

        return key, buffers.get_or_build(key, build), None

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
        return chat_ids(loaded.prompter, turns)

    def prepare(req: ChatRequest, first: int) -> Prepared:
        """The request ready for the engine, its prompt starting at position `first`: the
        tokenising and the stop strings' set-up (in a worker thread), every limit checked."""
        prompt = prompt_of(req)
        max_tokens = req.max_completion_tokens or req.max_tokens or limits.default_max_tokens
        if max_tokens > limits.max_tokens:
            raise ApiError(400, f"max_tokens {max_tokens} is over this server's limit of {limits.max_tokens}",
                           code="max_tokens_too_large")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > limits.max_stop:
            raise ApiError(400, f"at most {limits.max_stop} stop sequences")
        try:
            check_window(loaded, first + len(prompt), max_tokens, what="the prompt")
        except WindowError as exc:
            raise ApiError(400, exc.message, code="context_length_exceeded") from None
        temperature = req.temperature if req.temperature >= MIN_TEMPERATURE else 0.0
        return Prepared(prompt, StopStrings(stops), max_tokens, temperature)

    async def until_disconnect(request: Request) -> None:
        """Returns when the client has gone (the body is read: the next message is the end)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def collect(job: Job) -> tuple[str, str, int]:
        text = ""
        while True:
            event = await job.events.get()
            if event[0] == "delta":
                text += event[1]
            elif event[0] == "end":
                return text, event[1], event[2]
            else:
                raise ApiError(503, event[1], "server_error")

    @app.get("/health")
    async def health():
        sizes = list(engine.batch_sizes)
        return {"status": "ok", "model": plain, **catalog.counts(), "load": engine.load(),
                "max_queue": limits.max_queue, "batches": len(sizes),
                "mean_batch": round(sum(sizes) / len(sizes), 2) if sizes else None,
                "cache_bytes": buffers.bytes}

    @app.get("/v1/models", response_model=ModelList)
    async def models(request: Request):
        authorise(request)
        await refreshed()
        cards = [ModelCard(id=plain, lcc={"available": True, "cartridge": None})]
        if libraries:
            cards.append(ModelCard(id=LIBRARY, lcc=await asyncio.to_thread(libraries[0].summary)))
        cards += [ModelCard(id=e.name, lcc=e.summary()) for e in catalog.listing()]
        return ModelList(data=cards)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        authorise(request)
        req = parse(await read_body(request))
        if req.model not in (plain, LIBRARY):
            await refreshed(req.model.split("+")[:limits.max_parts + 1])
        readied: list[Prepared] = []
        question = next((m.text for m in reversed(req.messages) if m.role == "user"), "")
        key, buffer, pages = await asyncio.to_thread(resolve, req.model, lambda first: readied.append(prepare(req, first)),
                                                     question)
        extra = {"pages": pages} if pages is not None else None
        ready = readied[0]
        prompt = ready.prompt
        if buffer is None:
            prompt = loaded.prompter.context_ids(None) + prompt  # the plain model: its own system turn
        job = Job(key, buffer, prompt, ready.max_tokens, ready.temperature, req.seed, ready.stop,
                  asyncio.get_running_loop(), asyncio.Queue(), paged=pages is not None)
        try:
            engine.submit(job)
        except QueueFull as exc:
            raise ApiError(429, f"too many requests: {exc}", "rate_limit_error", "queue_full") from None
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        prompt_tokens = len(prompt) + (buffer.slots if buffer is not None else 0)

        if not req.stream:
            # Starlette does not cancel a handler whose client left: watch for it, so that the
            # engine stops decoding for a client that gave up as soon as it has.
            answer = asyncio.ensure_future(collect(job))
            gone = asyncio.ensure_future(until_disconnect(request))
            try:
                done, _ = await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                gone.cancel()
                if not answer.done():
                    answer.cancel()
                engine.cancel(job)
            if answer not in done:
                raise ClientGone()
            text, reason, completion = answer.result()
            reply = ChatResponse(id=rid, created=created, model=req.model,
                                 choices=[Choice(message=ChoiceMessage(content=text), finish_reason=reason)],
                                 usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion,
                                             total_tokens=prompt_tokens + completion), lcc=extra)
            return JSONResponse(reply.model_dump(exclude_none=True))

        def chunk(delta: Delta, reason: str | None = None) -> str:
            return ChatChunk(id=rid, created=created, model=req.model,
                             choices=[ChunkChoice(delta=delta, finish_reason=reason)],
                             lcc=extra if reason is not None else None).model_dump_json(exclude_none=True)

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

    return app
