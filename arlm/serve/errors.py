"""Errors as OpenAI's API returns them: an HTTP status and ``{"error": {"message", "type",
"param", "code"}}``, so a client's own exception classes (``BadRequestError``,
``RateLimitError``, ...) work unchanged."""

from __future__ import annotations

import json
import re

from fastapi.responses import Response

# OpenAI's error type for each status the server sends
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    503: "service_unavailable",
}

# arlm.validate's messages start with the value's name: "top_p=2 is not allowed; ..."
_NAMED = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=")


class APIError(Exception):
    """An answer that is not a success: status, message, and OpenAI's ``param`` / ``code``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers

    @classmethod
    def bad_request(cls, error: ValueError | str, param: str | None = None) -> APIError:
        """A 400 for ``error``; its ``param`` read from the message when not given."""
        message = str(error)
        if param is None and (named := _NAMED.match(message)):
            param = named.group(1)
        return cls(400, message, param=param)

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> Response:
        # ASCII JSON: a message that quotes a client's lone surrogate still encodes
        body = json.dumps(self.body(), ensure_ascii=True).encode()
        return Response(
            body, status_code=self.status, headers=self.headers, media_type="application/json"
        )
