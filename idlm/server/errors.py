"""The one error shape of every route: ``{"error": {"message", "type", "param", "code"}}``.

Client mistakes are 4xx with an OpenAI ``type`` and a string ``code``; only our own faults are 5xx.
Messages are capped so a huge bad input never comes back as a huge error."""

from __future__ import annotations

from fastapi.responses import JSONResponse

MAX_MESSAGE = 1000

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         405: "invalid_request_error", 413: "invalid_request_error", 500: "internal_server_error",
         503: "service_unavailable_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code = code or {400: "invalid_value", 401: "invalid_api_key", 404: "not_found",
                             413: "payload_too_large", 503: "unavailable"}.get(status, "internal_error")
        self.type = type or TYPES.get(status, "invalid_request_error" if status < 500 else "internal_server_error")
        self.headers = headers

    def body(self) -> dict:
        msg = self.message if len(self.message) <= MAX_MESSAGE else self.message[: MAX_MESSAGE - 3] + "..."
        msg = msg.encode("utf-8", "backslashreplace").decode()  # a lone surrogate echoed from the input: \ud800
        return {"error": {"message": msg, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param, code)
