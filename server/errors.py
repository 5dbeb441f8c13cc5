"""OpenAI-style errors: every failure leaves the server as ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from http import HTTPStatus


class APIError(Exception):
    """An error that becomes an OpenAI error body with ``status``."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        type: str | None = None,
        param: str | None = None,
        code: str | int | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type or default_type(status)
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def default_type(status: int) -> str:
    return {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        405: "invalid_request_error",
        413: "invalid_request_error",
        429: "rate_limit_error",
        503: "service_unavailable_error",
    }.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(message: str, type: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def status_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def context_length_error(max_len: int, prompt_tokens: int, completion_tokens: int, param: str) -> APIError:
    total = prompt_tokens + completion_tokens
    return APIError(
        f"This model's maximum context length is {max_len} tokens. However, you requested {total} tokens "
        f"({prompt_tokens} in the {param}, {completion_tokens} in the completion). Please reduce the length of "
        f"the {param} or completion.",
        status=400,
        param=param,
        code="context_length_exceeded",
    )


def from_validation_errors(errors: list[dict]) -> APIError:
    """A 400 from pydantic's error list: names the first offending field."""
    if not errors:
        return APIError("invalid request body", param=None, code="invalid_request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return APIError(f"the request body is not valid JSON: {first.get('msg')}", code="invalid_json")
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    # drop pydantic's union-branch labels (e.g. 'str', 'list[...]') so param names the field path
    loc = [x for x in loc if not (x[:1].islower() and ("[" in x or x in ("str", "int", "float", "bool")))]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    if first.get("type") == "missing":
        msg = "field required"
    detail = f"{param}: {msg}" if param else msg
    if len(errors) > 1:
        detail += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return APIError(detail, status=400, param=param, code="invalid_value" if first.get("type") != "missing" else "missing_field")
