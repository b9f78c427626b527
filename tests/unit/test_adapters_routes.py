"""The routes clients reach for beyond OpenAI's: Anthropic's /v1/messages (plain and streamed, through the
`anthropic` client, its usage in the ledger) and the pooling routes, each only where the engine serves it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import anthropic
import pytest
from aiohttp import web

from slinfer.controller.messages import MessagesMeter
from slinfer.controller.usage import Meter

USAGE_START = {"input_tokens": 9, "output_tokens": 0}


def _event(kind: str, **data: object) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()


def _stream(words: list[str], final: bool = True) -> bytes:
    """What vLLM 0.32's /v1/messages streams (serving.py: message_start, content blocks, message_delta)."""
    out = _event("message_start", message={"id": "msg_1", "type": "message", "role": "assistant", "content": [],
                                            "model": "m", "stop_reason": None, "usage": USAGE_START})
    out += _event("content_block_start", index=0, content_block={"type": "text", "text": ""})
    for word in words:
        # Text that says "usage" and "message_delta" must not be taken for the count.
        out += _event("content_block_delta", index=0, delta={"type": "text_delta", "text": word})
    out += _event("content_block_stop", index=0)
    if final:
        out += _event("message_delta", delta={"stop_reason": "end_turn"},
                      usage={"input_tokens": 9, "output_tokens": len(words)})
        out += _event("message_stop")
    return out


def test_meter_reads_a_json_answer_with_cache_counts() -> None:
    meter = MessagesMeter()
    meter.feed_body(json.dumps({"type": "message", "usage": {"input_tokens": 4, "cache_read_input_tokens": 6,
                                                             "output_tokens": 3}}).encode())
    assert (meter.prompt_tokens, meter.completion_tokens, meter.reported) == (10, 3, True)
    chat = MessagesMeter()
    chat.feed_body(b'{"usage": {"prompt_tokens": 3, "completion_tokens": 4}}')  # not this API's shape
    assert not chat.reported and chat.prompt_tokens == 0


def test_meter_reads_a_stream_split_anywhere() -> None:
    stream = _stream([' "usage" message_delta', " b", " c"])
    for cut in range(1, len(stream), 11):
        meter = MessagesMeter()
        meter.feed_chunk(stream[:cut])
        meter.feed_chunk(stream[cut:])
        assert (meter.prompt_tokens, meter.completion_tokens, meter.reported, meter.estimated) == \
            (9, 3, True, False), cut


def test_a_stream_cut_before_its_delta_is_estimated() -> None:
    meter = MessagesMeter()
    meter.feed_chunk(_stream([" a", " b"], final=False))
    assert (meter.prompt_tokens, meter.completion_tokens, meter.reported, meter.estimated) == (9, 2, False, True)


@dataclass
class MessagesEngine:
    """A stand-in vLLM that serves /v1/messages and the pooling routes it is told to (others: a bare 404)."""

    pooling: tuple[str, ...] = ()
    auth: list[str] = field(default_factory=list)
    base_url: str = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/messages", self._messages)
        for path in self.pooling:
            app.router.add_post(path, self._pool)
        app.router.add_get("/openapi.json", self._openapi)
        return app

    async def _openapi(self, request: web.Request) -> web.Response:
        return web.json_response({"paths": {p: {"post": {}} for p in ("/v1/messages", *self.pooling)}})

    async def _pool(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"index": 0, "relevance_score": 0.5}],
                                  "usage": {"prompt_tokens": 7, "total_tokens": 7}})

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        self.auth.append(request.headers.get("Authorization", ""))
        body = await request.json()
        if body.get("max_tokens", 1) > 100:
            return web.json_response({"type": "error", "error": {"type": "BadRequestError",
                                                                 "message": "max_tokens is too large"}}, status=400)
        if not body.get("stream"):
            return web.json_response({"id": "msg_1", "type": "message", "role": "assistant", "model": body["model"],
                                      "content": [{"type": "text", "text": "Hello there"}], "stop_reason": "end_turn",
                                      "usage": {"input_tokens": 9, "output_tokens": 2}})
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        for event in _stream([" Hello", " there", " friend"]).split(b"\n\n")[:-1]:
            await out.write(event + b"\n\n")
        await out.write_eof()
        return out


@pytest.fixture
async def messages_engine() -> AsyncIterator[Callable[..., MessagesEngine]]:
    runners: list[web.AppRunner] = []

    async def make(**kwargs: object) -> MessagesEngine:
        engine = MessagesEngine(**kwargs)  # type: ignore[arg-type]
        runner = web.AppRunner(engine.app())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        engine.base_url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        return engine

    yield make  # type: ignore[misc]
    for runner in runners:
        await runner.cleanup()


class Sink:
    def __init__(self) -> None:
        self.rows: list[tuple[str, int, int, int, bool]] = []

    def record(self, key_id: str, key_name: str, account: str, model: str, status: int, meter: Meter) -> None:
        self.rows.append((model, status, meter.prompt_tokens, meter.completion_tokens, meter.reported))


