"""What a browser may do with the server: the Host and Origin checks, CORS, the error shape.

A web page a user visits can send requests to 127.0.0.1 too. Three defences:

- Host. A page that makes its own name resolve to 127.0.0.1 (DNS rebinding) reads the
  answers as its own; its requests carry its name in Host. A request is answered only when
  Host names the address and port the connection reached, a loopback name (localhost,
  127.0.0.1, [::1]) on a loopback connection, or a name given by `--allow-host` (NAME for any
  port, NAME:PORT for one); otherwise 421.
- Origin. Browsers send it with every cross-site request (and with same-site POSTs); other
  clients do not. A request with an Origin is refused (403) unless `--allow-origin` names it
  ('*': any); an allowed one gets the CORS headers, and its preflight (OPTIONS) an answer.
- Content-Type. Only `application/json` bodies are read (app.py, 415 otherwise): text/plain
  and form bodies are what a page may POST without a preflight.

Every refusal is an OpenAI-style error body.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
ALLOWED_METHODS = "GET, POST, OPTIONS"


def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


@dataclass
class Access:
    allow_hosts: list[str] = field(default_factory=list)  # NAME or NAME:PORT
    allow_origins: list[str] = field(default_factory=list)  # scheme://host[:port], or '*'

    def host_allowed(self, host: str | None, server: tuple | None) -> bool:
        if host is None:
            return True  # HTTP/1.0 without Host: no browser sends that
        name, port = split_host(host)
        if name is None:
            return False
        for allowed in self.allow_hosts:
            a_name, a_port = split_host(allowed.lower())
            if a_name == name and (a_port is None or a_port == port):
                return True
        if server is None:
            return False
        local, local_port = str(server[0]).lower(), server[1]
        if (port or 80) != local_port:
            return False
        if _same_address(name, local):
            return True
        return _is_loopback(local) and name in LOOPBACK_NAMES

    def origin_allowed(self, origin: str) -> bool:
        return "*" in self.allow_origins or origin.lower().rstrip("/") in {
            o.lower().rstrip("/") for o in self.allow_origins}


def split_host(host: str) -> tuple[str | None, int | None]:
    """('name', port or None) of a Host value; (None, None) when it is malformed."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            return None, None
        name, rest = host[1:end], host[end + 1:]
        if rest and not rest.startswith(":"):
            return None, None
        port_text = rest[1:] if rest else None
    else:
        name, _, port_text = host.partition(":")
        port_text = port_text if ":" in host else None
    if not name:
        return None, None
    if port_text is None:
        return name, None
    if not port_text.isdigit() or not port_text.isascii() or int(port_text) > 65535:
        return None, None
    return name, int(port_text)


def _same_address(name: str, local: str) -> bool:
    try:
        return ipaddress.ip_address(name) == ipaddress.ip_address(local)
    except ValueError:
        return False


def _is_loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


class Guard:
    """ASGI middleware: the Host and Origin checks and CORS, before the app sees a request."""

    def __init__(self, app, access: Access):
        self.app, self.access = app, access

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = _headers(scope)
        if not self.access.host_allowed(headers.get("host"), scope.get("server")):
            return await _refuse(send, 421, "this server does not answer for that Host (see lcc serve --allow-host)",
                                 "host_not_allowed")
        origin = headers.get("origin")
        if origin is None:
            return await self.app(scope, receive, send)
        if not self.access.origin_allowed(origin):
            return await _refuse(send, 403, "requests from web pages are refused unless their origin is allowed "
                                            "(see lcc serve --allow-origin)", "origin_not_allowed")
        cors = [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]
        if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
            asked = headers.get("access-control-request-headers", "")
            await send({"type": "http.response.start", "status": 204, "headers": cors + [
                (b"access-control-allow-methods", ALLOWED_METHODS.encode()),
                (b"access-control-allow-headers", asked.encode("latin-1")),
                (b"access-control-max-age", b"600")]})
            return await send({"type": "http.response.body", "body": b""})

        async def send_with_cors(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *cors]}
            await send(message)

        return await self.app(scope, receive, send_with_cors)


def _headers(scope) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in scope.get("headers", []):
        out.setdefault(key.decode("latin-1").lower(), value.decode("latin-1"))
    return out


async def _refuse(send, status: int, message: str, code: str) -> None:
    body = json.dumps(error_body(message, "invalid_request_error", code)).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
