"""The gateway's outermost ASGI layer: request ids, log context, request metrics, last-resort 500s."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from tsukimi.common.logs import request_id_var
from tsukimi.gateway import metrics
from tsukimi.gateway.errors import APIError

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-Id"
# A client's request id is used only when it is safe as a NATS subject token.
REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Paths whose requests are counted in tsukimi_gateway_requests_total.
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")


def new_request_id() -> str:
    return uuid.uuid4().hex


def request_id_from(scope: Scope) -> tuple[str, str]:
    """(id returned to the client, id of the request inside tsukimi).

    The client's X-Request-Id, when acceptable, is echoed back; inside, it gets a random suffix, because the
    internal id keys bus subjects and workers' cancellation memory: a client reusing its id for a retry must not
    meet the state of the earlier request. Log lines carry the internal id, which contains the client's.
    """
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            if REQUEST_ID_PATTERN.match(candidate):
                return candidate, f"{candidate}-{uuid.uuid4().hex[:12]}"
            break
    request_id = new_request_id()
    return request_id, request_id


class RequestContextMiddleware:
    """Gives every HTTP request an id (scope state `request_id`, the `X-Request-Id` response header, the
    log context), times it (`arrival`), counts generation requests, and turns an escaped exception into a
    500 OpenAI error envelope instead of a dropped connection."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client_request_id, request_id = request_id_from(scope)
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["arrival"] = time.monotonic()
        token = request_id_var.set(request_id)
        started: dict[str, int] = {}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                started["status"] = message["status"]
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = client_request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error serving %s %s", scope.get("method"), scope.get("path"))
            if "status" not in started:
                error = APIError(500, "internal server error", code="internal_error")
                await send_with_id(_json_start(500))
                await send_with_id(
                    {"type": "http.response.body", "body": json.dumps(error.envelope()).encode()}
                )
        finally:
            path = scope.get("path", "")
            if path in GENERATION_PATHS and scope.get("method") == "POST":
                status = state.get("outcome_status") or started.get("status", 500)
                metrics.REQUESTS.labels(endpoint=path, status=str(status)).inc()
            request_id_var.reset(token)


def _json_start(status: int) -> Message:
    return {
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json")],
    }
