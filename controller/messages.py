"""Token counts of the Anthropic Messages API (`POST /v1/messages`, which vLLM serves) for the usage ledger.

Responsible for: `MessagesMeter`, the `Meter` of a Messages answer. A JSON answer carries `usage.input_tokens`
/ `usage.output_tokens` (and, with prompt caching, `cache_read_input_tokens` / `cache_creation_input_tokens`,
which Anthropic counts apart from `input_tokens`: the ledger's prompt tokens are their sum, vLLM's
`prompt_tokens`). A streamed answer is a series of typed SSE events: `message_start` carries the input count
in `message.usage`, `message_delta` the output count so far in `usage` (the last one the whole). Until a
`message_delta` arrives, each `content_block_delta` counts one completion token and the request is
`estimated`, as for chat.
Not responsible for: the chat and completions shapes (usage.Meter), or summing and storing counts (the ledger).
"""

from __future__ import annotations

import msgspec

from slinfer.controller.usage import TypedEventMeter

# The event whose usage holds the prompt's count, the one whose usage holds the output's, and a piece of text.
START_EVENT = b"message_start"
DELTA_EVENT = b"message_delta"
BLOCK_DELTA_EVENT = b"content_block_delta"


class _Usage(msgspec.Struct):
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_input_tokens: int | None = None
    cache_creation_input_tokens: int | None = None

    def prompt(self) -> int | None:
        parts = (self.input_tokens, self.cache_read_input_tokens, self.cache_creation_input_tokens)
        return None if self.input_tokens is None else sum(p or 0 for p in parts)


class _Message(msgspec.Struct):
    usage: _Usage | None = None


class _Document(msgspec.Struct):
    """A Messages JSON answer or a stream event's data: `usage` at the top, or inside `message` (message_start)."""

    usage: _Usage | None = None
    message: _Message | None = None


_decode = msgspec.json.Decoder(_Document).decode


def _usage(data: bytes) -> _Usage | None:
    try:
        doc = _decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if doc.usage is not None:
        return doc.usage
    return doc.message.usage if doc.message is not None else None


class MessagesMeter(TypedEventMeter):
    """A Meter that reads the Messages API's usage shape and typed stream events."""

    __slots__ = ()

    def feed_body(self, body: bytes) -> None:
        usage = _usage(body)
        if usage is not None and (prompt := usage.prompt()) is not None:
            self.prompt_tokens, self.completion_tokens = prompt, usage.output_tokens or 0
            self.reported = True

    def on_event(self, kind: bytes, payload: bytes) -> None:
        if kind == START_EVENT:
            usage = _usage(payload)
            if usage is not None and (prompt := usage.prompt()) is not None:
                self.prompt_tokens = prompt
        elif kind == DELTA_EVENT:
            usage = _usage(payload)
            if usage is not None and usage.output_tokens is not None:
                self.completion_tokens = usage.output_tokens
                if (prompt := usage.prompt()) is not None and prompt:
                    self.prompt_tokens = prompt
                self.reported = True
                self.estimated = False
        elif kind == BLOCK_DELTA_EVENT and not self.reported:
            self.completion_tokens += 1
            self.estimated = True
