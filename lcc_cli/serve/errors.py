"""The server's own exceptions: a client's error (answered in OpenAI's error shape) and a
client that left."""

from __future__ import annotations


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 close: bool = False):
        self.status, self.message, self.kind, self.code = status, message, kind, code
        self.close = close  # the body was not read to its end: the connection cannot carry another request


class ClientGone(Exception):
    """The client disconnected: nothing is left to answer."""
