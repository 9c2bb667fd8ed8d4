"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` for every failure.

Clients of OpenAI's API branch on the status code and read ``error.message``; they never get a
traceback. Unexpected exceptions are logged here, in full, and answered with a plain 500.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mgpu.server.protocol import ErrorResponse

logger = logging.getLogger("mgpu.server")

#: OpenAI's ``error.type`` for each status code the server returns.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    499: "invalid_request_error",
    500: "server_error",
    503: "server_error",
}

_UNION_TAGS = {"str", "int", "float", "bool", "none"}


class APIError(Exception):
    """An error answered with an OpenAI-shaped body.

    Args:
        status: HTTP status code.
        message: what went wrong, for the person reading the client's output.
        param: the request field at fault.
        code: a machine-readable code (``model_not_found``, ``context_length_exceeded``...).
    """

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        """The JSON body."""
        fallback = "server_error" if self.status >= 500 else "invalid_request_error"
        kind = ERROR_TYPES.get(self.status, fallback)
        return ErrorResponse.of(self.message, kind, self.param, self.code)

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        """The HTTP response."""
        return _AsciiJSONResponse(self.body(), status_code=self.status, headers=headers)


class _AsciiJSONResponse(JSONResponse):
    """JSON with non-ASCII characters escaped: an error message may quote a client's text, and a
    lone surrogate in it would make the UTF-8 encoding of the default response fail (a 500)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """A 400 naming the field of the first of FastAPI's validation errors.

    Args:
        errors: ``RequestValidationError.errors()``; each ``loc`` starts with ``"body"``.
    """
    if not errors:
        return APIError(400, "the request is invalid")
    first = errors[0]
    if first["type"] == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}")
    param, tagged = _param(first["loc"])
    if param is None:
        if first["type"] == "missing":
            return APIError(400, "the request needs a JSON body")
        return APIError(400, f"the body must be a JSON object: {first['msg']}")
    if tagged:
        # A union field: pydantic reports one error per member; name the accepted types once.
        tags = []
        for error in errors:
            where, tag = _param(error["loc"])
            if where == param and tag:
                tags.append(tag)
        kinds = ", ".join(dict.fromkeys(tags))
        return APIError(400, f"'{param}' must be one of: {kinds}", param=param)
    if first["type"] == "missing":
        return APIError(400, f"'{param}' is required", param=param)
    return APIError(400, f"'{param}': {first['msg']}", param=param)


def _param(loc: tuple[Any, ...] | list[Any]) -> tuple[str | None, str | None]:
    """``("body", "messages", 0, "role")`` → ``("messages[0].role", None)``; a union member's
    tag (``"str"``, ``"list[int]"``) ends the path and is returned second."""
    parts = list(loc[1:]) if loc and loc[0] == "body" else list(loc)
    path = ""
    for part in parts:
        if isinstance(part, int):
            if not path:
                break  # a position in the raw JSON text, not a field
            path += f"[{part}]"
        elif "[" in part or part in _UNION_TAGS:
            return path or None, part
        else:
            path = f"{path}.{part}" if path else part
    return path or None, None


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error of ``app`` with an OpenAI-shaped body, never with a traceback.

    Args:
        app: the FastAPI application.
    """

    async def api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        return exc.response()

    async def invalid(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return validation_error(list(exc.errors())).response()

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return APIError(exc.status_code, str(exc.detail)).response(exc.headers)

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
        return APIError(500, "internal server error; the server log has the details").response()

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
