"""HTTP errors as OpenAI's error objects, and request bodies decoded with the offending field
named (`param`)."""

from __future__ import annotations

import re
from typing import Any

import msgspec

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_closed_request",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout",
}


class ApiError(Exception):
    """An HTTP error answered with an OpenAI-style error object."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> bytes:
        error = {
            "message": self.message,
            "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
            "param": self.param,
            "code": self.code,
        }
        return msgspec.json.encode({"error": error})


_PATH = re.compile(r"`\$\.([A-Za-z_]+)")  # the top-level field an error is in ("at `key` in `$.x`")
_MISSING = re.compile(r"^Object missing required field `([A-Za-z_]+)`$")
_UNKNOWN = re.compile(r"^Object contains unknown field `([^`]+)`(?: - at `\$\.([^`]+)`)?$")


def decode_body(body: bytes, type_: type[Any]) -> Any:
    """Decode a JSON body into `type_`; raises a 400 ApiError naming the bad field."""
    try:
        return msgspec.json.decode(body, type=type_)
    except msgspec.ValidationError as exc:
        unknown = _UNKNOWN.match(str(exc))
        if unknown is not None:
            field, at = unknown.groups()
            param = f"{at}.{field}" if at else field
            raise ApiError(
                400,
                f"unknown field {param!r}: radixkv does not support it (docs/api.md lists every "
                "field it honours)",
                param,
                "unsupported",
            ) from None
        match = _PATH.search(str(exc)) or _MISSING.match(str(exc))
        message = str(exc).replace("`$.", "`")
        param = match.group(1) if match else None
        raise ApiError(400, f"invalid request body: {message}", param, "invalid_value") from None
    except (msgspec.DecodeError, RecursionError) as exc:  # RecursionError: nested too deep
        raise ApiError(400, f"the body is not valid JSON: {exc}", None, "invalid_json") from None
