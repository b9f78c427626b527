"""The gateway under bad input (hypothesis): malformed JSON, wrong types, huge bodies, bad headers and clients that
trickle bytes. Every answer is an OpenAI-shaped error with the right status, none hangs (each exchange has a
socket timeout), and the gateway keeps serving. The real Gateway and stand-in engine run in a thread of their
own, so that the client here can be plain blocking sockets that write exactly the bytes under test."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from conftest import StandinEngine
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from slinfer.config import GatewayConfig, ModelConfig
from slinfer.controller.balancer import Balancer
from slinfer.controller.gateway import Gateway
from slinfer.controller.keys import KeyStore
from slinfer.controller.proxy import Proxy
from slinfer.controller.queue import WaitQueue
from slinfer.controller.registry import Registry
from slinfer.v1 import controller_pb2, engine_pb2

KEY = "fuzz-client-key"
MAX_BODY = 64 * 1024
CLIENT_TIMEOUT_S = 1.0
# No exchange may take longer than this: the gateway's own bounds are all far below it.
SOCKET_TIMEOUT_S = 15.0
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


@dataclass
class Served:
    port: int
    engine: StandinEngine


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    loop = asyncio.new_event_loop()
    ready: dict[str, object] = {}
    started = threading.Event()
    stop = asyncio.Event()

    async def main() -> None:
        engine = StandinEngine(model="m", tokens=4)
        engine.seen.keep_bodies = False
        await engine.start()
        registry = Registry(agent_timeout_s=3600)
        registry.report(controller_pb2.AgentReport(node="n1", address="127.0.0.1", agent_id="a", engines=[
            engine_pb2.Engine(job_id="1", model="m", state=engine_pb2.READY, base_url=engine.base_url, pool=True)]))
        config = GatewayConfig(api_keys=[KEY], max_body_bytes=MAX_BODY, client_timeout_s=CLIENT_TIMEOUT_S,
                               queue_timeout_s=1.0)
        keys = KeyStore(tmp_path_factory.mktemp("keys") / "keys.json", config.api_keys)
        gateway = Gateway(config, [ModelConfig(name="m", source="/x")], registry, keys, Proxy(), Balancer(),
                          WaitQueue(config.queue_size))
        ready["port"] = await gateway.start("127.0.0.1", 0)
        ready["engine"] = engine
        started.set()
        await stop.wait()
        await gateway.stop()
        await engine.stop()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(30)
    yield Served(int(ready["port"]), ready["engine"])  # type: ignore[arg-type]
    loop.call_soon_threadsafe(stop.set)
    thread.join(30)


def exchange(port: int, raw: bytes, pause_s: float = 0.0, piece: int = 0) -> Answer | None:
    """Sends `raw` (in pieces of `piece` bytes, `pause_s` apart, when asked) and reads the answer to the end.
    None when the gateway closed the connection without an answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_S) as sock:
        try:
            if piece:
                for i in range(0, len(raw), piece):
                    sock.sendall(raw[i:i + piece])
                    time.sleep(pause_s)
            else:
                sock.sendall(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the gateway gave up on us; read what it said
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
    if not data:
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if headers.get("transfer-encoding") == "chunked":
        out, rest = b"", body
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size, 16)
            if n == 0:
                break
            out, rest = out + rest[:n], rest[n + 2:]
        body = out
    return Answer(int(lines[0].split()[1]), headers, body)


def request(port: int, body: bytes, path: str = "/v1/chat/completions", headers: dict[str, str] | None = None,
            method: str = "POST") -> Answer:
    hdrs = {"Host": "x", "Authorization": f"Bearer {KEY}", "Content-Type": "application/json",
            "Content-Length": str(len(body)), "Connection": "close", **(headers or {})}
    raw = f"{method} {path} HTTP/1.1\r\n".encode() + b"".join(
        f"{k}: {v}\r\n".encode() for k, v in hdrs.items()) + b"\r\n" + body
    answer = exchange(port, raw)
    assert answer is not None, "the gateway closed the connection without an answer"
    return answer


