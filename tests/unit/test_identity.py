"""Users' own keys proven by munge: the decision on unmunge's answers (recorded, and from a real munged started
in a temp dir with its own key), the account check on sacctmgr's answers, the bound per user, ownership, expiry,
and the CLI through the real Admin gRPC server."""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import io
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from slinfer import munge
from slinfer.cli import main as cli
from slinfer.config import parse as parse_config
from slinfer.controller.admin import AdminService, user_server
from slinfer.controller.identity import IdentityError, OwnKeys
from slinfer.controller.keys import KeyStore
from slinfer.controller.usage import Meter, UsageLedger
from slinfer.slurm.runner import Query
from slinfer.v1 import admin_pb2, admin_pb2_grpc

needs_munged = pytest.mark.skipif(shutil.which("munged") is None or os.geteuid() != 0,
                                  reason="needs munged and root (to encode as another user)")
OTHER_USER = "nobody"


def _start_munged(folder: Path) -> tuple[str, subprocess.Popen[bytes]]:
    folder.mkdir(mode=0o711)
    key = folder / "key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    sock = folder / "sock"
    proc = subprocess.Popen(["munged", "-F", "-f", f"--socket={sock}", f"--key-file={key}",
                             f"--pid-file={folder}/pid", f"--seed-file={folder}/seed",
                             f"--log-file={folder}/log"])
    deadline = time.monotonic() + 10
    while not sock.exists():
        assert proc.poll() is None, "munged exited"
        assert time.monotonic() < deadline, "munged's socket did not appear"
        time.sleep(0.05)
    return str(sock), proc


@pytest.fixture
def sockets() -> Iterator[tuple[str, str]]:
    """Two munged, each with its own key: the cluster's and a foreign one."""
    # Another user must reach the sockets: pytest's own folder is root's alone (0700), so one under /tmp.
    top = Path(tempfile.mkdtemp(prefix="slinfer-munge-"))
    top.chmod(0o711)
    here, p1 = _start_munged(top / "site")
    there, p2 = _start_munged(top / "foreign")
    try:
        yield here, there
    finally:
        for p in (p1, p2):
            p.terminate()
            p.wait(10)
        shutil.rmtree(top, ignore_errors=True)


def encode_as(user: str, socket: str, *extra: str) -> str:
    done = subprocess.run(["munge", "--no-input", f"--socket={socket}", *extra], user=user, capture_output=True,
                          text=True, check=True, timeout=10)
    return done.stdout.strip()


# ---- the decision on recorded outputs of `unmunge -N -k STATUS,UID,GID` ----------------------------------------
def test_verdict_trusts_the_exit_status_not_the_printed_uid() -> None:
    good = "STATUS:          0\nUID:             1001\nGID:             1001\n\n"
    assert munge.verdict(0, good) == munge.Identity(1001, 1001)
    replayed = "STATUS:          17\nUID:             1001\nGID:             1001\n\n"
    for code, word in ((17, "replayed"), (15, "expired"), (14, "another munge key"), (12, "tampered")):
        with pytest.raises(munge.MungeError, match=word):
            munge.verdict(code, replayed.replace("17", str(code)))
    with pytest.raises(munge.MungeError, match="status 9"):
        munge.verdict(0, good.replace("STATUS:          0", "STATUS:          9"))
    with pytest.raises(munge.MungeError, match="unexpected"):
        munge.verdict(0, "UID: 5\n")


def test_decode_refuses_what_is_not_a_credential_without_running_unmunge() -> None:
    for bad in ("", "hello", "MUNGE:" + "A" * 5000, "MUNGE:a\nb"):
        with pytest.raises(munge.MungeError, match="not a munge credential"):
            munge.decode(bad, "/nonexistent")


# ---- the real munged --------------------------------------------------------------------------------------------
@needs_munged
def test_real_munge_proves_the_encoder_and_refuses_replay_foreign_tampered_expired(
        sockets: tuple[str, str]) -> None:
    here, there = sockets
    cred = encode_as(OTHER_USER, here)
    other_uid = int(subprocess.run(["id", "-u", OTHER_USER], capture_output=True, text=True, check=True).stdout)
    assert munge.decode(cred, here).uid == other_uid
    assert munge.decode(munge.encode(here), here).uid == 0  # positive control for root too
    with pytest.raises(munge.MungeError, match="replayed"):
        munge.decode(cred, here)
    with pytest.raises(munge.MungeError, match="another munge key"):
        munge.decode(encode_as(OTHER_USER, there), here)
    fresh = encode_as(OTHER_USER, here)
    middle = len(fresh) // 2
    tampered = fresh[:middle] + ("A" if fresh[middle] != "A" else "B") + fresh[middle + 1:]
    with pytest.raises(munge.MungeError):
        munge.decode(tampered, here)
    short = encode_as(OTHER_USER, here, "--ttl=1")
    time.sleep(2.2)
    with pytest.raises(munge.MungeError, match="expired"):
        munge.decode(short, here)


