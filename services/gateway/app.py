"""The gateway's FastAPI application: OpenAI-compatible routes, health, metrics, and error envelopes."""

from __future__ import annotations

import json
import logging
import time
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response
from tsukimi.common.settings import Settings
from tsukimi.gateway.completions import Completions
from tsukimi.gateway.errors import APIError, invalid_request
from tsukimi.gateway.middleware import REQUEST_ID_HEADER, RequestContextMiddleware
from tsukimi.gateway.protocol import ChatCompletionRequest, CompletionRequest
from tsukimi.gateway.stream import Bus
from tsukimi.text.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

# Largest request body accepted (a prompt at the context limit of any model is far smaller).
MAX_BODY_BYTES = 16 << 20

# Type tags pydantic puts in an error's location for union members and validators; not part of a param name.
_LOC_TAGS = {
    "str",
    "int",
    "float",
    "bool",
    "none",
    "list",
    "dict",
    "json-or-python",
    "function-after",
    "function-before",
}


def create_app(settings: Settings, bus: Bus, tokenizer: TextTokenizer | None = None) -> FastAPI:
    """The gateway app serving `settings.model_name()` over `bus` (see `stream.Bus`).

    `tokenizer` defaults to the one of `settings.model`.
    """
    tokenizer = tokenizer or TextTokenizer.load(settings.model)
    completions = Completions(settings, bus, tokenizer)
    model_name = completions.model_name
    special_ids = tokenizer.special_token_ids
    created = int(time.time())

    app = FastAPI(
        title="tsukimi gateway", description="OpenAI-compatible API of tsukimi", docs_url=None, redoc_url=None
    )
    app.state.completions = completions
    app.state.bus = bus
    app.add_middleware(RequestContextMiddleware)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        if exc.status >= 500:
            log.warning("%d %s: %s", exc.status, exc.code, exc.message)
        return JSONResponse(exc.envelope(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        error = validation_error(exc.errors())
        return JSONResponse(error.envelope(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        error = APIError(exc.status_code, str(exc.detail), code=code)
        return JSONResponse(error.envelope(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> Response:
        # NOTE: RequestContextMiddleware catches these first; this only answers for what escapes it.
        log.error("unhandled error", exc_info=exc)
        error = APIError(500, "internal server error", code="internal_error")
        headers = {REQUEST_ID_HEADER: getattr(request.state, "request_id", "-")}
        return JSONResponse(error.envelope(), status_code=500, headers=headers)

    # NOTE: bodies are parsed here rather than by FastAPI so that JSON is accepted whatever the Content-Type
    # (curl -d sends a form type) and every parse failure gets the OpenAI envelope.
    @app.post("/v1/completions", openapi_extra=_json_body(CompletionRequest))
    async def create_completion(request: Request) -> Response:
        return await completions.handle(request, await parse_body(request, CompletionRequest))

    @app.post("/v1/chat/completions", openapi_extra=_json_body(ChatCompletionRequest))
    async def create_chat_completion(request: Request) -> Response:
        return await completions.handle(request, await parse_body(request, ChatCompletionRequest))

    def model_card() -> dict:
        return {
            "id": model_name,
            "object": "model",
            "created": created,
            "owned_by": "tsukimi",
            "max_model_len": completions.max_model_len,
            # NOTE: tsukimi's own fields: a load generator draws prompt ids below vocab_size, none of these.
            "vocab_size": tokenizer.vocab_size,
            "special_token_ids": special_ids,
        }

    @app.get("/v1/models")
    async def list_models() -> Response:
        return JSONResponse({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> Response:
        completions.check_model(model_id)
        return JSONResponse(model_card())

    @app.get("/health")
    async def health() -> Response:
        is_ready, details = bus.is_ready()
        body = {
            "status": "ok" if is_ready else "unavailable",
            "service": "gateway",
            "model": model_name,
            "in_flight": completions.num_in_flight,
            **details,
        }
        return JSONResponse(body, status_code=200 if is_ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return app


Body = TypeVar("Body", bound=BaseModel)


async def parse_body(request: Request, model: type[Body]) -> Body:
    """The request's JSON body validated as `model`; raises a 400 (413 when too large) `APIError`."""
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise APIError(413, f"the request body exceeds {MAX_BODY_BYTES} bytes", code="body_too_large")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise invalid_request("the request body must be a JSON object", code="invalid_body")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise invalid_request(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise invalid_request("the request body must be a JSON object", code="invalid_body")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None


def _json_body(model: type[BaseModel]) -> dict:
    """OpenAPI description of a JSON body parsed by `parse_body`."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"title": model.__name__}}},
        }
    }


def validation_error(errors: list[dict]) -> APIError:
    """The 400 for a request body that failed validation (malformed JSON, missing or mistyped fields, ...)."""
    if not errors:
        return invalid_request("invalid request body")
    # NOTE: prefer the gateway's own explanations (value errors) over union members' type mismatches.
    error = min(errors, key=lambda e: (e.get("type") != "value_error", -len(e.get("loc", ()))))
    if error.get("type") == "json_invalid":
        detail = (error.get("ctx") or {}).get("error", error.get("msg", ""))
        return invalid_request(f"the request body is not valid JSON: {detail}", code="invalid_json")
    loc = [p for p in error.get("loc", ()) if p != "body"]
    if not loc:
        return invalid_request("the request body must be a JSON object", code="invalid_body")
    param = _param_name(loc)
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    return invalid_request(f"Invalid value for '{param}': {message}", param=param)


def _param_name(loc: list) -> str:
    """`messages[0].content` from pydantic's ("messages", 0, "content"), union member tags dropped."""
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif part in _LOC_TAGS or "[" in str(part):
            continue
        else:
            name += f".{part}" if name else str(part)
    return name
