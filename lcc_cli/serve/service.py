"""What the endpoints of `lcc serve` do, one method each step: read and check a request,
resolve its model name to what it reads, build its prompt, and hand it to the engine.

Every client mistake is a 4xx (`ApiError`), never a 500: fields are typed strictly (a "10" is
not a number), a body must be JSON and arrive within `body_timeout`, a request's window is
checked from the manifests (for indexed cartridges, from the pages its question chose) before
any tensor is built, and work that reads files or tokenises long text runs in worker threads,
off the event loop (the methods marked so).
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Callable

from pydantic import ValidationError

from ..config import ReadConfig
from ..errors import LccError, UsageError, WindowError
from ..runtime.reading import NO_PAGES
from ..runtime.text import StopStrings, check_window
from .cache import BufferCache
from .catalog import LIBRARY, Catalog, composed_first
from .engine import Engine, Job
from .errors import ApiError, ClientGone
from .memories import PagedCartridges, ServedLibrary
from .prompt import chat_ids
from .schema import MIN_TEMPERATURE, ChatRequest, Limits, Prepared


class Service:
    def __init__(self, loaded, catalog: Catalog, engine: Engine, limits: Limits, api_key: str | None = None,
                 read: ReadConfig | None = None):
        from ..runtime.prefix import reading_prefix

        self.loaded, self.catalog, self.engine, self.limits, self.api_key = loaded, catalog, engine, limits, api_key
        self.read = read or ReadConfig()  # the server's reads; a request's `lcc` object changes its own
        self.plain = loaded.model_id
        # loaded once; each read decides whether to put it first
        self.prefix = reading_prefix(loaded, True, self.read.prefix_file)
        self.buffers = BufferCache(limits.cache_bytes)  # composed, converted buffers by their cartridges' digests
        self.paged = PagedCartridges(loaded, catalog)  # indexed cartridges, held open, each question its own pages
        self.libraries = [ServedLibrary(loaded, folder) for folder in catalog.folders[:1]]

    # --- the request ---------------------------------------------------------------------------

    def authorise(self, headers) -> None:
        if self.api_key is None:
            return
        given = headers.get("authorization", "")
        if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), self.api_key.encode())):
            raise ApiError(401, "a valid API key is required (Authorization: Bearer ...)", "authentication_error",
                           "invalid_api_key")

    async def read_body(self, request) -> bytes:
        """The JSON body, at most `max_body_bytes`, arrived within `body_timeout` seconds."""
        from starlette.requests import ClientDisconnect

        limits = self.limits
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

    @staticmethod
    def parse(body: bytes) -> ChatRequest:
        try:
            return ChatRequest.model_validate_json(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(x) for x in first.get("loc", ()))
            raise ApiError(400, f"invalid request: {where + ': ' if where else ''}{first.get('msg', 'malformed')}"[:300],
                           code="invalid_request") from None

    def read_of(self, req: ChatRequest) -> ReadConfig:
        """The server's read settings with the request's own `lcc` fields on top."""
        opts = req.lcc
        if opts is None:
            return self.read
        if opts.budget is not None and opts.ratio is not None:
            raise ApiError(400, "invalid request: lcc: give budget or ratio, not both", code="invalid_request")
        changed = {k: v for k, v in opts.model_dump(exclude={"pages"}).items() if v is not None}
        if "budget" in changed:
            changed["ratio"] = None
        elif "ratio" in changed:
            changed["budget"] = None
        try:
            return ReadConfig.from_dict({**vars(self.read), **changed})
        except UsageError as exc:
            raise ApiError(400, f"invalid request: lcc: {exc.message}", code="invalid_request") from None

    async def refreshed(self, names=None) -> None:
        """The catalog looked at again and `names` (default: every file) verified, waited for
        without holding a thread; buffers of cartridges no longer served freed."""
        catalog = self.catalog
        await asyncio.to_thread(catalog.refresh, tuple(names or ()))
        deadline = time.monotonic() + self.limits.verify_wait
        while not catalog.settled(names) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        live = catalog.digests()
        self.buffers.retain(lambda key: all(d in live for d in key))
        self.paged.retain(live)

    # --- what a request reads (worker threads) -------------------------------------------------

    def resolve(self, name: str, admit: Callable[[int], None], question: str, read: ReadConfig):
        """The runtime.reading.View a request's model name reads, keyed by what it reads; 404
        for anything not served. `admit(position)` gets where the prompt would start, known
        from the manifests (for indexed cartridges, from the pages `question` chose) before
        anything larger is built, and raises if the request cannot be served there (its window
        included). The key names the cartridges' contents (and the pages chosen), so a
        cartridge replaced while requests wait never shares a batch (or a buffer) with its old
        version."""
        from ..runtime.reading import View

        if name == self.plain:
            ids = self.loaded.prompter.context_ids(None)
            admit(len(ids))
            return View.text(ids, key=(), document=False)  # the plain model: its own system turn
        if name == LIBRARY and self.libraries:
            return self.libraries[0].view(question, admit, read)
        entries = self._entries(name)
        key = tuple(e.facts.digest for e in entries)
        if any(e.facts.indexed for e in entries):
            from ..runtime.memory import check_composable

            try:
                check_composable([e.facts.indexed for e in entries], [e.name for e in entries])
            except UsageError as exc:
                raise ApiError(400, exc.message, code="model_unavailable") from None
            return self.paged.view(key, entries, question, admit, read)
        admit(composed_first([e.facts for e in entries]))
        return View(self.buffers.get_or_build(key, lambda: self._composed(entries)), key=key)

    def _entries(self, name: str) -> list:
        parts = name.split("+")
        if len(parts) > self.limits.max_parts:
            raise ApiError(400, f"{len(parts)} cartridges in one model name; at most {self.limits.max_parts}",
                           code="too_many_cartridges")
        entries = [self.catalog.get(part) for part in parts]
        for part, entry in zip(parts, entries):
            if entry is None:
                raise ApiError(404, f"no model or cartridge named {part[:80]!r}", code="model_not_found")
            if entry.pending:
                raise ApiError(503, f"cartridge {part!r} is still being verified: try again", "server_error",
                               "model_verifying")
            if not entry.available:
                raise ApiError(404, f"cartridge {part!r} is unavailable: {entry.reason}", code="model_unavailable")
        return entries

    def _composed(self, entries):
        """The composed buffer of compiled cartridges, built by runtime.memory as `lcc ask` builds it."""
        from ..runtime.memory import open_memory

        carts: dict[str, object] = {}
        for e in entries:
            if e.facts.digest not in carts:
                try:
                    carts[e.facts.digest] = self.catalog.read(e)
                except (LccError, OSError):
                    raise ApiError(503, f"cartridge {e.name!r} changed on disk: try again", "server_error",
                                   "model_changed") from None
        memory = open_memory([carts[e.facts.digest] for e in entries], self.loaded, [e.name for e in entries])
        return memory.view("").buffer

    def prompt_of(self, req: ChatRequest) -> list[int]:
        limits = self.limits
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
        return chat_ids(self.loaded.prompter, turns)

    def prepare(self, req: ChatRequest, first: int) -> Prepared:
        """The request ready for the engine, its prompt starting at position `first`: the
        tokenising and the stop strings' set-up, every limit checked."""
        limits = self.limits
        prompt = self.prompt_of(req)
        max_tokens = req.max_completion_tokens or req.max_tokens or limits.default_max_tokens
        if max_tokens > limits.max_tokens:
            raise ApiError(400, f"max_tokens {max_tokens} is over this server's limit of {limits.max_tokens}",
                           code="max_tokens_too_large")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > limits.max_stop:
            raise ApiError(400, f"at most {limits.max_stop} stop sequences")
        try:
            check_window(self.loaded, first + len(prompt), max_tokens, what="the prompt")
        except WindowError as exc:
            raise ApiError(400, exc.message, code="context_length_exceeded") from None
        temperature = req.temperature if req.temperature >= MIN_TEMPERATURE else 0.0
        return Prepared(prompt, StopStrings(stops), max_tokens, temperature)

    # --- the job ---------------------------------------------------------------------------------

    async def submit(self, req: ChatRequest) -> tuple[Job, int, dict | None]:
        """(the job, in the engine's queue; its prompt tokens; the `lcc` extra of the response)."""
        read = self.read_of(req)
        prefix = self.prefix if read.prefix else None
        first = prefix.slots if prefix is not None else 0  # admitted before the view is known: the most it reads
        if req.model not in (self.plain, LIBRARY):
            await self.refreshed(req.model.split("+")[:self.limits.max_parts + 1])
        readied: list[Prepared] = []
        question = next((m.text for m in reversed(req.messages) if m.role == "user"), "")
        view = await asyncio.to_thread(self.resolve, req.model, lambda end: readied.append(self.prepare(req, first + end)),
                                       question, read)
        ready = readied[0]
        job = Job(view.key, view, ready.prompt, ready.max_tokens, ready.temperature, req.seed, ready.stop,
                  asyncio.get_running_loop(), asyncio.Queue(), paged=view.pages is not None, prefix=prefix)
        from .engine import QueueFull

        try:
            self.engine.submit(job)
        except QueueFull as exc:
            raise ApiError(429, f"too many requests: {exc}", "rate_limit_error", "queue_full") from None
        # the engine reads the prefix before documents only (runtime.reading.View.document)
        read_prefix = prefix if prefix is not None and view.document else None
        prompt_tokens = len(ready.prompt) + view.stored + len(view.fresh) + (read_prefix.slots if read_prefix else 0)
        extra = None
        if view.pages is not None:
            extra = {"read": _read_report(read, view), "prefix": read_prefix.name if read_prefix else None}
            if req.lcc is None or req.lcc.pages:
                extra["pages"] = [p.to_dict() for p in view.pages]
            if not view.pages:
                extra["note"] = NO_PAGES
        return job, prompt_tokens, extra


def _read_report(read: ReadConfig, view) -> dict:
    """What the read was: the settings that chose the pages, and the entries the pages hold."""
    return {"budget": read.budget, "ratio": read.ratio, "selector": read.selector, "reencode": read.reencode,
            "prefix": read.prefix, "entries": sum(p.entries for p in view.pages or [])}
