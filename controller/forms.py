"""The `model` field of a multipart/form-data request body (OpenAI's /v1/audio/transcriptions), for routing.

Responsible for: finding the form's `model` part in the raw body with byte scans (the audio part, megabytes,
is never copied or decoded), and saying why a body has none.
Not responsible for: the rest of the form (the engine reads it; the body goes on byte for byte), or JSON bodies
(gateway.py's one-pass decoder).
"""

from __future__ import annotations

import re

# The boundary parameter of a multipart Content-Type (RFC 2046: quoted or a token).
_BOUNDARY = re.compile(r'boundary=(?:"([^"]+)"|([^;\s]+))', re.IGNORECASE)
# A model name is short: a `model` part longer than this is no model name.
MAX_MODEL_BYTES = 256


class FormError(ValueError):
    """The body is not a multipart form with a `model` field; the message says what is wrong."""


def form_model(content_type: str, body: bytes) -> str:
    """The value of the form's `model` field; FormError where there is none."""
    if not content_type.isascii():
        raise FormError("the Content-Type is not ASCII")  # it goes on to the engine in the request's head
    if not content_type.lower().startswith("multipart/form-data"):
        raise FormError(f"this route takes multipart/form-data, not {content_type[:60] or 'no Content-Type'}")
    match = _BOUNDARY.search(content_type)
    if match is None:
        raise FormError("the multipart Content-Type has no boundary")
    delimiter = b"--" + (match.group(1) or match.group(2)).encode("latin-1")
    at = body.find(delimiter)
    while at >= 0:
        start = at + len(delimiter)
        if body[start:start + 2] == b"--":
            break  # the closing delimiter
        head_end = body.find(b"\r\n\r\n", start)
        if head_end < 0:
            break
        headers = body[start:head_end].lower()
        following = body.find(b"\r\n" + delimiter, head_end)
        if following < 0:
            break
        if re.search(rb'content-disposition:[^\r\n]*;\s*name="?model"?(?:;|\s|$)', headers):
            value = body[head_end + 4:following]
            if len(value) > MAX_MODEL_BYTES:
                raise FormError("the form's model field is too long")
            try:
                return value.decode().strip()
            except UnicodeDecodeError as exc:
                raise FormError("the form's model field is not UTF-8") from exc
        at = following + 2
    raise FormError("the form has no model field")