def assert_openai_error(answer: Answer, status: int | set[int], code: str | None = None) -> dict:
    statuses = {status} if isinstance(status, int) else status
    assert answer.status in statuses, (answer.status, answer.body[:300])
    assert answer.headers.get("content-type", "").startswith("application/json")
    body = answer.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code
    return body


def assert_still_serving(port: int) -> None:
    ok = request(port, json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode())
    assert ok.status == 200 and ok.json()["object"] == "chat.completion"


# ---- bodies --------------------------------------------------------------------------------------------------
@FUZZ
@given(body=st.binary(max_size=4096))
def test_arbitrary_bytes_get_an_openai_error_never_a_500(served: Served, body: bytes) -> None:
    answer = request(served.port, body)
    if answer.status != 200:  # bytes that happen to be a valid request are served
        assert_openai_error(answer, {400, 404})


SCALAR = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(
    max_size=20)
JSON = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=8), inner, max_size=4), max_leaves=12)


@FUZZ
@given(model=JSON.filter(lambda v: not isinstance(v, str) and v is not None), rest=st.dictionaries(
    st.sampled_from(["messages", "prompt", "stream", "max_tokens", "n"]), JSON, max_size=3))
def test_a_model_of_the_wrong_type_is_a_400(served: Served, model: object, rest: dict) -> None:
    body = assert_openai_error(request(served.port, json.dumps({**rest, "model": model}).encode()), 400)
    assert body["error"]["type"] == "invalid_request_error"


@FUZZ
@given(value=JSON)
def test_any_json_document_gets_a_clean_answer(served: Served, value: object) -> None:
    answer = request(served.port, json.dumps(value).encode())
    assert_openai_error(answer, {400, 404})  # never valid: no object with a model "m" and list messages here


@FUZZ
@given(messages=JSON, stream=st.booleans())
def test_wrong_types_below_the_model_go_to_the_engine_untouched(served: Served, messages: object,
                                                                 stream: bool) -> None:
    # The gateway reads only `model` and the affinity prefix; the engine judges the rest (vLLM answers 400).
    answer = request(served.port, json.dumps({"model": "m", "messages": messages, "stream": stream}).encode())
    assert answer.status == 200


def test_missing_model_and_unknown_model(served: Served) -> None:
    assert_openai_error(request(served.port, b'{"messages": []}'), 400, "missing_model")
    assert_openai_error(request(served.port, b'{"model": ""}'), 400, "missing_model")
    assert_openai_error(request(served.port, b'{"model": "../../etc/passwd"}'), 404, "model_not_found")
    assert_openai_error(request(served.port, b'{"model": "m", "messages": [}'), 400, "invalid_json")


# ---- size -------------------------------------------------------------------------------------------------------
def test_huge_bodies_are_413_whether_announced_or_not(served: Served) -> None:
    huge = b'{"model": "m", "messages": "' + b"x" * (MAX_BODY + 10) + b'"}'
    assert_openai_error(request(served.port, huge), 413, "body_too_large")
    # A Content-Length far beyond the limit is refused before any body is read.
    assert_openai_error(request(served.port, b"{}", headers={"Content-Length": str(10**12)}), 413)
    # Chunked: no length announced, the limit applies as bytes arrive.
    chunks = b"".join(b"%x\r\n%s\r\n" % (8192, b"x" * 8192) for _ in range(MAX_BODY // 8192 + 2)) + b"0\r\n\r\n"
    raw = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
           b"\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunks)
    answer = exchange(served.port, raw)
    assert answer is not None
    assert_openai_error(answer, 413)
    assert_still_serving(served.port)


def test_oversize_headers_are_refused_by_the_http_layer(served: Served) -> None:
    answer = request(served.port, b"{}", headers={"X-Big": "y" * 70000})
    assert answer.status in (400, 431)
    assert_still_serving(served.port)


# ---- headers, methods, paths ---------------------------------------------------------------------------------------
@FUZZ
@given(auth=st.one_of(st.just(""), st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126),
                                                max_size=60)))
