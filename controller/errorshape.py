"""OpenAI's error shape for the errors the gateway passes on from an engine.

Responsible for: rewriting a non-2xx JSON body that an engine answered (vLLM's `{"error": {"message",
"type": "BadRequestError", "param", "code": 400}}`, or its older flat `{"object": "error", "message", ...}`)
into OpenAI's `{"error": {"message", "type", "param", "code"}}`, with OpenAI's type name for the status
(`invalid_request_error`, `authentication_error`, `permission_error`, `not_found_error`, ...) and a string
or null `code`; the status stays the engine's.
Not responsible for: streamed answers (a stream's first byte has gone when its error could arrive; the
proxy ends those with its own event), 2xx answers, non-JSON bodies, or the gateway's own errors (already
in OpenAI's shape, gateway.error_response).
"""

from __future__ import annotations

import json
from typing import Any

# OpenAI's error type for each status an engine may answer; statuses not listed take the type of their class.
TYPE_BY_STATUS: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    501: "not_implemented_error",
    503: "service_unavailable",
}
# An engine's message is cut to this many characters: a traceback in it would only bloat the client's error.
MAX_MESSAGE_CHARS = 4000
# OpenAI's own types (and the gateway's), passed on as they are when an engine already uses one.
OPENAI_TYPES = frozenset(TYPE_BY_STATUS.values()) | {"server_error", "insufficient_quota", "upstream_error"}


def openai_type(status: int) -> str:
    """OpenAI's error type for an HTTP status."""
    known = TYPE_BY_STATUS.get(status)
    if known is not None:
        return known
    return "server_error" if status >= 500 else "invalid_request_error"


def reshape(status: int, body: bytes) -> bytes | None:
    """OpenAI's shape of an engine's error body, or None where it needs none (a 2xx status, or a body that is
    no JSON object: that is passed on as it came)."""
    if 200 <= status < 300:
        return None
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict):
        return None
    inner: Any = doc.get("error")
    error: dict[str, Any] = inner if isinstance(inner, dict) else doc
    message = error.get("message")
    if message is None:
        # FastAPI's own errors: {"detail": "..."} or {"detail": [validation errors]}.
        detail = doc.get("detail", inner)
        message = detail if isinstance(detail, str) else json.dumps(detail) if detail is not None else ""
    type_ = error.get("type")
    code = error.get("code")
    param = error.get("param")
    shaped = {"error": {
        "message": str(message)[:MAX_MESSAGE_CHARS],
        "type": type_ if isinstance(type_, str) and type_ in OPENAI_TYPES else openai_type(status),
        "param": param if isinstance(param, str) else None,
        # OpenAI's code is a string naming the error, or null; vLLM's is the status again, as a number.
        "code": code if isinstance(code, str) and code else None,
    }}
    return json.dumps(shaped).encode()
