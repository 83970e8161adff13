"""The user's own grader over HTTP, called safely: where it may live, and one bounded call.

A grader {"grader": "http", "url": ...} may only be on this machine (loopback) or at a URL the operator
lists in LLM_MCP_REWARD_URLS (comma-separated; a URL matches one with the same scheme, host and port and a path
below its path, e.g. "https://grader.internal/score"). The job
posts {"items": [{"prompt", "completion", "row"}, ...]} and reads {"scores": [one number each]}. The call
has a time limit, the answer a size limit, redirects are refused (they could lead elsewhere), and every
failure is an error naming the grader, the URL and the cause: the step fails and the job keeps its
checkpoint, it never hangs. The server never calls it; GRPO jobs and evaluations do.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

MAX_ANSWER_BYTES = 1 << 20  # a score list of a few thousand numbers is a few tens of kB
REWARD_URLS_ENV = "LLM_MCP_REWARD_URLS"


def allowed_prefixes() -> list[str]:
    return [p.strip() for p in os.environ.get(REWARD_URLS_ENV, "").split(",") if p.strip()]


def url_problem(url: str | None) -> str | None:
    """Why `url` may not be called (None: it may)."""
    if not url:
        return "required for an http grader: where to post the batch, e.g. 'http://127.0.0.1:8000/score'"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"{url!r} is not an http(s) URL with a host"
    if any(_within(parts, urlsplit(p)) for p in allowed_prefixes()):
        return None
    host = parts.hostname
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        return None
    listed = allowed_prefixes()
    return (
        f"{url!r} is neither on this machine (127.0.0.1, ::1, localhost) nor listed by the operator in "
        f"{REWARD_URLS_ENV} ({listed or 'unset'}); run the grader on this machine, or ask the operator to add its "
        f"URL to {REWARD_URLS_ENV}"
    )


def _within(url, prefix) -> bool:
    """The URL is under the listed one: same scheme, host and port, and a path below the listed path."""
    same = (url.scheme, url.hostname, url.port) == (prefix.scheme, prefix.hostname, prefix.port)
    return same and url.path.startswith(prefix.path)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise urllib.error.HTTPError(req.full_url, code, f"redirect to {newurl} refused", headers, fp)


_OPENER = urllib.request.build_opener(_NoRedirect())


def post_batch(label: str, url: str, items: list[dict[str, Any]], timeout_s: float) -> list[float]:
    """One score per item from the grader at `url`.

    Raises:
        RuntimeError: not allowed, unreachable, too slow, too large an answer, or not one finite number per item.
    """
    why = url_problem(url)
    if why:
        raise RuntimeError(f"grader {label!r}: {why}")
    body = json.dumps({"items": items}).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    t0 = time.monotonic()
    try:
        with _OPENER.open(request, timeout=timeout_s) as answer:
            data = b""
            while len(data) <= MAX_ANSWER_BYTES:
                if time.monotonic() - t0 > timeout_s:
                    raise TimeoutError(f"no full answer within timeout_s={timeout_s:g}")
                chunk = answer.read(65536)
                if not chunk:
                    break
                data += chunk
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"grader {label!r} at {url} answered HTTP {exc.code} ({exc.reason})") from None
    except (OSError, TimeoutError) as exc:
        raise RuntimeError(f"grader {label!r} at {url} failed: {type(exc).__name__}: {exc}") from None
    if len(data) > MAX_ANSWER_BYTES:
        raise RuntimeError(f"grader {label!r} at {url}: the answer is over {MAX_ANSWER_BYTES} bytes")
    try:
        parsed = json.loads(data)
    except ValueError:
        raise RuntimeError(f"grader {label!r} at {url}: the answer is not JSON: {data[:200]!r}") from None
    scores = parsed.get("scores") if isinstance(parsed, dict) else parsed
    if not isinstance(scores, list) or len(scores) != len(items):
        raise RuntimeError(
            f'grader {label!r} at {url}: expected {{"scores": [{len(items)} numbers]}}, got {str(parsed)[:200]}'
        )
    out = []
    for i, s in enumerate(scores):
        if isinstance(s, bool) or not isinstance(s, int | float) or not math.isfinite(s):
            raise RuntimeError(f"grader {label!r} at {url}: scores[{i}]={s!r} is not a finite number")
        out.append(float(s))
    return out
