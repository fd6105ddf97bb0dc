"""Talking to a Prefect API without importing Prefect: its credentials, and the one HTTP client kiln's server
code uses (kiln/server/prefect.py, kiln/server/serve.py).

The server kiln starts answers no one without credentials: `PREFECT_SERVER_API_AUTH_STRING` is a secret
generated once into kiln's state directory (`api-auth`, 0600), which kiln's own clients, workers and children
read as `PREFECT_API_AUTH_STRING` (HTTP basic authentication, as Prefect's own client sends it). Only
`GET /api/health` and `/api/ready` answer without it. CSRF protection is on: a request that changes something
carries a token the client fetched for itself (`GET /api/csrf-token?client=…`), so a page in a browser cannot
make a logged-in user's browser post to the API; CORS allows only the server's own origin.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kiln.host.state import secret_file
from kiln.model.errors import ServerError

AUTH_FILE = "api-auth"
AUTH_USER = "kiln"
CLIENT_AUTH_ENV = "PREFECT_API_AUTH_STRING"
UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
_LOCAL = ("127.0.0.1", "localhost", "::1")

_lock = threading.Lock()
_csrf_tokens: dict[str, str] = {}  # api url -> a token this process fetched for its client id
_CSRF_CLIENT = f"kiln-{uuid.uuid4()}"
_known: dict[str, str] = {}  # api url of a server kiln started -> its auth string (ensure_server registers it)


def auth_string(state: Path) -> str:
    """The auth string of the server kiln runs under `state` (`kiln:<random>`), generated on first use."""
    return secret_file(state / AUTH_FILE, lambda: f"{AUTH_USER}:{secrets.token_urlsafe(32)}".encode()).decode()


def server_settings(state: Path, origin: str) -> dict[str, str]:
    """The environment of a Prefect server that answers only kiln's clients: auth, CSRF, CORS for `origin`."""
    return {
        "PREFECT_SERVER_API_AUTH_STRING": auth_string(state),
        "PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED": "true",
        "PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS": origin,
    }


def register(api_url: str, auth: str) -> None:
    """Remember the credentials of the server at `api_url` (kiln's own) for this process's calls to it."""
    with _lock:
        _known[api_url.rstrip("/")] = auth


def _under(url: str, api: str) -> bool:
    api = api.rstrip("/")
    return bool(api) and (url == api or url.startswith(api + "/") or url.startswith(api + "?"))


def _headers(auth: str | None, url: str) -> dict[str, str]:
    """The Authorization header for `url`: `auth`, else those of kiln's server there, else the environment's
    when `url` is under the environment's PREFECT_API_URL; never anyone else's."""
    if auth is None:
        with _lock:
            auth = next((a for api, a in _known.items() if _under(url, api)), None)
    if auth is None and _under(url, os.environ.get("PREFECT_API_URL", "")):
        auth = os.environ.get(CLIENT_AUTH_ENV) or None
    if not auth:
        return {}
    return {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()}


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """The API does not redirect; a redirect would carry the Authorization header to wherever it points."""

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> urllib.request.Request | None:
        return None


def _opener(url: str) -> urllib.request.OpenerDirector:
    host = urllib.parse.urlparse(url).hostname or ""
    # never send a local server's requests, and their credentials, through a proxy
    handlers: list[urllib.request.BaseHandler] = [_NoRedirect()]
    if host in _LOCAL:
        handlers.append(urllib.request.ProxyHandler({}))
    return urllib.request.build_opener(*handlers)


def http_get(url: str, *, timeout: float, auth: str | None = None, limit: int = 65536) -> tuple[int, bytes]:
    """(status, first `limit` bytes of the body) of `GET url` with the API's credentials (`auth`, else the
    environment's); (0, b"") when nothing answers."""
    request = urllib.request.Request(url, headers=_headers(auth, url))
    try:
        with _opener(url).open(request, timeout=timeout) as resp:
            return int(resp.status), resp.read(limit)
    except urllib.error.HTTPError as exc:
        return int(exc.code), b""
    except (urllib.error.URLError, OSError, ValueError):
        return 0, b""


def _csrf_token(api_url: str, auth: str | None, timeout: float) -> str | None:
    """A CSRF token for this process's client id, fetched once per API; None when the server has CSRF
    protection off (it then answers 422)."""
    with _lock:
        if api_url in _csrf_tokens:
            return _csrf_tokens[api_url]
    status, body = http_get(f"{api_url.rstrip('/')}/csrf-token?client={_CSRF_CLIENT}", timeout=timeout, auth=auth)
    if status != 200:
        return None
    try:
        token = str(json.loads(body)["token"])
    except (ValueError, KeyError, TypeError):
        return None
    with _lock:
        _csrf_tokens[api_url] = token
    return token


def api_call(api_url: str, method: str, path: str, body: Mapping[str, Any] | None = None, *,
             timeout: float = 30.0, auth: str | None = None) -> tuple[int, Any]:
    """One call of the Prefect REST API with kiln's credentials and, for a change, a CSRF token:
    (HTTP status, decoded JSON or None, or the text of a body that is not JSON). Raises ServerError when
    nothing answers."""
    url = api_url.rstrip("/") + path
    headers = {"Content-Type": "application/json", **_headers(auth, url)}
    if method.upper() in UNSAFE_METHODS:
        token = _csrf_token(api_url, auth, timeout)
        if token is not None:
            headers.update({"Prefect-Csrf-Token": token, "Prefect-Csrf-Client": _CSRF_CLIENT})
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with _opener(url).open(request, timeout=timeout) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        if exc.code == 403 and method.upper() in UNSAFE_METHODS:
            with _lock:  # an expired token: the next call fetches a fresh one
                _csrf_tokens.pop(api_url, None)
        raw = exc.read()
        try:
            return exc.code, json.loads(raw) if raw else None
        except ValueError:
            return exc.code, raw.decode(errors="replace")
    except (urllib.error.URLError, OSError) as exc:
        raise ServerError(f"the Prefect API at {api_url} does not answer ({method} {path}): {exc}") from None
