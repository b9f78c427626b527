"""OpenAI's error shape for errors passed on from an engine (controller/errorshape.py), alone and through the
gateway with an engine that answers vLLM's shapes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

import openai
import pytest
from aiohttp import web

from slinfer.controller.errorshape import reshape

VLLM_400 = {"error": {"message": "max_tokens is too large", "type": "BadRequestError", "param": None, "code": 400}}
VLLM_FLAT_404 = {"object": "error", "message": "The model `x` does not exist.", "type": "NotFoundError",
                 "param": None, "code": 404}


def _shaped(status: int, doc: object) -> dict:
    out = reshape(status, json.dumps(doc).encode())
    assert out is not None
    return json.loads(out)


@pytest.mark.parametrize(("status", "doc", "type_"), [
    (400, VLLM_400, "invalid_request_error"),
    (404, VLLM_FLAT_404, "not_found_error"),
    (401, {"error": "Unauthorized"}, "authentication_error"),
    (403, {"detail": "forbidden"}, "permission_error"),
    (429, {"error": {"message": "slow down", "type": "TooManyRequests", "code": 429}}, "rate_limit_error"),
    (500, {"error": {"message": "boom", "type": "InternalServerError", "code": 500}}, "server_error"),
    (422, {"detail": [{"loc": ["body", "model"], "msg": "Field required"}]}, "invalid_request_error"),
])
def test_vllm_shapes_take_openais(status: int, doc: dict, type_: str) -> None:
    shaped = _shaped(status, doc)
    assert set(shaped) == {"error"}
    assert set(shaped["error"]) == {"message", "type", "param", "code"}
    assert shaped["error"]["type"] == type_
    assert shaped["error"]["message"]
    # vLLM's numeric code (the status again) is no OpenAI code: OpenAI's is a string or null.
    assert shaped["error"]["code"] is None


def test_message_param_and_string_code_are_kept() -> None:
    shaped = _shaped(400, {"error": {"message": "bad temperature", "type": "BadRequestError",
                                     "param": "temperature", "code": "invalid_value"}})
    assert shaped == {"error": {"message": "bad temperature", "type": "invalid_request_error",
                                "param": "temperature", "code": "invalid_value"}}
    # An engine that already uses OpenAI's type keeps it.
    assert _shaped(400, {"error": {"message": "m", "type": "invalid_request_error"}})["error"]["type"] == \
        "invalid_request_error"


def test_success_and_non_json_are_left_alone() -> None:
    assert reshape(200, json.dumps(VLLM_400).encode()) is None
    assert reshape(500, b"Internal Server Error") is None
    assert reshape(500, b"[1, 2]") is None


@pytest.fixture
async def vllm_like() -> AsyncIterator[Callable[[int, object], str]]:
    """An engine whose chat route answers a set status and JSON body (vLLM's error shapes)."""
    answer: dict[str, object] = {"status": 200, "body": {}}

    async def chat(request: web.Request) -> web.Response:
        return web.json_response(answer["body"], status=int(answer["status"]))  # type: ignore[call-overload]

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def set_answer(status: int, body: object) -> str:
        answer.update(status=status, body=body)
        return f"http://127.0.0.1:{port}"

    yield set_answer
    await runner.cleanup()


async def test_engine_errors_reach_the_openai_client_in_openais_shape(controller_factory, vllm_like, http,
                                                                       engine_pb) -> None:
    c = await controller_factory()
    base_url = vllm_like(400, VLLM_400)
    await (await c.agent()).send([engine_pb("1", "m", base_url)])
    client = openai.AsyncOpenAI(base_url=f"{c.url}/v1", api_key=c.client_key, max_retries=0)
    try:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    finally:
        await client.close()
    assert caught.value.status_code == 400
    assert caught.value.body == {"message": "max_tokens is too large", "type": "invalid_request_error",
                                 "param": None, "code": None}
    # Statuses are kept; the flat older shape is rewritten too.
    vllm_like(404, VLLM_FLAT_404)
    async with http.post(f"{c.url}/v1/chat/completions", json={"model": "m", "messages": []},
                         headers=c.headers()) as resp:
        assert resp.status == 404
        assert await resp.json() == {"error": {"message": "The model `x` does not exist.",
                                               "type": "not_found_error", "param": None, "code": None}}
    # Positive control: a 2xx answer passes unchanged, byte for byte.
    vllm_like(200, {"object": "chat.completion", "code": 400, "type": "BadRequestError"})
    async with http.post(f"{c.url}/v1/chat/completions", json={"model": "m", "messages": []},
                         headers=c.headers()) as resp:
        assert resp.status == 200
        assert await resp.json() == {"object": "chat.completion", "code": 400, "type": "BadRequestError"}
