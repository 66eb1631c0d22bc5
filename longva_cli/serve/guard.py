"""What keeps web pages out: Host, Origin and Content-Type checks before any route runs.

A page the user visits can send requests to a server on their machine. Three checks stop it
from making the model work:

- `Host` must name this server (DNS rebinding points a site's own name at 127.0.0.1; the
  browser then sends that name). Accepted: the bound address; loopback names when bound to
  loopback; any address and this machine's names when bound to every interface; and the
  names given with `--allowed-hosts`.
- An `Origin` other than the server's own is refused unless `--cors-origin` lets that site in;
  CORS preflights are answered for those sites only (starlette's `CORSMiddleware`).
- A POST must say `Content-Type: application/json`: a browser sends that cross-site only
  after a preflight, which a foreign origin fails.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from longva_cli.serve.openai_format import APIError

ANY = "*"
LOOPBACK_NAMES = ("localhost",)


def _address(name: str):
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def split_host(value: str) -> tuple[str, int | None]:
    """("name", port) of a Host header or an origin's netloc: lower case, no brackets, no final dot."""
    value = value.strip().lower()
    port = None
    if value.startswith("["):  # [::1]:8000
        name, _, rest = value[1:].partition("]")
        if rest.startswith(":") and rest[1:].isdigit():
            port = int(rest[1:])
    else:
        name, colon, digits = value.rpartition(":")
        if colon and digits.isdigit() and ":" not in name:
            port = int(digits)
        else:
            name = value
    return name.removesuffix("."), port


@dataclass
class HostPolicy:
    """Which Host headers name this server, for a server bound to `bind`."""

    bind: str
    allowed: tuple[str, ...] = ()  # --allowed-hosts, lower case; "*" accepts any

    def __post_init__(self) -> None:
        bind = self.bind.lower().strip("[]")
        self._bound = _address(bind)
        self._loopback = bind in LOOPBACK_NAMES or (self._bound is not None and self._bound.is_loopback)
        self._everywhere = self._bound is not None and self._bound.is_unspecified
        if self._everywhere:
            self._names = {*LOOPBACK_NAMES, socket.gethostname().lower(), socket.getfqdn().lower()}
        else:
            self._names = {*LOOPBACK_NAMES} if self._loopback else {bind}

    def allows(self, host: str) -> bool:
        name, _port = split_host(host)
        if ANY in self.allowed or name in self.allowed:
            return True
        address = _address(name)
        if address is None:
            return name in self._names
        # An address is never a rebinding attack (that needs a name the attacker controls); it
        # must still be one this server listens on.
        return self._everywhere or address == self._bound or (self._loopback and address.is_loopback)


def same_origin(origin: str, host: str) -> bool:
    """Whether `origin` (scheme://host[:port]) is the origin of a page served from `host`."""
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return False
    default = 443 if parts.scheme == "https" else 80
    origin_name, origin_port = split_host(parts.netloc)
    host_name, host_port = split_host(host)
    return origin_name == host_name and (origin_port or default) == (host_port or default)


def guard_problem(method: str, headers: Headers, hosts: HostPolicy, cors_origins: tuple[str, ...]) -> APIError | None:
    """Why a request must be refused before any route sees it, or None."""
    host = headers.get("host")
    if not host:
        return APIError(400, "the request has no Host header.", code="invalid_host")
    if not hosts.allows(host):
        name = split_host(host)[0]
        return APIError(
            400, f"the Host header {host!r} does not name this server; if it does, start it with --allowed-hosts {name} "
            "(this check stops web pages from reaching the server through DNS rebinding).",
            code="invalid_host",
        )
    origin = headers.get("origin")
    if origin is not None and not same_origin(origin, host) and ANY not in cors_origins and origin.lower() not in cors_origins:
        return APIError(
            403, f"requests from web pages at {origin} are refused; to let that site use this server, start it with --cors-origin {origin}.",
            type="permission_error", code="cross_origin",
        )
    if method == "POST":
        media_type = headers.get("content-type", "").partition(";")[0].strip().lower()
        if media_type != "application/json":
            return APIError(
                415, f"the request body must be JSON sent with 'Content-Type: application/json' (got {media_type or 'none'!r}).",
                code="unsupported_media_type",
            )
    return None


class RequestGuard:
    """ASGI middleware: refuse with OpenAI-style JSON what `guard_problem` finds."""

    def __init__(self, app: ASGIApp, hosts: HostPolicy, cors_origins: tuple[str, ...] = ()) -> None:
        self.app = app
        self.hosts = hosts
        self.cors_origins = cors_origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            problem = guard_problem(scope["method"], Headers(scope=scope), self.hosts, self.cors_origins)
            if problem is not None:
                await JSONResponse(problem.body(), status_code=problem.status)(scope, receive, send)
                return
        await self.app(scope, receive, send)
