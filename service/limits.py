"""A size cap on JSON request bodies (inference, compose), enforced before any handler parses them.

Adapter uploads (PUT /v1/adapters/{name}) have their own, larger cap, enforced while they stream
(service/uploads.py). Every other body, whatever content type it claims, is read here up to
`max_request_bytes` and handed to the app in one piece; a `Content-Length` above the cap is refused before
a byte is read, and a chunked or lying body as soon as the running total passes it (413). Without this,
one client could send a prompt of hundreds of megabytes and hold the tokenizer (and the memory) for minutes.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import BadRequest, PayloadTooLarge, error_response

__all__ = ["BodyLimitMiddleware"]


class BodyLimitMiddleware:
    """Pure ASGI, like MetricsMiddleware: streamed responses and adapter uploads pass through untouched."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _is_adapter_upload(scope):
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            error = (PayloadTooLarge(self._message(int(declared))) if declared.isdigit()
                     else BadRequest(f"invalid Content-Length {declared!r}"))
            await error_response(error)(scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: nothing to answer
                return
            body += message.get("body", b"")
            if len(body) > self.limit:
                await error_response(PayloadTooLarge(self._message()))(scope, receive, send)
                return
            if not message.get("more_body", False):
                break

        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # after the body: disconnects, as the app would see them

        await self.app(scope, replay, send)

    def _message(self, size: int | None = None) -> str:
        what = f"a request body of {size} bytes" if size is not None else "the request body"
        return f"{what} exceeds the limit of {self.limit} bytes (max_request_bytes)"


def _is_adapter_upload(scope: Scope) -> bool:
    """PUT /v1/adapters/{name}, the one route that caps its own (multipart) body. Any other request, whatever
    content type it claims, is held to max_request_bytes."""
    return scope["method"] == "PUT" and scope["path"].startswith("/v1/adapters/")