async def test_anthropic_client_plain_and_streamed_with_usage_in_the_ledger(controller_factory, messages_engine,
                                                                           engine_pb) -> None:
    c = await controller_factory()
    sink = Sink()
    c.gateway._ledger = sink  # the controller's ledger, as main.py wires it
    engine = await messages_engine()
    await (await c.agent()).send([engine_pb("1", "m", engine.base_url, "engine-key")])
    # The key as Anthropic's client sends it (x-api-key), swapped for the engine's own.
    client = anthropic.AsyncAnthropic(base_url=c.url, api_key=c.client_key, max_retries=0)
    try:
        reply = await client.messages.create(model="m", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
        assert reply.content[0].text == "Hello there"  # type: ignore[union-attr]
        async with client.messages.stream(model="m", max_tokens=8,
                                          messages=[{"role": "user", "content": "hi"}]) as stream:
            text = "".join([t async for t in stream.text_stream])
            final = await stream.get_final_message()
        assert text == " Hello there friend" and final.usage.output_tokens == 3
        with pytest.raises(anthropic.BadRequestError) as caught:
            await client.messages.create(model="m", max_tokens=500, messages=[{"role": "user", "content": "x"}])
        # The engine's error, in OpenAI's shape like every error passed on.
        assert caught.value.body == {"error": {"message": "max_tokens is too large", "type": "invalid_request_error",
                                               "param": None, "code": None}}
        with pytest.raises(anthropic.AuthenticationError):
            await anthropic.AsyncAnthropic(base_url=c.url, api_key="wrong", max_retries=0).messages.create(
                model="m", max_tokens=8, messages=[{"role": "user", "content": "x"}])
    finally:
        await client.close()
    assert engine.auth == ["Bearer engine-key"] * 3
    assert sink.rows == [("m", 200, 9, 2, True), ("m", 200, 9, 3, True), ("m", 400, 0, 0, False)]


async def test_pooling_routes_go_only_where_the_engine_serves_them(controller_factory, messages_engine, http,
                                                                   engine_pb) -> None:
    c = await controller_factory()
    engine = await messages_engine(pooling=("/v1/rerank",))
    await (await c.agent()).send([engine_pb("1", "m", engine.base_url)])
    rerank = {"model": "m", "query": "q", "documents": ["a", "b"]}
    async with http.post(f"{c.url}/v1/rerank", json=rerank, headers=c.headers()) as resp:
        assert resp.status == 200 and (await resp.json())["data"][0]["relevance_score"] == 0.5
    async with http.post(f"{c.url}/v1/score", json={"model": "m", "text_1": "a", "text_2": "b"},
                         headers=c.headers()) as resp:
        assert resp.status == 404
        error = (await resp.json())["error"]
    assert error["code"] == "not_found"
    assert error["message"] == ("The engine of model 'm' does not serve POST /v1/score; it serves: "
                                "POST /v1/messages, POST /v1/rerank")


@pytest.fixture
async def speech_engine() -> AsyncIterator[tuple[str, list[tuple[str, str, int]]]]:
    """A stand-in engine with /v1/audio/transcriptions that reads the form as vLLM does: (model, type, bytes)."""
    seen: list[tuple[str, str, int]] = []

    async def transcribe(request: web.Request) -> web.Response:
        form = await request.post()
        audio = form["file"]
        assert isinstance(audio, web.FileField)
        seen.append((str(form["model"]), request.headers["Content-Type"].split(";")[0], len(audio.file.read())))
        return web.json_response({"text": f"heard by {form['model']}"})

    app = web.Application(client_max_size=8 << 20)
    app.router.add_post("/v1/audio/transcriptions", transcribe)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}", seen  # type: ignore[union-attr]
    await runner.cleanup()


async def test_transcriptions_pass_the_form_on_to_a_speech_engine(controller_factory, speech_engine, standins, http,
                                                                  engine_pb) -> None:
    import openai

    from slinfer.config import ModelConfig
    c = await controller_factory(models=[ModelConfig(name="whisper", source="/w"), ModelConfig(name="m", source="/x")])
    url, seen = speech_engine
    text_engine = await standins(model="m")
    await (await c.agent()).send([engine_pb("1", "whisper", url), engine_pb("2", "m", text_engine.base_url)])
    client = openai.AsyncOpenAI(base_url=f"{c.url}/v1", api_key=c.client_key, max_retries=0)
    audio = bytes(range(256)) * 4096  # 1 MiB, every byte value (a boundary-like run must not confuse the scan)
    try:
        reply = await client.audio.transcriptions.create(model="whisper", file=("a.wav", audio, "audio/wav"))
        assert reply.text == "heard by whisper"
        assert seen == [("whisper", "multipart/form-data", len(audio))]
        # A model whose engine serves no speech: the OpenAI-shaped 404 naming what it serves.
        with pytest.raises(openai.NotFoundError) as caught:
            await client.audio.transcriptions.create(model="m", file=("a.wav", audio, "audio/wav"))
        assert "does not serve POST /v1/audio/transcriptions" in str(caught.value.body)
        with pytest.raises(openai.NotFoundError) as unknown:
            await client.audio.transcriptions.create(model="nope", file=("a.wav", b"x", "audio/wav"))
        assert unknown.value.code == "model_not_found"
    finally:
        await client.close()
    # A JSON body on the form route is refused with the reason.
    async with http.post(f"{c.url}/v1/audio/transcriptions", json={"model": "whisper"}, headers=c.headers()) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error["code"] == "invalid_form" and "multipart/form-data" in error["message"]
    assert len(seen) == 1


def test_form_model_finds_the_field_and_names_what_is_wrong() -> None:
    from slinfer.controller.forms import FormError, form_model
    ct = "multipart/form-data; boundary=XyZ"
    body = (b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="model.wav"\r\n\r\n'
            b'name="model"\r\n--XyZ\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper\r\n--XyZ--\r\n')
    assert form_model(ct, body) == "whisper"
    for content_type, bad, why in ((ct, body.replace(b'name="model"\r\n\r\n', b'name="lang"\r\n\r\n'), "no model"),
                                   ("multipart/form-data", body, "no boundary"),
                                   ("application/json", b"{}", "takes multipart/form-data")):
        with pytest.raises(FormError, match=why):
            form_model(content_type, bad)
