"""The HTTP surface of `lcc serve`: OpenAI-compatible chat completions over cartridges.

FastAPI (with pydantic models for every request and response: schema.py) under uvicorn, the
common, well-kept ASGI pair; server-sent events through sse-starlette. Endpoints, one
function each below; what they do step by step is `service.Service`:

- POST /v1/chat/completions: `model` names a cartridge (its file stem), several composed
  with `+` ("a+b", laid out as `lcc ask A B` lays them; at most `max_parts`), `library` for
  the served folder asked as one (its indexed cartridges, through DIR/.lcc-index.sqlite), or
  the plain model's name for no cartridge. messages, max_tokens, temperature, seed, stop,
  stream, and `lcc` (the request's own read: budget or ratio, selector, reencode, prefix,
  pages). For indexed cartridges and the library, the last user message chooses the pages
  read, and the response's extra field `lcc` says which (cartridge, page, text) and how
  (`lcc.read`); an openai client finds it in `reply.model_extra["lcc"]`.
- GET /v1/models: the plain model and every cartridge, with its manifest summary, or the
  reason it is unavailable.
- GET /health: counts the catalog already holds; it never waits for a file.

Every client mistake is a 4xx with an OpenAI-style error body, never a 500, a traceback in the
log or a hang. Browsers are kept out by guard.py.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import Request  # at module level: FastAPI resolves handler annotations here

from ..config import ReadConfig
from ..errors import LccError
from .catalog import Catalog
from .engine import Engine, Job
from .errors import ApiError, ClientGone
from .guard import Access, Guard, error_body
from .schema import (ChatChunk, ChatRequest, ChatResponse, Choice, ChoiceMessage, ChunkChoice, Delta, Limits,  # noqa: F401
                     ModelCard, ModelList, Usage)
from .service import Service


def create_app(loaded, catalog: Catalog, engine: Engine, limits: Limits, api_key: str | None = None,
               access: Access | None = None, read: ReadConfig | None = None):
    from fastapi import FastAPI

    app = FastAPI(title="lcc serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, access=access or Access())
    service = Service(loaded, catalog, engine, limits, api_key, read)
    app.state.buffers, app.state.catalog, app.state.service = service.buffers, catalog, service
    _errors(app)

    @app.get("/health")
    async def health():
        return _health(service)

    @app.get("/v1/models", response_model=ModelList)
    async def models(request: Request):
        return await _models(service, request)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await _chat(service, request)

    return app


def _errors(app) -> None:
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException

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


def _health(service: Service) -> dict:
    engine, limits = service.engine, service.limits
    sizes = list(engine.batch_sizes)
    return {"status": "ok", "model": service.plain, **service.catalog.counts(), "load": engine.load(),
            "max_queue": limits.max_queue, "batches": len(sizes),
            "mean_batch": round(sum(sizes) / len(sizes), 2) if sizes else None,
            "cache_bytes": service.buffers.bytes}


async def _models(service: Service, request: Request) -> ModelList:
    from .catalog import LIBRARY

    service.authorise(request.headers)
    await service.refreshed()
    cards = [ModelCard(id=service.plain, lcc={"available": True, "cartridge": None})]
    if service.libraries:
        cards.append(ModelCard(id=LIBRARY, lcc=await asyncio.to_thread(service.libraries[0].summary)))
    cards += [ModelCard(id=e.name, lcc=e.summary()) for e in service.catalog.listing()]
    return ModelList(data=cards)


async def _chat(service: Service, request: Request):
    service.authorise(request.headers)
    req = service.parse(await service.read_body(request))
    job, prompt_tokens, extra = await service.submit(req)
    reply = _Reply(req, f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), prompt_tokens, extra)
    if not req.stream:
        return await _complete(service, request, job, reply)
    return _stream(service, job, reply)


class _Reply:
    """What every response to one request shares: its id, time, model, usage and `lcc` extra."""

    def __init__(self, req: ChatRequest, rid: str, created: int, prompt_tokens: int, extra: dict | None):
        self.req, self.rid, self.created, self.prompt_tokens, self.extra = req, rid, created, prompt_tokens, extra

    def whole(self, text: str, reason: str, completion: int) -> dict:
        usage = Usage(prompt_tokens=self.prompt_tokens, completion_tokens=completion,
                      total_tokens=self.prompt_tokens + completion)
        return ChatResponse(id=self.rid, created=self.created, model=self.req.model,
                            choices=[Choice(message=ChoiceMessage(content=text), finish_reason=reason)],
                            usage=usage, lcc=self.extra).model_dump(exclude_none=True)

    def chunk(self, delta: Delta, reason: str | None = None) -> str:
        return ChatChunk(id=self.rid, created=self.created, model=self.req.model,
                         choices=[ChunkChoice(delta=delta, finish_reason=reason)],
                         lcc=self.extra if reason is not None else None).model_dump_json(exclude_none=True)


async def _collect(job: Job) -> tuple[str, str, int]:
    text = ""
    while True:
        event = await job.events.get()
        if event[0] == "delta":
            text += event[1]
        elif event[0] == "end":
            return text, event[1], event[2]
        else:
            raise ApiError(503, event[1], "server_error")


async def _until_disconnect(request: Request) -> None:
    """Returns when the client has gone (the body is read: the next message is the end)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _complete(service: Service, request: Request, job: Job, reply: _Reply):
    from fastapi.responses import JSONResponse

    # Starlette does not cancel a handler whose client left: watch for it, so that the engine
    # stops decoding for a client that gave up as soon as it has.
    answer = asyncio.ensure_future(_collect(job))
    gone = asyncio.ensure_future(_until_disconnect(request))
    try:
        done, _ = await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not answer.done():
            answer.cancel()
        service.engine.cancel(job)
    if answer not in done:
        raise ClientGone()
    return JSONResponse(reply.whole(*answer.result()))


def _stream(service: Service, job: Job, reply: _Reply):
    from sse_starlette.sse import EventSourceResponse

    async def events():
        try:
            yield {"data": reply.chunk(Delta(role="assistant", content=""))}
            while True:
                event = await job.events.get()
                if event[0] == "delta":
                    yield {"data": reply.chunk(Delta(content=event[1]))}
                elif event[0] == "end":
                    yield {"data": reply.chunk(Delta(), event[1])}
                    break
                else:
                    yield {"data": json.dumps({"error": {"message": event[1], "type": "server_error"}})}
                    break
            yield {"data": "[DONE]"}
        finally:  # also when the client disconnects: its place in the queue is freed
            service.engine.cancel(job)

    return EventSourceResponse(events(), ping=15)