def test_a_wrong_key_is_a_401(served: Served, auth: str) -> None:
    answer = request(served.port, b'{"model": "m"}', headers={"Authorization": auth})
    assert_openai_error(answer, 401, "invalid_api_key")


@FUZZ
@given(method=st.sampled_from(["GET", "PUT", "DELETE", "PATCH", "OPTIONS"]),
       path=st.text(alphabet="abcdefghijklmnopqrstuvwxyz/._-%0123456789", max_size=40))
@example(method="GET", path="%0a")  # a newline in the path once fell past the catch-all route: aiohttp's text 404
def test_other_routes_are_an_openai_shaped_404(served: Served, method: str, path: str) -> None:
    if f"/{path}" in ("/healthz", "/metrics", "/v1/models"):
        return
    answer = request(served.port, b"", path=f"/{path}", method=method)
    assert_openai_error(answer, {404, 400})


def test_malformed_http_is_answered_400_and_the_gateway_serves_on(served: Served) -> None:
    for raw in (b"\x00\x01\x02garbage\r\n\r\n", b"POST / HTTP/9.9\r\n\r\n", b"POST\r\n\r\n",
                b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
                b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"):
        answer = exchange(served.port, raw)
        assert answer is None or answer.status == 400, raw
    assert_still_serving(served.port)


# ---- slow clients ----------------------------------------------------------------------------------------------------
def test_a_client_that_trickles_its_headers_is_cut_off(served: Served) -> None:
    raw = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 40
    started = time.monotonic()
    done: list[float] = []
    trickler = threading.Thread(target=lambda: (exchange(served.port, raw, pause_s=0.1, piece=1),
                                                done.append(time.monotonic() - started)))
    trickler.start()
    time.sleep(0.5)
    assert_still_serving(served.port)  # others are served meanwhile
    trickler.join(SOCKET_TIMEOUT_S)
    assert done, "the trickling client was never cut off"
    # 40 bytes at 10/s would take 5 s; the connection is closed at the client timeout, give or take aiohttp's
    # keep-alive check rounding.
    assert done[0] < 40 * 0.1 + 0.5


def test_a_client_that_trickles_its_body_gets_408(served: Served) -> None:
    body = b'{"model": "m", "messages": [{"role": "user", "content": "' + b"x" * 60 + b'"}]}'
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
            b"\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", served.port), timeout=SOCKET_TIMEOUT_S) as sock:
        sock.sendall(head)
        answer = b""
        try:
            for i in range(len(body)):
                sock.sendall(body[i:i + 1])
                time.sleep(0.1)
                sock.setblocking(False)
                try:
                    answer += sock.recv(65536)
                except BlockingIOError:
                    pass
                finally:
                    sock.setblocking(True)
                if answer:
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass
        answered = time.monotonic() - started
        sock.settimeout(SOCKET_TIMEOUT_S)
        # aiohttp then reads (and drops) what is left of the body for up to its lingering time before it
        # closes: bounded too.
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass
        assert time.monotonic() - started < SOCKET_TIMEOUT_S
    elapsed = answered
    status = int(answer.split(b" ", 2)[1])
    assert status == 408
    err = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert err["error"]["code"] == "request_timeout"
    assert elapsed < CLIENT_TIMEOUT_S + 2.0
    assert_still_serving(served.port)


def test_a_client_that_never_sends_is_closed(served: Served) -> None:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", served.port), timeout=SOCKET_TIMEOUT_S) as sock:
        assert sock.recv(1) == b""  # closed by the gateway, not by our timeout
    assert time.monotonic() - started < CLIENT_TIMEOUT_S + 2.0


def test_a_body_shorter_than_announced_times_out_with_408(served: Served) -> None:
    answer = request(served.port, b'{"model": "m"}', headers={"Content-Length": "500"})
    assert_openai_error(answer, 408, "request_timeout")
