"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with the right HTTP status.

Handlers raise `APIError` (or one of the helpers); the app's exception handlers render it. Nothing
else in the server builds error bodies.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse
from pydantic import ValidationError

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type_: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or _TYPES.get(status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status in (429, 503) else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


# pydantic names the union member it tried in `loc` ("str", "list[tagged-union[TextPart,ImagePart]]",
# "function-after[...]") and, in a tagged union, the tag ("image_url" before ImagePart's own
# "image_url" field): neither is part of the request's shape, so `param` leaves them out
_BRANCH_LABELS = {"str", "int", "float", "bool", "list", "dict", "none"}


def from_validation(e: ValidationError) -> APIError:
    """The most specific problem (the deepest location: of a union, the member the input came
    closest to, such as a content part of an unknown type rather than "content: not a string")."""
    errors = e.errors()
    err = max(errors, key=lambda x: len(x["loc"]))  # the first of the deepest
    parts: list[str] = []
    for x in err["loc"]:
        if not _branch(x) and (not parts or parts[-1] != str(x)):  # a tag equals its member's field
            parts.append(str(x))
    loc = ".".join(parts)
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return APIError(400, f"{loc or 'body'}: {err['msg']}{more}", loc or None, "invalid_value")


def _branch(part) -> bool:
    return isinstance(part, str) and ("[" in part or part.startswith("function-") or part in _BRANCH_LABELS)
