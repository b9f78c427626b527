"""The usage ledger: token counting from bodies and streams, append-only daily files, bounded memory, queries;
then end to end through the real gateway, the stand-in engine, the Admin API and `slinfer usage`."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import errno
import io
import json
import os
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from slinfer.cli import main as cli
from slinfer.config import GatewayConfig, ModelConfig
from slinfer.controller.admin import AdminService
from slinfer.controller.balancer import Balancer
from slinfer.controller.gateway import Gateway
from slinfer.controller.keys import KeyStore
from slinfer.controller.limits import DAY_S, KeyLimits, Limiter
from slinfer.controller.proxy import Proxy
from slinfer.controller.queue import WaitQueue
from slinfer.controller.registry import Registry, RegistryService
from slinfer.controller.usage import Meter, UsageLedger
from slinfer.v1 import admin_pb2_grpc, controller_pb2_grpc

T0 = 20000 * DAY_S + 3600.0  # 1:00 UTC on some day
# A tmpfs this small fills up in a few writes; it only ever holds a ledger's few lines.
TMPFS_BYTES = 256 * 1024


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def sse(*events: dict | str) -> bytes:
    return b"".join(b"data: " + (e.encode() if isinstance(e, str) else json.dumps(e).encode()) + b"\n\n"
                    for e in events)


CHAT_ROLE = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
CHAT_TOKEN = {"choices": [{"index": 0, "delta": {"content": " tok"}}]}


# ---- Meter -------------------------------------------------------------------------------------------------
def test_meter_reads_the_engines_usage_from_a_json_body() -> None:
    meter = Meter()
    meter.feed_body(b'{"id":"x","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":7,"total_tokens":19}}')
    assert (meter.prompt_tokens, meter.completion_tokens, meter.reported, meter.estimated) == (12, 7, True, False)
    for junk in (b"", b"not json", b'{"usage": "many"}', b"[1,2]"):
        other = Meter()
        other.feed_body(junk)
        assert (other.prompt_tokens, other.completion_tokens, other.reported) == (0, 0, False)


def test_meter_counts_content_chunks_when_the_stream_has_no_usage() -> None:
    meter = Meter()
    stream = sse(CHAT_ROLE, *[CHAT_TOKEN] * 5, "[DONE]")
    # Split at awkward places: inside an event and between the two newlines.
    for piece in (stream[:7], stream[7:60], stream[60:61], stream[61:]):
        meter.feed_chunk(piece)
    assert (meter.prompt_tokens, meter.completion_tokens, meter.estimated) == (0, 5, True)


def test_meter_takes_the_final_usage_chunk_over_the_count() -> None:
    meter = Meter()
    final = {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}}
    stream = sse(CHAT_ROLE, {**CHAT_TOKEN, "usage": None}, CHAT_TOKEN, CHAT_TOKEN, final, "[DONE]")
    cut = stream.index(b'"usage": {"prompt') + 5  # the usage object split across two reads
    meter.feed_chunk(stream[:cut])
    meter.feed_chunk(stream[cut:])
    assert (meter.prompt_tokens, meter.completion_tokens, meter.reported, meter.estimated) == (9, 3, True, False)


def test_meter_skips_error_events_and_bounds_a_runaway_event() -> None:
    meter = Meter()
    meter.feed_chunk(sse(CHAT_TOKEN, {"error": {"message": "engine failed mid-stream"}}))
    assert meter.completion_tokens == 1
    meter.feed_chunk(b"data: " + b"x" * (2 << 20))  # no end of event in sight
    assert len(meter._carry) == 0


# ---- the ledger ----------------------------------------------------------------------------------------------
def used(prompt: int, completion: int, estimated: bool = False) -> Meter:
    meter = Meter()
    meter.prompt_tokens, meter.completion_tokens, meter.estimated = prompt, completion, estimated
    return meter


def test_sums_are_appended_per_day_key_and_model_and_read_back(tmp_path: Path) -> None:
    clock = Clock()
    ledger = UsageLedger(tmp_path / "usage", clock=clock)
    ledger.record("k1", "alice", "physics", "m", 200, used(10, 20))
    ledger.record("k1", "alice", "physics", "m", 200, used(1, 2, estimated=True))
    ledger.record("k1", "alice", "physics", "m2", 500, used(0, 0))
    ledger.record("k2", "bob", "chem", "m", 429, used(0, 0))
    assert ledger.tokens_today("k1") == 33 and ledger.tokens_today("k2") == 0
    ledger.flush()
    day1 = tmp_path / "usage" / "usage-2024-10-04.jsonl"
    assert [p.name for p in (tmp_path / "usage").iterdir()] == [day1.name]
    assert len(day1.read_text().splitlines()) == 3  # one line per sum, not per request
    assert oct(os.stat(day1).st_mode & 0o777) == "0o600"
    clock.t += 10
    ledger.record("k1", "alice", "physics", "m", 200, used(5, 5))
    ledger.flush()
    assert len(day1.read_text().splitlines()) == 4  # appended, nothing rewritten
    clock.t += DAY_S
    ledger.record("k1", "alice", "physics", "m", 200, used(100, 100))  # still pending: queries see it
    assert ledger.tokens_today("k1") == 200

    rows = {(r.day, r.key_id, r.model): r for r in ledger.query()}
    first = rows[("2024-10-04", "k1", "m")]
    assert (first.requests, first.failed, first.prompt_tokens, first.completion_tokens, first.estimated) == \
        (3, 0, 16, 27, 1)
    assert first.account == "physics" and first.key_name == "alice"
    assert rows[("2024-10-04", "k1", "m2")].failed == 1
    assert rows[("2024-10-04", "k2", "m")].failed == 1
    assert rows[("2024-10-05", "k1", "m")].prompt_tokens == 100
    assert {r.key_id for r in ledger.query(key_id="k2")} == {"k2"}
    assert [r.day for r in ledger.query(since=T0 + DAY_S - 60)] == ["2024-10-05"]
    assert [r.day for r in ledger.query(until=T0 + 60)] == ["2024-10-04"] * 3


def test_a_restart_keeps_todays_totals_and_a_torn_line_is_skipped(tmp_path: Path) -> None:
    clock = Clock()
    ledger = UsageLedger(tmp_path / "usage", clock=clock)
    ledger.record("k1", "alice", "physics", "m", 200, used(10, 20))
    ledger.close()
    with (tmp_path / "usage" / "usage-2024-10-04.jsonl").open("a") as f:
        f.write('{"day":"2024-10-04","key_id":"k1","prompt_tok')  # a crash mid-write
    again = UsageLedger(tmp_path / "usage", clock=clock)
    assert again.tokens_today("k1") == 30
    assert [(r.requests, r.prompt_tokens) for r in again.query()] == [(1, 10)]


def test_memory_is_bounded_by_keys_and_models_not_requests(tmp_path: Path) -> None:
    ledger = UsageLedger(tmp_path / "usage", clock=Clock())
    for i in range(20000):
        ledger.record(f"k{i % 3}", "n", "a", "m", 200, used(1, 1))
    assert len(ledger._pending) == 3
    ledger.flush()
    assert len(ledger._pending) == 0
    assert sum(r.requests for r in ledger.query()) == 20000


@contextlib.contextmanager
def _read_only(folder: Path) -> Iterator[None]:
    """`folder` takes no new file or folder while inside. Root writes through permission bits (as `make test` and
    CI run), so as root it is a read-only tmpfs mounted over it; as anyone else its write bit is taken away."""
    if os.geteuid() != 0:
        folder.chmod(0o500)
        try:
            yield
        finally:
            folder.chmod(0o700)
        return
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"ro,size={TMPFS_BYTES},mode=0700", "slinfer-test", str(folder)],
                   check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_write_error_keeps_the_sums_until_the_disk_is_back(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    folder = state / "usage"
    ledger = UsageLedger(folder, clock=Clock())
    with _read_only(state):  # the state folder cannot take the ledger's folder
        ledger.record("k1", "alice", "physics", "m", 200, used(1, 2))
        ledger.flush()
        assert not folder.exists()
        assert ledger.write_errors == 1 and len(ledger._pending) == 1
        ledger.record("k1", "alice", "physics", "m", 200, used(1, 2))
        ledger.flush()
        assert ledger.write_errors == 2 and len(ledger._pending) == 1
    ledger.flush()
    assert ledger.write_errors == 2
    assert [(r.requests, r.prompt_tokens, r.completion_tokens) for r in ledger.query()] == [(2, 2, 4)]
    assert not ledger._pending


def test_a_full_disk_keeps_the_sums_until_there_is_room_again(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root can mount the small tmpfs that fills up (make test and CI run as root)")
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES},mode=0700", "slinfer-test", str(state)],
                   check=True)
    try:
        folder = state / "usage"
        ledger = UsageLedger(folder, clock=Clock())
        filler = state / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            with pytest.raises(OSError) as full:
                while True:
                    os.write(fd, b"x" * 4096)
        finally:
            os.close(fd)
        assert full.value.errno == errno.ENOSPC
        ledger.record("k1", "alice", "physics", "m", 200, used(1, 2))
        ledger.flush()
        assert ledger.write_errors == 1 and len(ledger._pending) == 1
        assert all(p.stat().st_size == 0 for p in folder.glob("*.jsonl")), "a sum was written to a full disk"
        ledger.record("k1", "alice", "physics", "m", 200, used(1, 2))
        filler.unlink()
        ledger.flush()
        assert ledger.write_errors == 1 and not ledger._pending
        assert [(r.requests, r.prompt_tokens, r.completion_tokens) for r in ledger.query()] == [(2, 2, 4)]
    finally:
        subprocess.run(["umount", str(state)], check=True)


def test_a_write_error_from_a_file_in_the_way(tmp_path: Path) -> None:
    folder = tmp_path / "usage"
    folder.write_text("in the way")  # even root cannot make a folder here
    ledger = UsageLedger(folder, clock=Clock())
    ledger.record("k1", "alice", "physics", "m", 200, used(1, 2))
    ledger.flush()
    assert ledger.write_errors == 1 and len(ledger._pending) == 1
    ledger.record("k1", "alice", "physics", "m", 200, used(1, 2))
    folder.unlink()
    ledger.flush()
    assert [(r.requests, r.prompt_tokens, r.completion_tokens) for r in ledger.query()] == [(2, 2, 4)]


async def slinfer(*argv: str) -> int:
    """The CLI as a person runs it (its gRPC calls block, so off the loop that serves them)."""
    return await asyncio.to_thread(cli.main, list(argv))


# ---- end to end --------------------------------------------------------------------------------------------
@dataclass
class Bed:
    url: str
    grpc_address: str
    keys: KeyStore
    ledger: UsageLedger
    registry: Registry
    config: Path
    agent_channel: grpc.aio.Channel


@pytest.fixture
async def bed(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Bed]]]:
    """Registry, Admin and a Gateway with a Limiter and a UsageLedger, on real ports (as controller/main.py wires
    them); the fixture of conftest.py builds gateways without them."""
    made: list[tuple[Gateway, grpc.aio.Server, grpc.aio.Channel]] = []

    async def make(limits: KeyLimits = KeyLimits(), token: str = "admin-token") -> Bed:  # noqa: B008
        registry = Registry()
        keys = KeyStore(tmp_path / "keys.json")
        ledger = UsageLedger(tmp_path / "usage")
        config = GatewayConfig()
        gateway = Gateway(config, [ModelConfig(name="m", source="/x")], registry, keys, Proxy(), Balancer(),
                          WaitQueue(config.queue_size), Limiter(limits, ledger.tokens_today), ledger)
        server = grpc.aio.server()
        controller_pb2_grpc.add_RegistryServicer_to_server(RegistryService(registry, token, 0.5), server)
        admin_pb2_grpc.add_AdminServicer_to_server(
            AdminService(None, registry, keys, token, usage=ledger), server)  # type: ignore[arg-type]
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        http_port = await gateway.start("127.0.0.1", 0)
        config_path = tmp_path / "slinfer.toml"
        config_path.write_text(f'[controller]\naddress = "127.0.0.1:{port}"\ntoken = "{token}"\n')
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        made.append((gateway, server, channel))
        return Bed(f"http://127.0.0.1:{http_port}", f"127.0.0.1:{port}", keys, ledger, registry, config_path,
                   channel)

    yield make
    for gateway, server, channel in made:
        await channel.close()
        await gateway.stop()
        await server.stop(None)


async def register(bed: Bed, engine_url: str, engine_pb, token: str = "admin-token") -> None:
    from conftest import ReportClient

    client = ReportClient(bed.agent_channel, "node1", token)
    await client.open()
    await client.send([engine_pb("1", "m", engine_url)])


async def test_usage_through_the_gateway_then_exported_by_the_cli(bed, standins, http, engine_pb, capsys) -> None:
    b = await bed()
    engine = await standins(model="m", tokens=6)
    await register(b, engine.base_url, engine_pb)
    alice_id, alice = b.keys.create("alice", account="physics")
    bob_id, bob = b.keys.create("bob", account="chemistry")
    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    for key, stream in ((alice, False), (alice, False), (alice, True), (bob, True)):
        async with http.post(f"{b.url}/v1/chat/completions", json={**chat, "stream": stream},
                             headers={"Authorization": f"Bearer {key}"}) as resp:
            assert resp.status == 200
            await resp.read()
    async with http.post(f"{b.url}/v1/chat/completions", json={"model": "nope", "messages": []},
                         headers={"Authorization": f"Bearer {bob}"}) as resp:
        assert resp.status == 404
    async with http.post(f"{b.url}/v1/chat/completions", json=chat,
                         headers={"Authorization": "Bearer not-a-key"}) as resp:
        assert resp.status == 401  # no key, no ledger line

    assert await slinfer("usage", "--config", str(b.config), "--format", "json") == 0
    rows = {(r["key_id"], r["model"]): r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {(alice_id, "m"), (bob_id, "m"), (bob_id, "")}
    a = rows[(alice_id, "m")]
    # Two bodies with the engine's usage (8 + 6 each), and one stream whose usage chunk the gateway asked the
    # engine for (issue 35.2): exact too.
    assert (a["requests"], a["failed"], a["prompt_tokens"], a["completion_tokens"], a["estimated"]) == \
        (3, 0, 24, 18, 0)
    assert a["account"] == "physics" and a["key_name"] == "alice"
    assert rows[(bob_id, "")]["failed"] == 1 and rows[(bob_id, "m")]["account"] == "chemistry"

    assert await slinfer("usage", "--config", str(b.config), "--key", bob_id, "--format", "csv") == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert {r["key_id"] for r in table} == {bob_id} and len(table) == 2
    assert await slinfer("usage", "--config", str(b.config), "--since", "1d") == 0
    out = capsys.readouterr().out
    assert "physics" in out and "COMPLETION_TOKENS" in out
    assert await slinfer("usage", "--config", str(b.config), "--since", "2999-01-01") == 0
    assert "(no usage recorded)" in capsys.readouterr().out
    b.ledger.flush()
    assert any((Path(b.config).parent / "usage").iterdir())


async def test_usage_cli_rejects_bad_times(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        await slinfer("usage", "--since", "yesterday")
    assert "neither YYYY-MM-DD" in capsys.readouterr().err
    config = tmp_path / "c.toml"
    config.write_text('[controller]\naddress = "127.0.0.1:1"\n')
    assert await slinfer("usage", "--config", str(config), "--since", "2024-01-02", "--until", "2024-01-01") == 1
    assert "--until must be later" in capsys.readouterr().err


async def test_token_quota_from_the_ledger_refuses_with_429(bed, standins, http, engine_pb) -> None:
    b = await bed()
    engine = await standins(model="m", tokens=6)
    await register(b, engine.base_url, engine_pb)
    _, secret = b.keys.create("small", account="physics", tokens_per_day=20)
    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    statuses = []
    for _ in range(3):
        async with http.post(f"{b.url}/v1/chat/completions", json=chat,
                             headers={"Authorization": f"Bearer {secret}"}) as resp:
            statuses.append(resp.status)
            body = await resp.json()
            retry_after = int(resp.headers.get("Retry-After", "0"))
    # 14 tokens, then 28 (over 20: the overshoot of the request that crossed it), then refused.
    assert statuses == [200, 200, 429]
    assert body["error"]["code"] == "insufficient_quota" and body["error"]["type"] == "insufficient_quota"
    assert 0 < retry_after <= DAY_S
    assert engine.seen.requests == 2


async def test_keys_create_with_limits_over_the_cli(bed, capsys) -> None:
    b = await bed()
    assert await slinfer("keys", "create", "svc", "--account", "physics", "--rpm", "0", "--tokens-per-day", "5000",
                     "--config", str(b.config)) == 0
    key_id = capsys.readouterr().out.split()[2]
    (info,) = [k for k in b.keys.list() if k.key_id == key_id]
    assert (info.account, info.requests_per_minute, info.tokens_per_day) == ("physics", 0, 5000)
    assert await slinfer("keys", "create", "plain", "--config", str(b.config)) == 0
    capsys.readouterr()
    assert await slinfer("keys", "list", "--config", str(b.config)) == 0
    out = capsys.readouterr().out
    assert "RPM" in out and "5000" in out and "default" in out and "none" in out
    with pytest.raises(SystemExit):
        await slinfer("keys", "create", "bad", "--rpm", "-1", "--config", str(b.config))
