"""`/v1/files` (controller/files.py): batch line validation, and the API through the official openai client."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import openai
import pytest
from aiohttp import web

from slinfer.controller.files import BadLine, FilesApi, FileStore, check_batch_file, check_batch_line
from slinfer.controller.keys import KeyStore

MODELS = {"tiny"}


def line(i: int, **over: object) -> dict[str, object]:
    base: dict[str, object] = {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                               "body": {"model": "tiny", "messages": [{"role": "user", "content": f"hi {i}"}],
                                        "max_tokens": 4}}
    base.update(over)
    return base


def jsonl(lines: list[dict[str, object]]) -> bytes:
    return b"".join(json.dumps(x).encode() + b"\n" for x in lines)


# ---- validation -----------------------------------------------------------------------------------------
def test_a_valid_file_counts_its_lines_and_model():
    assert check_batch_file(jsonl([line(i) for i in range(5)]), MODELS, 100) == (5, {"tiny"})


@pytest.mark.parametrize(("bad", "words"), [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "not a JSON object"),
    (json.dumps(line(0, custom_id="")).encode(), "custom_id"),
    (json.dumps(line(0, method="GET")).encode(), "method must be POST"),
    (json.dumps(line(0, url="/v1/responses")).encode(), "url must be one of"),
    (json.dumps(line(0, body={"model": "nope", "messages": []})).encode(), "'nope' is not a model"),
    (json.dumps(line(0, body={"model": "tiny"})).encode(), "no messages"),
    (json.dumps(line(0, url="/v1/embeddings")).encode(), "no input"),
    (json.dumps(line(0, body={"model": "tiny", "prompt": "x", "stream": True}),).encode().replace(
        b"chat/completions", b"completions"), "stream"),
    (b"", "not valid JSON"),
])
def test_the_first_bad_line_is_named_by_number(bad, words):
    good = jsonl([line(i) for i in range(1, 3)])
    data = good + bad + b"\n" + jsonl([line(9, custom_id="{also bad")]).replace(b'"method"', b'"m"')
    with pytest.raises(BadLine) as caught:
        check_batch_file(data, MODELS, 100)
    assert caught.value.line == 3
    assert words in caught.value.problem


def test_a_repeated_custom_id_is_refused_at_its_second_line():
    with pytest.raises(BadLine) as caught:
        check_batch_file(jsonl([line(1), line(2), line(1)]), MODELS, 100)
    assert (caught.value.line, "repeats custom_id 'r1'") == (3, caught.value.problem)


def test_too_many_lines_and_an_empty_file_are_refused():
    with pytest.raises(BadLine, match="max_lines"):
        check_batch_file(jsonl([line(i) for i in range(4)]), MODELS, 3)
    assert check_batch_file(jsonl([line(i) for i in range(3)]), MODELS, 3)[0] == 3  # control: at the limit
    with pytest.raises(BadLine, match="empty"):
        check_batch_file(b"", MODELS, 3)


def test_one_model_per_file():
    with pytest.raises(BadLine, match="second model") as caught:
        check_batch_file(jsonl([line(1), line(2, body={"model": "small", "messages": []})]), {"tiny", "small"}, 9)
    assert caught.value.line == 2


def test_check_line_adds_the_id_it_accepted():
    seen: set[str] = set()
    check_batch_line(json.dumps(line(7)).encode(), 1, MODELS, seen)
    assert seen == {"r7"}


# ---- the API, through the openai client -------------------------------------------------------------
@pytest.fixture
async def api(tmp_path: Path, unused_tcp_port: int):
    keys = KeyStore(tmp_path / "keys.json")
    _, alice = keys.create("alice", account="physics")
    _, bob = keys.create("bob", account="chem")
    files = FilesApi(FileStore(tmp_path / "spool"), keys.verify, MODELS, max_file_bytes=4096, max_lines=100)
    app = web.Application()
    files.register(app.router)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", unused_tcp_port)
    await site.start()
    base = f"http://127.0.0.1:{unused_tcp_port}/v1"
    yield (openai.AsyncOpenAI(base_url=base, api_key=alice, max_retries=0),
           openai.AsyncOpenAI(base_url=base, api_key=bob, max_retries=0), tmp_path / "spool")
    await runner.cleanup()


async def test_upload_list_retrieve_content_delete(api):
    alice, _, spool = api
    data = jsonl([line(i) for i in range(3)])
    created = await alice.files.create(file=("in.jsonl", data), purpose="batch")
    assert (created.purpose, created.bytes, created.filename) == ("batch", len(data), "in.jsonl")
    assert created.id.startswith("file-")
    assert [f.id for f in (await alice.files.list()).data] == [created.id]
    assert (await alice.files.retrieve(created.id)).bytes == len(data)
    assert (await alice.files.content(created.id)).content == data
    # The spool is the service's alone.
    assert stat.S_IMODE(os.stat(spool).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(spool / "files" / f"{created.id}.jsonl").st_mode) == 0o600
    deleted = await alice.files.delete(created.id)
    assert deleted.deleted
    with pytest.raises(openai.NotFoundError):
        await alice.files.retrieve(created.id)


async def test_another_key_gets_404_for_every_call(api):
    alice, bob, _ = api
    created = await alice.files.create(file=("in.jsonl", jsonl([line(1)])), purpose="batch")
    for call in (bob.files.retrieve, bob.files.content, bob.files.delete):
        with pytest.raises(openai.NotFoundError):
            await call(created.id)
    assert (await bob.files.list()).data == []
    assert (await alice.files.retrieve(created.id)).id == created.id  # control: still there, still alice's


async def test_a_bad_line_is_a_400_naming_it_and_nothing_is_kept(api):
    alice, _, spool = api
    data = jsonl([line(1), line(2)]) + b"garbage\n" + jsonl([line(4)]) + b"more garbage\n"
    with pytest.raises(openai.BadRequestError) as caught:
        await alice.files.create(file=("in.jsonl", data), purpose="batch")
    assert "Line 3 " in str(caught.value)
    assert not (spool / "files").exists() or list((spool / "files").iterdir()) == []


async def test_oversize_is_413_and_the_limit_itself_passes(api):
    alice, _, _ = api
    one = json.dumps(line(0)).encode() + b"\n"
    fits = b"".join(json.dumps(line(i)).encode().ljust(len(one) + 3) + b"\n" for i in range(4096 // (len(one) + 4)))
    assert len(fits) <= 4096
    assert (await alice.files.create(file=("ok.jsonl", fits), purpose="batch")).bytes == len(fits)
    over = fits + one * 3
    with pytest.raises(openai.APIStatusError) as caught:
        await alice.files.create(file=("big.jsonl", over), purpose="batch")
    assert caught.value.status_code == 413


async def test_a_wrong_purpose_and_no_key_are_refused(api):
    alice, _, _ = api
    with pytest.raises(openai.BadRequestError, match="purpose"):
        await alice.files.create(file=("in.jsonl", jsonl([line(1)])), purpose="fine-tune")
    anonymous = openai.AsyncOpenAI(base_url=str(alice.base_url), api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await anonymous.files.list()


async def test_the_gateway_serves_files_before_its_catch_all(tmp_path: Path):

    from slinfer.config import BatchConfig, Config, ControllerConfig, GatewayConfig, ModelConfig
    from slinfer.controller.balancer import Balancer
    from slinfer.controller.files import batch_routes
    from slinfer.controller.gateway import Gateway
    from slinfer.controller.proxy import Proxy
    from slinfer.controller.queue import WaitQueue
    from slinfer.controller.registry import Registry

    keys = KeyStore(tmp_path / "keys.json")
    _, secret = keys.create("alice")
    config = Config(controller=ControllerConfig(state_dir=str(tmp_path)), batch=BatchConfig(),
                    models=[ModelConfig(name="tiny", source="/x")])
    g = GatewayConfig()
    gateway = Gateway(g, config.models, Registry(), keys, Proxy(1, 1, 1), Balancer(), WaitQueue(4))
    gateway.extra_routes.extend(batch_routes(config, keys.verify))
    port = await gateway.start("127.0.0.1", 0)
    try:
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=secret, max_retries=0)
        created = await client.files.create(file=("in.jsonl", jsonl([line(1)])), purpose="batch")
        assert (tmp_path / "batch" / "files" / f"{created.id}.jsonl").exists()  # the default spool
        with pytest.raises(openai.NotFoundError):  # the catch-all still answers what no route serves
            await client.get("/filesX", cast_to=object)
    finally:
        await gateway.stop()
