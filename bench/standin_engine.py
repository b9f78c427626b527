"""A STAND-IN for a vLLM engine: a small, fast OpenAI-compatible HTTP server. It is not an engine.

It answers `/v1/chat/completions`, `/v1/completions` (streaming and not), `/v1/embeddings`, `/v1/models`,
`/health` and a vLLM-shaped `/metrics`, with canned text, checking the engine API key as vLLM does. It
exists so that the gateway can be tested and benchmarked against something much faster than itself, and so
tests can make an "engine" misbehave on purpose (`fail` modes). Run it alone:

    python bench/standin_engine.py --port 9001 --api-key KEY [--delay-ms 0] [--tokens 16]
        [--token-delay-ms 0] [--events-per-write 1] [--honour-max-tokens]

A stream sends one SSE event per token, as vLLM does, `--token-delay-ms` apart (the chunk pacing), and
`--events-per-write` events per socket write (an engine step that emits several tokens at once). With
`stream_options.include_usage` it ends with a usage-only chunk, as vLLM does; each event (the usage chunk
and `[DONE]` included) is a write of its own, with vLLM's event sizes (compact JSON, 32-hex-digit ids,
about 190 bytes). Events are built once per
stream length, so that the stand-in costs little per chunk and the gateway, not it, is what a benchmark
measures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import ssl
import time
from dataclasses import dataclass, field

from aiohttp import web

# Failure modes tests can set on a running stand-in:
#   "reset"        - drop the connection before any response byte (a crashed engine mid-accept)
#   "close_stream" - send stream headers, then drop the connection before the first chunk
#   "mid_stream"   - send some chunks of a stream, then drop the connection
#   "status_500"   - answer 500 with an error body (a live engine that fails; passed through, not retried)
#   "error_event"  - send some chunks of a stream, then an error event and [DONE], as vLLM does when its engine
#                    core dies mid-stream
FAIL_MODES = ("reset", "close_stream", "mid_stream", "status_500", "error_event")
# The request's max_tokens, read without parsing the body (the stand-in must stay cheap per request).
_MAX_TOKENS = re.compile(rb'"max_tokens"\s*:\s*(\d+)')
# A request id as vLLM makes them (32 hex digits), so events have vLLM's sizes.
_ID = "0123456789abcdef0123456789abcdef"
# vLLM's prompt_tokens for the canned prompt, in the final usage chunk.
PROMPT_TOKENS = 8


@dataclass
class Seen:
    """What the stand-in received, for tests to assert on."""

    requests: int = 0
    bodies: list[bytes] = field(default_factory=list)
    auth: list[str] = field(default_factory=list)
    keep_bodies: bool = True


class StandinEngine:
    def __init__(self, model: str = "standin", api_key: str = "", tokens: int = 16, delay_s: float = 0.0,
                 token_delay_s: float = 0.0, events_per_write: int = 1, honour_max_tokens: bool = False) -> None:
        self.model = model
        self.api_key = api_key
        self.tokens = tokens
        self.delay_s = delay_s
        self.token_delay_s = token_delay_s
        # What vLLM's /v1/models reports per model (the gateway's /v1/models passes it on).
        self.max_model_len = 1024
        self.events_per_write = max(1, events_per_write)
        # Off by default: tests count on `tokens` whatever the request asks.
        self.honour_max_tokens = honour_max_tokens
        self._events: dict[tuple[str, int], list[bytes]] = {}
        self.fail: str | None = None
        self.seen = Seen()
        self.running = 0
        self._runner: web.AppRunner | None = None
        self._tls = False
        self.port = 0
        self._chat_body = json.dumps({
            "id": "chatcmpl-standin", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": " ".join(["tok"] * tokens)},
                         "finish_reason": "length"}],
            "usage": {"prompt_tokens": 8, "completion_tokens": tokens, "total_tokens": 8 + tokens},
        }).encode()
        self._completion_body = json.dumps({
            "id": "cmpl-standin", "object": "text_completion", "created": 0, "model": model,
            "choices": [{"index": 0, "text": " ".join(["tok"] * tokens), "finish_reason": "length"}],
            "usage": {"prompt_tokens": 8, "completion_tokens": tokens, "total_tokens": 8 + tokens},
        }).encode()
        self._response_body = json.dumps({
            "id": "resp_standin", "object": "response", "created_at": 0, "model": model, "status": "completed",
            "output": [{"type": "message", "role": "assistant", "content": [
                {"type": "output_text", "text": " ".join(["tok"] * tokens), "annotations": []}]}],
            "usage": {"input_tokens": 8, "output_tokens": tokens, "total_tokens": 8 + tokens},
        }).encode()
        self._message_body = json.dumps({
            "id": "msg_standin", "type": "message", "role": "assistant", "model": model, "stop_reason": "max_tokens",
            "content": [{"type": "text", "text": " ".join(["tok"] * tokens)}],
            "usage": {"input_tokens": 8, "output_tokens": tokens},
        }).encode()
        self._tokenize_body = json.dumps({"count": 3, "tokens": [1, 2, 3], "max_model_len": 1024}).encode()
        self._embedding_body = json.dumps({
            "object": "list", "model": model,
            "data": [{"object": "embedding", "index": 0, "embedding": [0.0] * 8}],
            "usage": {"prompt_tokens": 8, "total_tokens": 8},
        }).encode()

    @property
    def base_url(self) -> str:
        return f"{'https' if self._tls else 'http'}://127.0.0.1:{self.port}"

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_post("/v1/responses", self._responses)
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_post("/tokenize", self._tokenize)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/openapi.json", self._openapi)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0, ssl_context: ssl.SSLContext | None = None) -> int:
        """Serves HTTPS with `ssl_context` (as vLLM does with --ssl-certfile/--ssl-keyfile), else HTTP."""
        self._runner = web.AppRunner(self.app(), access_log=None, handler_cancellation=True)
        await self._runner.setup()
        self._tls = ssl_context is not None
        site = web.TCPSite(self._runner, host, port, backlog=4096, reuse_address=True, ssl_context=ssl_context)
        await site.start()
        self.port = int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _check(self, request: web.Request, body: bytes) -> web.Response | None:
        self.seen.requests += 1
        auth = request.headers.get("Authorization", "")
        if self.seen.keep_bodies:
            self.seen.bodies.append(body)
            self.seen.auth.append(auth)
        if self.api_key and auth != f"Bearer {self.api_key}":
            return web.json_response({"error": "Unauthorized"}, status=401)
        if self.fail == "reset":
            assert request.transport is not None
            request.transport.abort()
            raise ConnectionResetError("stand-in told to reset")
        if self.fail == "status_500":
            return web.json_response({"object": "error", "message": "stand-in told to fail", "type": "Internal",
                                      "code": 500}, status=500)
        return None

    async def _answer(self, request: web.Request, canned: bytes, kind: str) -> web.StreamResponse:
        body = await request.read()
        refused = self._check(request, body)
        if refused is not None:
            return refused
        self.running += 1
        try:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            if b'"stream":true' in body.replace(b" ", b"") and kind != "embedding":
                return await self._stream(request, kind, body)
            return web.Response(body=canned, content_type="application/json")
        finally:
            self.running -= 1

    def events(self, kind: str, tokens: int) -> list[bytes]:
        """The SSE events of a stream of `tokens` tokens (without the usage chunk and [DONE])."""
        cached = self._events.get((kind, tokens))
        if cached is not None:
            return cached
        out = []
        # As vLLM 0.32 writes them (pydantic's compact JSON, fields it sets): ids of 32 hex digits, a real
        # `created`, logprobs null, the last token's finish_reason; about 190 bytes an event.
        created = 1733550000
        for i in range(tokens):
            finish = "length" if i == tokens - 1 else None
            if kind == "chat":
                delta = {"role": "assistant", "content": ""} if i == 0 else {"content": f" tok{i}"}
                chunk = {"id": f"chatcmpl-{_ID}", "object": "chat.completion.chunk", "created": created,
                         "model": self.model, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                           "finish_reason": finish}]}
            else:
                chunk = {"id": f"cmpl-{_ID}", "object": "text_completion", "created": created, "model": self.model,
                         "choices": [{"index": 0, "text": f" tok{i}", "logprobs": None, "finish_reason": finish}]}
            out.append(b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n")
        self._events[(kind, tokens)] = out
        return out

    def usage_event(self, kind: str, completion_tokens: int) -> bytes:
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        return b"data: " + json.dumps({
            "id": f"chatcmpl-{_ID}" if kind == "chat" else f"cmpl-{_ID}", "object": obj, "created": 1733550000,
            "model": self.model, "choices": [],
            "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": completion_tokens,
                      "total_tokens": PROMPT_TOKENS + completion_tokens}}, separators=(",", ":")).encode() + b"\n\n"

    async def _stream(self, request: web.Request, kind: str, body: bytes) -> web.StreamResponse:
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await out.prepare(request)
        if self.fail == "close_stream":
            assert request.transport is not None
            request.transport.abort()
            return out
        if kind == "response":
            return await self._stream_response(out)
        if kind == "message":
            return await self._stream_message(out)
        tokens = self.tokens
        if self.honour_max_tokens:
            m = _MAX_TOKENS.search(body)
            if m is not None:
                tokens = max(1, int(m.group(1)))
        events = self.events(kind, tokens)
        step = self.events_per_write
        for i in range(0, len(events), step):
            await out.write(b"".join(events[i:i + step]) if step > 1 else events[i])
            if self.fail == "mid_stream" and i >= min(2, tokens - 1):
                assert request.transport is not None
                request.transport.abort()
                return out
            if self.fail == "error_event" and i >= min(2, tokens - 1):
                error = {"error": {"message": "EngineCore encountered an issue.", "type": "InternalServerError",
                                   "param": None, "code": 500}}
                await out.write(b"data: " + json.dumps(error).encode() + b"\n\ndata: [DONE]\n\n")
                await out.write_eof()
                return out
            if self.token_delay_s:
                await asyncio.sleep(self.token_delay_s)
        if b'"include_usage":true' in body.replace(b" ", b""):
            await out.write(self.usage_event(kind, tokens))  # its own write, as vLLM's
        await out.write(b"data: [DONE]\n\n")
        await out.write_eof()
        return out

    async def _stream_response(self, out: web.StreamResponse) -> web.StreamResponse:
        """The Responses API's typed events, as vLLM sends them: created, deltas, completed with usage."""
        def event(kind: str, seq: int, **data: object) -> bytes:
            return f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': seq, **data})}\n\n".encode()

        await out.write(event("response.created", 0, response={"id": "resp_standin", "status": "in_progress"}))
        for i in range(self.tokens):
            await out.write(event("response.output_text.delta", 1 + i, delta=f" tok{i}"))
            if self.token_delay_s:
                await asyncio.sleep(self.token_delay_s)
        await out.write(event("response.completed", 1 + self.tokens, response={
            "id": "resp_standin", "status": "completed",
            "usage": {"input_tokens": 8, "output_tokens": self.tokens, "total_tokens": 8 + self.tokens}}))
        await out.write_eof()
        return out

    async def _stream_message(self, out: web.StreamResponse) -> web.StreamResponse:
        """Anthropic's Messages events, as vLLM sends them: message_start with the input count, text deltas,
        message_delta with the output count, message_stop."""
        def event(kind: str, **data: object) -> bytes:
            return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()

        await out.write(event("message_start", message={"id": "msg_standin", "type": "message", "role": "assistant",
                                                         "content": [], "model": self.model,
                                                         "usage": {"input_tokens": 8, "output_tokens": 0}}))
        await out.write(event("content_block_start", index=0, content_block={"type": "text", "text": ""}))
        for i in range(self.tokens):
            await out.write(event("content_block_delta", index=0, delta={"type": "text_delta", "text": f" tok{i}"}))
            if self.token_delay_s:
                await asyncio.sleep(self.token_delay_s)
        await out.write(event("content_block_stop", index=0))
        await out.write(event("message_delta", delta={"stop_reason": "max_tokens"},
                              usage={"input_tokens": 8, "output_tokens": self.tokens}))
        await out.write(event("message_stop"))
        await out.write_eof()
        return out

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, self._message_body, "message")

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, self._response_body, "response")

    async def _tokenize(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, self._tokenize_body, "embedding")  # never streamed

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, self._chat_body, "chat")

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, self._completion_body, "completion")

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, self._embedding_body, "embedding")

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model",
                                                               "created": int(time.time()), "owned_by": "standin",
                                                               "max_model_len": self.max_model_len}]})

    async def _openapi(self, request: web.Request) -> web.Response:
        """The paths it serves, as vLLM's FastAPI schema lists them."""
        paths: dict[str, dict[str, object]] = {}
        for route in request.app.router.routes():
            info = route.resource.get_info() if route.resource is not None else {}
            if "path" in info:
                paths.setdefault(str(info["path"]), {})[route.method.lower()] = {}
        return web.json_response({"openapi": "3.1.0", "paths": paths})

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="")

    async def _metrics(self, request: web.Request) -> web.Response:
        text = (f'vllm:num_requests_running{{model_name="{self.model}"}} {float(self.running)}\n'
                f'vllm:num_requests_waiting{{model_name="{self.model}"}} 0.0\n'
                f'vllm:kv_cache_usage_perc{{model_name="{self.model}"}} 0.0\n')
        return web.Response(text=text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--model", default="standin")
    parser.add_argument("--api-key", default="")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--delay-ms", type=float, default=0.0, help="wait before answering")
    parser.add_argument("--token-delay-ms", type=float, default=0.0, help="wait between streamed chunks")
    parser.add_argument("--events-per-write", type=int, default=1, help="SSE events sent in one write")
    parser.add_argument("--honour-max-tokens", action="store_true",
                        help="stream the request's max_tokens tokens instead of --tokens")
    parser.add_argument("--ssl-certfile", default="", help="serve HTTPS with this certificate (and --ssl-keyfile)")
    parser.add_argument("--ssl-keyfile", default="")
    args = parser.parse_args()
    context = None
    if args.ssl_certfile:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.ssl_certfile, args.ssl_keyfile)
    async def serve() -> None:
        engine = StandinEngine(args.model, args.api_key, args.tokens, args.delay_ms / 1000,
                               args.token_delay_ms / 1000, args.events_per_write, args.honour_max_tokens)
        engine.seen.keep_bodies = False
        port = await engine.start(args.host, args.port, context)
        print(f"stand-in engine on {'https' if context else 'http'}://{args.host}:{port}", flush=True)
        await asyncio.Event().wait()

    try:
        import uvloop
        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
