"""Errors the gateway answers with, in the OpenAI error envelope `{"error": {message, type, param, code}}`."""

from __future__ import annotations

import math

from tsukimi.common.messages import ErrorInfo

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"
SERVICE_UNAVAILABLE = "service_unavailable"


class APIError(Exception):
    """An error response: HTTP status plus the envelope's fields (and extra headers, e.g. Retry-After)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or (INVALID_REQUEST if 400 <= status < 500 else SERVER_ERROR)
        self.param = param
        self.code = code
        self.headers = headers or {}

    @classmethod
    def from_info(cls, info: ErrorInfo) -> APIError:
        """The error a worker or the conductor reported."""
        status = info.http_status if 400 <= info.http_status <= 599 else 500
        headers = {"Retry-After": str(max(1, math.ceil(info.retry_after_s)))} if info.retry_after_s > 0 else None
        return cls(status, info.message, type=info.type, code=info.code, headers=headers)

    def envelope(self) -> dict:
        """The OpenAI error body."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """400: the client sent something the gateway cannot serve."""
    return APIError(400, message, param=param, code=code)


def no_conductor(detail: str) -> ErrorInfo:
    """No conductor answered the submit request."""
    return ErrorInfo(
        message=f"no conductor is available to schedule the request ({detail})",
        type=SERVICE_UNAVAILABLE,
        code="no_conductor",
        http_status=503,
    )


def stream_timeout(timeout_s: float) -> ErrorInfo:
    """The workers went silent on a request's token stream."""
    return ErrorInfo(
        message=f"no token received for {timeout_s:g}s; the request was cancelled",
        type="timeout",
        code="stream_timeout",
        http_status=504,
    )


def worker_lost(instance_id: str) -> ErrorInfo:
    """A worker holding the request stopped (left or went silent) before finishing it."""
    return ErrorInfo(
        message=f"worker {instance_id} stopped while serving the request; retry it",
        type=SERVICE_UNAVAILABLE,
        code="worker_lost",
        http_status=503,
    )


def bus_unavailable(detail: str) -> ErrorInfo:
    """The message bus refused an operation (disconnected, closed)."""
    return ErrorInfo(
        message=f"message bus unavailable ({detail})",
        type=SERVICE_UNAVAILABLE,
        code="bus_unavailable",
        http_status=503,
    )
