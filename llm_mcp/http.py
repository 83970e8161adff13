"""HTTP transports (SSE, streamable HTTP) with a bearer token and DNS-rebinding protection.

Loopback binds need no token. Any other bind address is refused unless a token is set
(LLM_MCP_AUTH_TOKEN or --auth-token-file); with one, every request must carry
`Authorization: Bearer <token>`. Host / Origin checks (the SDK's transport security) stay on
for every bind: requests must name an allowed host, and browsers from other origins are refused.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings

from llm_mcp.core.errors import ConfigurationError

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class BearerTokenMiddleware:
    """Reject HTTP requests without the right `Authorization: Bearer` token (401)."""

    def __init__(self, app: ASGIApp, token: str):
        self.app = app
        self._expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(b"authorization", b"")
        if hmac.compare_digest(given, self._expected):
            await self.app(scope, receive, send)
            return
        reason = "missing bearer token" if not given else "invalid bearer token"
        body = json.dumps({"error": "unauthorized", "detail": f"{reason}; send 'Authorization: Bearer <token>'"})
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b'Bearer realm="llm-mcp"')],
            }
        )
        await send({"type": "http.response.body", "body": body.encode()})


def transport_security(host: str, extra_hosts: list[str] | None = None) -> TransportSecuritySettings:
    """Host/Origin allow-lists: loopback names, the bind host (unless a wildcard), this machine's name."""
    names = list(LOOPBACK_NAMES)
    if host not in ("0.0.0.0", "::") and host not in names:
        names.append(host)
    if not is_loopback(host):
        names.append(socket.gethostname())
    names += extra_hosts or []
    hosts = [f"[{n}]" if ":" in n else n for n in dict.fromkeys(names)]
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=[h for n in hosts for h in (n, f"{n}:*")],
        allowed_origins=[o for n in hosts for o in (f"http://{n}:*", f"https://{n}:*", f"http://{n}", f"https://{n}")],
    )


def build_http_app(
    server: MCPServer,
    transport: str,
    *,
    host: str,
    token: str | None,
    allowed_hosts: list[str] | None = None,
    session_idle_s: float = 300.0,
    max_sessions: int = 256,
) -> ASGIApp:
    """The Starlette app for `transport` ('sse' or 'streamable-http'), wrapped in bearer auth if a token is set.

    Raises:
        ConfigurationError: a non-loopback bind without a token.
    """
    if not is_loopback(host) and not token:
        raise ConfigurationError(
            f"--host {host!r} is not a loopback address, and no auth token is configured: anyone who can reach "
            "this machine could start fine-tunes. Set LLM_MCP_AUTH_TOKEN (or --auth-token-file) or bind 127.0.0.1."
        )
    security = transport_security(host, allowed_hosts)
    if transport == "sse":
        app: ASGIApp = server.sse_app(transport_security=security, host=host)
    elif transport == "streamable-http":
        # Abandoned sessions are closed after session_idle_s; past max_sessions a new one gets 503 until one ends.
        app = server.streamable_http_app(
            transport_security=security,
            host=host,
            session_idle_timeout=session_idle_s or None,
            max_sessions=max_sessions,
        )
    else:
        raise ConfigurationError(
            f"transport={transport!r} is not an HTTP transport; allowed: ['sse', 'streamable-http']"
        )
    return BearerTokenMiddleware(app, token) if token else app


def serve_http(app: ASGIApp, host: str, port: int) -> None:
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
