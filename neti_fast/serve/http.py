"""HTTP pieces every route module shares: JSON errors, request bodies, the API key, PNG encoding."""
from __future__ import annotations

import base64
import hmac
import io
import ipaddress
import json

from fastapi import Request, UploadFile
from fastapi.responses import JSONResponse

from .a1111 import FieldError


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def error_response(message: str, field: str | None, status: int):
    """Every error the server answers: {"error": one line, "field": the request field or null}."""
    return JSONResponse({"error": message, "field": field}, status_code=status)


def png_b64(img) -> str:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


async def json_body(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise FieldError("body", "is not valid JSON") from None
    if not isinstance(body, dict):
        raise FieldError("body", "must be a JSON object")
    return body


def client_host(request: Request) -> str:
    return request.client.host if request.client else ""


async def read_limited(upload: UploadFile, limit: int, field: str) -> bytes:
    chunks, size = [], 0
    while True:
        chunk = await upload.read(1 << 20)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise FieldError(field, f"{upload.filename}: larger than the server's limit of {limit // 2**20} MB", 413)
        chunks.append(chunk)


class ApiKeyMiddleware:
    """Every route but /health needs the key: `Authorization: Bearer KEY`, `X-API-Key: KEY`, or HTTP
    Basic with KEY as the password (A1111 clients' --api-auth; browsers ask for it themselves)."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    def _ok(self, headers: dict) -> bool:
        auth = headers.get(b"authorization", b"")
        given = headers.get(b"x-api-key")
        if given is None and auth[:7].lower() == b"bearer ":
            given = auth[7:].strip()
        if given is None and auth[:6].lower() == b"basic ":
            try:
                given = base64.b64decode(auth[6:].strip()).split(b":", 1)[1]
            except (ValueError, IndexError):
                given = None
        return given is not None and hmac.compare_digest(given, self.key)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] == "/health" or self._ok(dict(scope["headers"])):
            return await self.app(scope, receive, send)
        body = json.dumps({"error": "this server needs its API key (Authorization: Bearer KEY, X-API-Key, "
                                    "or HTTP Basic with the key as password)", "field": "api_key"}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b'Basic realm="neti-fast"')]})
        await send({"type": "http.response.body", "body": body})
