"""Errors the server answers with: an HTTP status and a message naming the offending field.

Routes under ``/v1`` answer in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``; the
TEI route ``/embed`` answers in TEI's shape, ``{"error": message, "error_type": kind}`` (plus ``param``).
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

# status -> (OpenAI error type, TEI error_type)
_KINDS = {
    400: ("invalid_request_error", "validation"),
    401: ("authentication_error", "unauthorized"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "validation"),
    413: ("invalid_request_error", "validation"),
    422: ("invalid_request_error", "validation"),
    429: ("server_overloaded", "overloaded"),
    500: ("server_error", "backend"),
    503: ("service_unavailable", "unhealthy"),
}


class ApiError(Exception):
    """A request the server refuses: ``status``, a message, the request field at fault (``param``) and a
    short machine-readable ``code``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self, style: str) -> dict[str, Any]:
        openai_type, tei_type = _KINDS.get(self.status, ("server_error", "backend"))
        if style == "tei":
            return {"error": self.message, "error_type": tei_type, "param": self.param}
        return {"error": {"message": self.message, "type": openai_type, "param": self.param, "code": self.code}}

    def response(self, style: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body(style), status_code=self.status, headers=headers)


def error_style(path: str) -> str:
    """'tei' for TEI's route, 'openai' for everything else."""
    return "tei" if path.rstrip("/") == "/embed" else "openai"
