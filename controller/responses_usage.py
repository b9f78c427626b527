"""Token counts of the Responses API (`/v1/responses`) for the usage ledger.

Responsible for: `ResponsesMeter`, the `Meter` of a Responses answer. A JSON answer carries
`usage.input_tokens` / `usage.output_tokens`; a streamed one is a series of typed SSE events
(`event: response.output_text.delta`, ...) whose final `response.completed` (or `response.incomplete` /
`response.failed`) event carries the same `usage` inside its `response`. Until that event arrives, each
`response.output_text.delta` counts one completion token, and the request is `estimated`, as for chat.
Not responsible for: the chat and completions shapes (usage.Meter), or summing and storing counts (the ledger).
"""

from __future__ import annotations

import msgspec

from slinfer.controller.usage import TypedEventMeter

# The events that end a Responses stream and carry the whole response, usage included.
FINAL_EVENTS = frozenset({b"response.completed", b"response.incomplete", b"response.failed"})
# The event of one piece of generated text: the estimate's unit when no final event arrives.
DELTA_EVENT = b"response.output_text.delta"


class _Tokens(msgspec.Struct):
    input_tokens: int | None = None
    output_tokens: int | None = None


class _Response(msgspec.Struct):
    usage: _Tokens | None = None


class _Document(msgspec.Struct):
    """A Responses JSON answer (`usage` at the top) or a final event's data (`usage` inside `response`)."""

    usage: _Tokens | None = None
    response: _Response | None = None


_decode = msgspec.json.Decoder(_Document).decode


def usage_of(data: bytes) -> tuple[int, int] | None:
    """(input tokens, output tokens) of a Responses answer or final event's data; None without them."""
    try:
        doc = _decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    usage = doc.usage if doc.usage is not None else (doc.response.usage if doc.response is not None else None)
    if usage is None or (usage.input_tokens is None and usage.output_tokens is None):
        return None
    return usage.input_tokens or 0, usage.output_tokens or 0


class ResponsesMeter(TypedEventMeter):
    """A Meter that reads the Responses API's usage shape and typed stream events."""

    __slots__ = ()

    def feed_body(self, body: bytes) -> None:
        counts = usage_of(body)
        if counts is not None:
            self.prompt_tokens, self.completion_tokens = counts
            self.reported = True

    def on_event(self, kind: bytes, payload: bytes) -> None:
        if kind in FINAL_EVENTS:
            counts = usage_of(payload)
            if counts is not None:
                self.prompt_tokens, self.completion_tokens = counts
                self.reported = True
                self.estimated = False
        elif kind == DELTA_EVENT and not self.reported:
            self.completion_tokens += 1
            self.estimated = True
