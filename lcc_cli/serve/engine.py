"""The one thread that runs the model for the server, and its batching policy.

Requests become `Job`s in one queue. The engine takes the oldest job and, if it decodes
greedily, every other queued greedy job for the same cartridge set, or (for indexed
cartridges and the library) any other job whose pages were chosen per question (up to
`max_batch`), and hands them to the reading engine (runtime/reading.py) as one batch: rows
after one shared view, or after one view each (an indexed cartridge's questions read
different pages; shorter rows are padded and masked). A sampled job (temperature > 0) runs
alone, so that its seed alone decides its text. The engine only schedules: what a row reads
and how it is decoded is the reading engine's, exactly as for `lcc ask`. Text goes back to each request as it is produced (for streaming) through the
request's own asyncio queue. A job whose client left is skipped and frees its place at
once; a batch whose clients all left stops decoding.

At most `max_queue` jobs wait or run at a time; `submit` refuses more (the app answers 429).
A job's stop strings arrive ready to match (`runtime.text.StopStrings`, built while the request
was parsed): their set-up is linear in their length, but four of 240,000 characters still take
0.05-0.1 s, time the engine thread would take from every other request.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field


class QueueFull(Exception):
    pass


@dataclass(eq=False)  # a job is itself: never compared field by field (its view holds tensors)
class Job:
    # the cartridges' contents (their digests, in order; () for the plain model) and what the
    # question chose: only jobs with one key share a batch
    key: tuple
    view: object  # runtime.reading.View, keyed by `key`
    prompt: list[int]
    max_tokens: int
    temperature: float
    seed: int
    stop: object  # runtime.text.StopStrings for this request alone (it keeps matching state)
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue  # ("delta", text) ... then ("end", finish_reason, completion_tokens) or ("error", msg)
    cancelled: threading.Event = field(default_factory=threading.Event)
    paged: bool = False  # its view holds the pages its question chose (indexed cartridges, the library)
    prefix: object = None  # runtime.prefix.ReadingPrefix read before the view, or None
    # engine-side state
    finished: bool = False
    tokens: int = 0

    def send(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Engine:
    def __init__(self, loaded, max_batch: int = 8, max_queue: int = 32):
        self.loaded, self.max_batch, self.max_queue = loaded, max_batch, max_queue
        self._pending: list[Job] = []
        self._active: set[int] = set()  # ids of jobs waiting or running whose clients are still there
        self._cv = threading.Condition()
        self._stopping = False
        self._running = False  # a batch is decoding (tests)
        self.batch_sizes: list[int] = []  # rows of every decode run (tests and /health)
        self._thread = threading.Thread(target=self._loop, name="lcc-engine", daemon=True)
        self._thread.start()

    # --- called from the app -----------------------------------------------------------------

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._active) >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already waiting or running")
            self._pending.append(job)
            self._active.add(id(job))
            self._cv.notify()

    def cancel(self, job: Job) -> None:
        """The client left: drop the job if it still waits; a running one stops being served."""
        job.cancelled.set()
        with self._cv:
            if job in self._pending:
                self._pending.remove(job)
            self._active.discard(id(job))

    def load(self) -> int:
        with self._cv:
            return len(self._active)

    def busy(self) -> bool:
        """A batch is decoding now."""
        with self._cv:
            return self._running

    def stop(self) -> None:
        """Cancel what waits, let the running batch finish, end the thread."""
        with self._cv:
            self._stopping = True
            for job in self._pending:
                job.send("error", "the server is shutting down")
                self._active.discard(id(job))
            self._pending.clear()
            self._cv.notify_all()
        self._thread.join(timeout=60)

    # --- the engine thread -------------------------------------------------------------------

    def _take(self) -> list[Job] | None:
        with self._cv:
            while not self._pending and not self._stopping:
                self._cv.wait()
            if self._stopping and not self._pending:
                return None
            self._running = True
            first = self._pending.pop(0)
            group = [first]
            if first.temperature <= 0:
                for job in list(self._pending):
                    if len(group) >= self.max_batch:
                        break
                    if job.temperature <= 0 and _batchable(first, job):
                        group.append(job)
                        self._pending.remove(job)
            return group

    def _loop(self) -> None:
        while True:
            group = self._take()
            if group is None:
                return
            try:
                self._run(group)
            except Exception as exc:  # a failed decode fails its requests, never the server
                for job in group:
                    if not job.finished:
                        job.finished = True
                        job.send("error", f"decoding failed: {type(exc).__name__}: {exc}".splitlines()[0][:300])
            finally:
                with self._cv:
                    self._running = False
                    for job in group:
                        self._active.discard(id(job))

    def _run(self, group: list[Job]) -> None:
        from ..config import AskConfig
        from ..runtime.reading import Row, answer_rows
        from ..runtime.text import TextStream

        group = [j for j in group if not j.cancelled.is_set()]
        if not group:
            return
        self.batch_sizes.append(len(group))
        p, tok = self.loaded.prompter, self.loaded.tokenizer
        head = group[0]
        streams = []
        for job in group:
            stream = TextStream(tok, p.stop_ids, lambda piece, job=job: job.send("delta", piece), trim=True)
            stream.stops = job.stop  # built off this thread (module docstring)
            streams.append(stream)

        def on_step(tokens: list[list[int]], done: list[bool]) -> bool:
            for job, stream, row, ended in zip(group, streams, tokens, done):
                if job.finished:
                    continue
                if job.cancelled.is_set():
                    job.finished = True
                    continue
                job.tokens = len(row)
                reason = "stop" if ended else "length" if len(row) >= job.max_tokens else None
                if stream.push(row, final=reason is not None):
                    reason = "stop"
                if reason is not None:
                    job.finished = True
                    job.send("end", reason, job.tokens)
            with self._cv:  # finished rows free their place at once (clients that left already did)
                for job in group:
                    if job.finished:
                        self._active.discard(id(job))
            return not all(j.finished for j in group)

        cfg = AskConfig(max_new_tokens=max(j.max_tokens for j in group), temperature=head.temperature, seed=head.seed)
        answer_rows(self.loaded, [Row(j.view, j.prompt) for j in group], cfg, head.prefix, on_step=on_step)
        for job in group:  # rows that ran out of new tokens in a decode sized for a longer one
            if not job.finished:
                job.finished = True
                job.send("end", "length", job.tokens)


def _batchable(a: Job, b: Job) -> bool:
    """Greedy jobs decode together when they read the same entries after the same prefix, or
    when both read pages chosen per question without attention biases (then each row gets its
    own cache, padded and masked)."""
    if a.prefix is not b.prefix:
        return False
    if a.key == b.key:
        return True
    # only views chosen per question (a budget's worth of pages): padding a whole large
    # cartridge to the longest row would cost memory the cache budget does not count
    return a.paged and b.paged and a.view.bias is None and b.view.bias is None