# ---- OwnKeys: accounts, the bound, ownership, expiry ------------------------------------------------------------
class SacctmgrAnswers:
    """sacctmgr's answers per user (what the bed's accounting.py sets: alice in physics+chem, bob in chem)."""

    ASSOC = {"root": "physics||normal\nchem||normal\n", OTHER_USER: "chem||normal\n"}
    DEFAULT = {"root": "physics\n", OTHER_USER: "chem\n"}
    # `show account A withcoord format=account,coordinators`: OTHER_USER coordinates chem.
    COORD = {"chem": f"chem|{OTHER_USER}\n", "physics": "physics|\n"}

    async def aget(self, query: Query[object]) -> object:
        if "withcoord" in query.argv:
            return query.parse(self.COORD.get(query.argv[query.argv.index("account") + 1], ""))
        user = next(a.split("=", 1)[1] for a in query.argv if a.startswith("user=")) \
            if "assoc" in query.argv else query.argv[query.argv.index("user") + 1]
        table = self.ASSOC if "assoc" in query.argv else self.DEFAULT
        return query.parse(table.get(user, ""))


def own_keys(tmp_path: Path, socket: str, **kw: object) -> tuple[OwnKeys, KeyStore]:
    keys = KeyStore(tmp_path / "state" / "keys.json")
    return OwnKeys(keys, SacctmgrAnswers(), munge_socket=socket, **kw), keys  # type: ignore[arg-type]


@needs_munged
async def test_own_keys_bind_user_and_account_and_refuse_the_rest(tmp_path: Path, sockets: tuple[str, str]) -> None:
    here, _ = sockets
    own, keys = own_keys(tmp_path, here, keys_per_user=2)
    changed: list[bytes] = []
    keys.subscribe(changed.append)
    made = await own.create(encode_as(OTHER_USER, here))
    assert (made.user, made.account) == (OTHER_USER, "chem")  # the default account
    info = keys.verify(made.secret)
    assert info is not None and (info.user, info.account) == (OTHER_USER, "chem")
    assert made.secret.encode() not in keys.path.read_bytes()
    with pytest.raises(IdentityError, match="no association with Slurm account 'physics'") as denied:
        await own.create(encode_as(OTHER_USER, here), account="physics")
    assert denied.value.kind == "denied"
    mine = await own.create(encode_as("root", here), account="chem", name="laptop")
    assert (mine.user, mine.account) == ("root", "chem")
    await own.create(encode_as(OTHER_USER, here), account="chem")
    with pytest.raises(IdentityError, match="keys_per_user") as full:
        await own.create(encode_as(OTHER_USER, here))
    assert full.value.kind == "exhausted"
    # Each user sees only their own; one cannot revoke another's.
    theirs = await own.list(encode_as(OTHER_USER, here))
    assert len(theirs) == 2 and {k.user for k in theirs} == {OTHER_USER}
    assert [k.key_id for k in await own.list(encode_as("root", here))] == [mine.key_id]
    with pytest.raises(IdentityError, match="no key") as other:
        await own.revoke(encode_as("root", here), made.key_id)
    assert other.value.kind == "not_found"
    assert keys.verify(made.secret) is not None
    before = len(changed)
    await own.revoke(encode_as(OTHER_USER, here), made.key_id)
    assert keys.verify(made.secret) is None and len(changed) == before + 1  # the feed hears of it
    # A replayed credential is refused for every call.
    cred = encode_as(OTHER_USER, here)
    await own.list(cred)
    with pytest.raises(IdentityError, match="replayed") as replay:
        await own.create(cred)
    assert replay.value.kind == "unauthenticated"
    # The owner survives a restart.
    again = KeyStore(tmp_path / "state" / "keys.json")
    assert {k.user for k in again.list()} == {OTHER_USER, "root"}


