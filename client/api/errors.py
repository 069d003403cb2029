"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` with the matching status.

SDKs map the status to an exception class (400 BadRequestError, 401 AuthenticationError, 404
NotFoundError, ...) and show ``message``; ``param`` names the offending field, as OpenAI's own
API does, so a client can point at it.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """An error a request gets back as OpenAI-shaped JSON (or as an error event mid-stream)."""

    def __init__(
        self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
        code: str | None = None, headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def overloaded(message: str) -> ApiError:
    # 503 with Retry-After: SDKs retry it with backoff, as they do OpenAI's own "overloaded" answers.
    return ApiError(503, message, type_="server_error", code="server_overloaded", headers={"Retry-After": "1"})


_TYPE_NAMES = {"str", "int", "float", "bool", "none", "dict", "list"}


def _param_path(location: tuple[Any, ...]) -> tuple[str | None, str | None]:
    """OpenAI-style parameter path (``messages[0].role``) and, inside a union, the member's tag."""
    path = ""
    for part in location:
        if part == "body":
            continue
        if isinstance(part, int):
            path += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier() and part.islower() and part not in _TYPE_NAMES:
            path += f".{part}" if path else part
        else:  # a union member's tag, like "str" or "list[int]": the path ends at the union
            return path or None, str(part)
    return path or None, None


def _validation_error(error: RequestValidationError) -> ApiError:
    """Pydantic's first complaint, worded like OpenAI's ("Invalid type for 'max_tokens': ...")."""
    problems = error.errors()
    if not problems:
        return bad_request("invalid request body")
    first = problems[0]
    param, member = _param_path(tuple(first.get("loc", ())))
    kind = str(first.get("type", ""))
    message = str(first.get("msg", "invalid value")).rstrip(".")
    if kind == "json_invalid":
        return bad_request("the request body is not valid JSON", code="invalid_json")
    if kind == "missing":
        return bad_request(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    where = f" for '{param}'" if param else ""
    if member is not None:  # a union: say which shapes would do
        members = []
        for problem in problems:
            if _param_path(tuple(problem.get("loc", ())))[0] == param:
                tag = _param_path(tuple(problem.get("loc", ())))[1]
                if tag and tag not in members:
                    members.append(tag)
        return bad_request(f"Invalid type{where}: expected one of {', '.join(members)}.", param=param,
                           code="invalid_type")
    if kind.endswith("_type"):
        return bad_request(f"Invalid type{where}: {message}.", param=param, code="invalid_type")
    return bad_request(f"Invalid value{where}: {message}.", param=param, code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    """Every error the app can produce, OpenAI-shaped; FastAPI's 422 becomes OpenAI's 400."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return _validation_error(error).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(error.status_code)
        return ApiError(error.status_code, str(error.detail), code=code).response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unexpected error serving %s", request.url.path)
        return ApiError(500, f"internal error: {type(error).__name__}", type_="server_error").response()
