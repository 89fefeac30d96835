"""uvicorn's h11 protocol with the two limits it lacks, so that idle sockets cannot deny service.

- A header timeout. uvicorn waits forever for a request's headers (its keep-alive timeout
  runs only between requests, and stops at the first byte of the next one): 90 sockets that
  send a request line and one header held the server. Here a connection whose request has
  not finished its headers `header_timeout` seconds after it opened (or after its previous
  response) is closed.
- A cap on open connections that idle ones cannot fill. uvicorn's own `limit_concurrency`
  counts every open connection, so idle sockets made every request a 503; the server does
  not set it. Past `max_connections` open connections, a new one closes the connection that
  has waited longest without a request in progress; only when every connection has one is
  the new one closed instead. (Requests themselves are bounded by the engine's queue: 429.)

A body that stops arriving is the app's to time out (app.py `read_body`). And one race is
closed: a body that turns out malformed while the app already answers is uvicorn's 400; the
app then sees a client that left, not an h11 error.
"""

from __future__ import annotations

import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def protocol_class(header_timeout: float, max_connections: int) -> type:
    """An H11Protocol subclass with these limits (uvicorn.Config(http=...) takes a class)."""

    class GuardedH11(H11Protocol):
        def connection_made(self, transport) -> None:
            self._header_timer = None
            self._idle_since = time.monotonic()
            super().connection_made(transport)
            self._make_room()
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # a request's headers are all in
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._idle_since = time.monotonic()
                self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            # A malformed body (a bad chunk) is found while the app already runs for its
            # headers: uvicorn answers 400 and closes, and the app's own answer then hit h11
            # in a closed state (a traceback in the log). The app sees a client that left.
            if self.cycle is not None and not self.cycle.response_complete:
                self.cycle.disconnected = True
                self.cycle.message_event.set()
            super().send_400_response(msg)

        # --- the header timer -----------------------------------------------------------------

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self.transport.close()

        # --- the connection cap ---------------------------------------------------------------

        def _in_request(self) -> bool:
            return self.cycle is not None and not self.cycle.response_complete

        def _make_room(self) -> None:
            if len(self.connections) <= max_connections:
                return
            idle = [c for c in self.connections if c is not self and not c._in_request()
                    and not c.transport.is_closing()]
            victim = min(idle, key=lambda c: c._idle_since) if idle else self
            victim.transport.close()

    return GuardedH11