@needs_munged
async def test_expired_keys_are_refused_and_swept(tmp_path: Path, sockets: tuple[str, str]) -> None:
    here, _ = sockets
    now = [1000.0]
    keys = KeyStore(tmp_path / "state" / "keys.json")
    own = OwnKeys(keys, SacctmgrAnswers(), munge_socket=here, clock=lambda: now[0])  # type: ignore[arg-type]
    lasting = await own.create(encode_as(OTHER_USER, here))
    short = await own.create(encode_as(OTHER_USER, here), expires_days=1)
    assert short.expires_at == 1000.0 + 86400
    assert own.sweep() == []
    now[0] += 86400
    assert own.sweep() == [short.key_id]
    assert keys.verify(short.secret) is None and keys.verify(lasting.secret) is not None
    with pytest.raises(IdentityError, match="expires"):
        await own.create(encode_as(OTHER_USER, here), expires_days=100000)


# ---- the CLI through the real gRPC server -----------------------------------------------------------------------
@dataclass
class Served:
    config: Path
    keys: KeyStore


@pytest.fixture
async def served(tmp_path: Path, sockets: tuple[str, str]) -> AsyncIterator[Served]:
    here, _ = sockets
    own, keys = own_keys(tmp_path, here)
    server = grpc.aio.server()
    # An admin token is set: the user's calls must pass without it.
    admin_pb2_grpc.add_AdminServicer_to_server(AdminService(None, None, keys, "admin-secret",  # type: ignore[arg-type]
                                                            own_keys=own), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    config = tmp_path / "slinfer.toml"
    config.write_text(f'[controller]\naddress = "127.0.0.1:{port}"\nmunge_socket = "{here}"\n')
    try:
        yield Served(config, keys)
    finally:
        await server.stop(None)


async def run_cli(s: Served, *argv: str) -> int:
    return await asyncio.to_thread(cli.main, [*argv, "--config", str(s.config)])


@needs_munged
async def test_cli_key_create_list_revoke_without_a_token(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    assert await run_cli(served, "key", "create", "--account", "chem", "--name", "nb") == 0
    out = capsys.readouterr().out
    key_id, secret = out.split("key id: ")[1].split()[0], out.split("secret: ")[1].split()[0]
    assert "user: root" in out and "account: chem" in out
    assert served.keys.verify(secret) is not None
    assert await run_cli(served, "key", "list") == 0
    listing = capsys.readouterr().out
    assert key_id in listing and "nb" in listing and secret not in listing
    assert await run_cli(served, "key", "create", "--account", "biology") == 1
    assert "no association" in capsys.readouterr().err
    assert await run_cli(served, "keys", "list") == 1  # the admin API still wants the token
    assert "unauthenticated" in capsys.readouterr().err
    assert await run_cli(served, "key", "revoke", key_id) == 0
    assert served.keys.verify(secret) is None
    assert await run_cli(served, "key", "revoke", key_id) == 1
    assert "no key" in capsys.readouterr().err


@needs_munged
async def test_the_users_port_serves_own_keys_and_nothing_else(tmp_path: Path, sockets: tuple[str, str],
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    here, _ = sockets
    own, keys = own_keys(tmp_path, here)
    cfg = parse_config({"controller": {"token": "admin-secret"}})
    cfg = dataclasses.replace(cfg, controller=dataclasses.replace(cfg.controller, user_listen="127.0.0.1:0"))
    admin = AdminService(None, None, keys, "admin-secret", own_keys=own)  # type: ignore[arg-type]
    server, port = user_server(cfg, admin)
    await server.start()
    config = tmp_path / "user.toml"
    # The user's config knows no token; the admin's port is elsewhere (nothing listens on it).
    config.write_text(f'[controller]\naddress = "127.0.0.1:1"\nuser_address = "127.0.0.1:{port}"\n'
                      f'munge_socket = "{here}"\n')
    try:
        argv = ["--config", str(config)]
        assert await asyncio.to_thread(cli.main, ["key", "create", "--account", "physics", *argv]) == 0
        secret = capsys.readouterr().out.split("secret: ")[1].split()[0]
        assert (info := keys.verify(secret)) is not None and (info.user, info.account) == ("root", "physics")
        # Even with the admin's token, the admin's methods are not on this port.
        config.write_text(config.read_text().replace('address = "127.0.0.1:1"', f'address = "127.0.0.1:{port}"')
                          + 'token = "admin-secret"\n')
        assert await asyncio.to_thread(cli.main, ["keys", "list", *argv]) == 1
        assert "unimplemented" in capsys.readouterr().err
    finally:
        await server.stop(None)


# ---- usage per user and account ---------------------------------------------------------------------------------
def _meter(prompt: int, completion: int) -> Meter:
    meter = Meter()
    meter.prompt_tokens, meter.completion_tokens, meter.reported = prompt, completion, True
    return meter


@needs_munged
async def test_usage_per_user_and_account_a_user_sees_only_their_own(
        tmp_path: Path, sockets: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    here, _ = sockets
    own, keys = own_keys(tmp_path, here)
    ledger = UsageLedger(tmp_path / "usage")
    theirs = await own.create(encode_as(OTHER_USER, here))  # chem
    mine_physics = await own.create(encode_as("root", here), account="physics")
    mine_chem = await own.create(encode_as("root", here), account="chem")
    admins, _ = keys.create("service", "slinfer")
    for key_id, account, tokens in ((theirs.key_id, "chem", 5), (mine_physics.key_id, "physics", 7),
                                    (mine_chem.key_id, "chem", 11), (admins, "slinfer", 13)):
        ledger.record(key_id, "k", account, "tiny", 200, _meter(1, tokens))
    await own.revoke(encode_as(OTHER_USER, here), theirs.key_id)  # usage stays the user's after a revoke
    admin = AdminService(None, None, keys, "admin-secret", usage=ledger, own_keys=own)  # type: ignore[arg-type]
    server = grpc.aio.server()
    admin_pb2_grpc.add_AdminServicer_to_server(admin, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    admin_cfg, user_cfg = tmp_path / "admin.toml", tmp_path / "user.toml"
    admin_cfg.write_text(f'[controller]\naddress = "127.0.0.1:{port}"\ntoken = "admin-secret"\n')
    user_cfg.write_text(f'[controller]\naddress = "127.0.0.1:{port}"\nmunge_socket = "{here}"\n')

    errors: list[str] = []

    async def usage(cfg: Path, *argv: str) -> tuple[int, list[dict[str, str]]]:
        code = await asyncio.to_thread(cli.main, ["usage", "--format", "csv", *argv, "--config", str(cfg)])
        said = capsys.readouterr()
        errors.append(said.err)
        return code, list(csv.DictReader(io.StringIO(said.out))) if code == 0 else []

    try:
        assert await asyncio.to_thread(cli.main, ["keys", "list", "--config", str(admin_cfg)]) == 0
        listing = capsys.readouterr().out  # the admin sees every key and its owner
        assert "USER" in listing and any(mine_chem.key_id in line and line.rstrip().endswith("root")
                                         for line in listing.splitlines())
        code, rows = await usage(admin_cfg)  # the admin sees everything
        assert code == 0 and {(r["user"], r["account"], r["completion_tokens"]) for r in rows} == {
            (OTHER_USER, "chem", "5"), ("root", "physics", "7"), ("root", "chem", "11"), ("", "slinfer", "13")}
        code, rows = await usage(admin_cfg, "--account", "chem")
        assert {(r["user"], r["completion_tokens"]) for r in rows} == {(OTHER_USER, "5"), ("root", "11")}
        code, rows = await usage(admin_cfg, "--user", OTHER_USER)
        assert [(r["key_id"], r["account"]) for r in rows] == [(theirs.key_id, "chem")]
        # A user (no token in their config) sees their own only, by munge; another's is refused.
        code, rows = await usage(user_cfg)
        assert code == 0 and {(r["user"], r["account"]) for r in rows} == {("root", "physics"), ("root", "chem")}
        code, rows = await usage(user_cfg, "--account", "chem")
        assert [r["key_id"] for r in rows] == [mine_chem.key_id]
        code, _ = await usage(user_cfg, "--user", OTHER_USER)
        assert code == 1 and "only your own usage" in errors[-1]
        # A coordinator of chem (Slurm's flag) sees chem's usage, every user's; root coordinates nothing.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = admin_pb2_grpc.AdminStub(channel)

            async def as_other(account: str) -> set[tuple[str, int]]:
                reply = await stub.OwnUsage(admin_pb2.OwnUsageRequest(
                    credential=encode_as(OTHER_USER, here), query=admin_pb2.UsageRequest(account=account)))
                return {(r.user, r.completion_tokens) for r in reply.rows}

            assert await as_other("chem") == {(OTHER_USER, 5), ("root", 11)}
            assert await as_other("physics") == set()  # not its coordinator: its own there, none
        code, rows = await usage(user_cfg, "--account", "chem", "--user", OTHER_USER)
        assert code == 1 and "only your own usage" in errors[-1]  # root is no coordinator of chem
    finally:
        await server.stop(None)
        ledger.close()
