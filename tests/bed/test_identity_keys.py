"""Keys from the site's own identity on the real bed (issue 30): the bed's unprivileged users run
`slinfer key` with the bed's real munged and slurmdbd, reach the controller's users' port (TLS, no client
certificate), and use their key through the controller's gateway and a `slinfer-gateway --workers 2` tier."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import openai
import pytest

from slinfer.dev import devcluster
from slinfer.v1 import admin_pb2, admin_pb2_grpc
from tests.fakes.slurmbed import SlurmBed, wait_until

pytestmark = pytest.mark.bed
MODEL = "tiny"
ALICE, BOB = devcluster.BED_USERS
# The tier's port on the bed: clear of the bed's own (port_base + 17..20, 80, 90, 91, 1000-1999) and of
# test_gateway_tier's (82).
TIER_OFFSET = 84
# A revoked key must be refused by every tier worker within this (the feed sends the removal at once).
REVOKE_BOUND_S = 5.0


class Users:
    """What the bed's users need to run `slinfer key`: a config they can read (the users' address, the CA, the
    bed's munge socket), in a folder they can reach."""

    def __init__(self, bed: SlurmBed) -> None:
        self.bed = bed
        self.folder = Path(tempfile.mkdtemp(prefix="slinfer-keys-"))
        self.folder.chmod(0o755)
        ca = self.folder / "ca.pem"
        shutil.copy(bed.bed.tls_dir / "ca.pem", ca)
        ca.chmod(0o644)
        self.address = f"{bed.bed.head_address}:{bed.bed.controller_port + 1}"
        self.config = self.folder / "slinfer.toml"
        self.config.write_text(f'[controller]\nuser_address = "{self.address}"\ntls_ca = "{ca}"\n'
                               f'munge_socket = "{bed.bed.munge_socket}"\n')
        self.config.chmod(0o644)

    def key(self, user: str, *args: str) -> subprocess.CompletedProcess[str]:
        return self.bed.as_user(user, f"{sys.prefix}/bin/slinfer", "key", *args, "--config", str(self.config))

    def credential(self, user: str, socket: Path | None = None) -> str:
        return self.bed.as_user(user, "munge", "--no-input", f"--socket={socket or self.bed.bed.munge_socket}"
                                ).stdout.strip()

    def stub(self) -> admin_pb2_grpc.AdminStub:
        creds = grpc.ssl_channel_credentials(root_certificates=(self.folder / "ca.pem").read_bytes())
        return admin_pb2_grpc.AdminStub(grpc.secure_channel(self.address, creds))


def _made(out: str) -> tuple[str, str]:
    return out.split("key id: ")[1].split()[0], out.split("secret: ")[1].split()[0]


def _status(url: str, secret: str) -> int:
    request = urllib.request.Request(f"{url}/v1/models", headers={"Authorization": f"Bearer {secret}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.fixture(scope="module")
def users(slurm_bed: SlurmBed) -> Iterator[Users]:
    slurm_bed.cleanup_jobs()
    devcluster.start_gateway(slurm_bed.bed, slurm_bed.bed.port_base + TIER_OFFSET, workers=2)
    u = Users(slurm_bed)
    try:
        yield u
    finally:
        devcluster.stop_daemon(slurm_bed.bed, "gateway", grace=60)
        slurm_bed.retire_models(MODEL)
        shutil.rmtree(u.folder, ignore_errors=True)


def test_a_user_makes_a_key_uses_it_and_is_charged(users: Users) -> None:
    bed = users.bed
    began = time.monotonic()
    made = users.key(ALICE, "create", "--account", "physics", "--name", "nb")
    took = time.monotonic() - began
    assert made.returncode == 0, made.stderr
    key_id, secret = _made(made.stdout)
    assert f"user: {ALICE}" in made.stdout and "account: physics" in made.stdout
    stub = users.stub()
    began = time.monotonic()
    rpc = stub.CreateOwnKey(admin_pb2.OwnKeyCreateRequest(credential=users.credential(BOB)), timeout=15)
    rpc_took = time.monotonic() - began
    assert (rpc.user, rpc.account) == (BOB, "chem")  # bob's default account
    print(f"\nkey creation: `slinfer key create` as {ALICE} {took * 1000:.0f} ms wall (CLI start included); "
          f"munge -n + CreateOwnKey RPC {rpc_took * 1000:.0f} ms")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{bed.bed.gateway_port}/v1", api_key=secret, timeout=300,
                           max_retries=0)
    answer = client.chat.completions.create(model=MODEL, max_tokens=4,
                                            messages=[{"role": "user", "content": "hello"}])
    assert answer.choices[0].message.content is not None
    # The ledger charges the key, and the key is (alice, physics): through the gateway tier (the bed's default)
    # usage reaches the controller's ledger with the tier's next report (every 0.5 s), not with the answer.
    charged: list[dict[str, str]] = []

    def counted() -> bool:
        nonlocal out
        out = bed.run(sys.executable, "-m", "slinfer.cli.main", "usage", "--key", key_id, "--format", "csv").stdout
        lines = [line.split(",") for line in out.splitlines() if line.strip()]
        charged[:] = [dict(zip(lines[0], r, strict=True)) for r in lines[1:]]
        return bool(charged)

    out = ""
    wait_until("the ledger charging the key", counted, 10, 0.2)
    assert all(r["account"] == "physics" and r["user"] == ALICE for r in charged), out
    # The admin's view per user and per account, and alice's own (munge-proven, no token), agree.
    out = bed.run(sys.executable, "-m", "slinfer.cli.main", "usage", "--user", ALICE, "--account", "physics",
                  "--format", "csv").stdout
    assert key_id in out
    hers = users.bed.as_user(ALICE, f"{sys.prefix}/bin/slinfer", "usage", "--format", "csv", "--config",
                             str(users.config))
    assert hers.returncode == 0, hers.stderr
    assert key_id in hers.stdout and rpc.key_id not in hers.stdout
    peek = users.bed.as_user(ALICE, f"{sys.prefix}/bin/slinfer", "usage", "--user", BOB, "--config",
                             str(users.config))
    assert peek.returncode == 1 and "only your own usage" in peek.stderr
    assert sum(int(r["requests"]) for r in charged) >= 1 and sum(int(r["completion_tokens"]) for r in charged) > 0
    mine = users.key(ALICE, "list")
    assert mine.returncode == 0 and key_id in mine.stdout and rpc.key_id not in mine.stdout


def test_an_account_without_association_is_refused(users: Users) -> None:
    ok = users.key(BOB, "create", "--account", "chem")  # positive control
    assert ok.returncode == 0, ok.stderr
    refused = users.key(BOB, "create", "--account", "physics")
    assert refused.returncode == 1
    assert "no association with Slurm account 'physics'" in refused.stderr
    assert "secret:" not in refused.stdout


def test_replayed_and_foreign_credentials_are_refused(users: Users) -> None:
    stub = users.stub()
    cred = users.credential(ALICE)
    first = stub.ListOwnKeys(admin_pb2.OwnKeysRequest(credential=cred), timeout=15)  # positive control
    assert all(k.user == ALICE for k in first.keys) and first.keys
    with pytest.raises(grpc.RpcError) as replay:
        stub.CreateOwnKey(admin_pb2.OwnKeyCreateRequest(credential=cred), timeout=15)
    assert replay.value.code() == grpc.StatusCode.UNAUTHENTICATED and "replayed" in replay.value.details()
    # A munged with another key, as on another cluster.
    top = Path(tempfile.mkdtemp(prefix="slinfer-foreign-munge-"))
    top.chmod(0o711)
    key = top / "key"
    key.write_bytes(bytes(range(256)) * 4)
    key.chmod(0o600)
    sock = top / "sock"
    foreign = subprocess.Popen(["munged", "-F", "-f", f"--socket={sock}", f"--key-file={key}",
                                f"--pid-file={top}/pid", f"--seed-file={top}/seed", f"--log-file={top}/log"])
    try:
        wait_until("the foreign munged's socket", sock.exists, 10, 0.05)
        with pytest.raises(grpc.RpcError) as other:
            stub.CreateOwnKey(admin_pb2.OwnKeyCreateRequest(credential=users.credential(ALICE, sock)), timeout=15)
        assert other.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "another munge key" in other.value.details()
    finally:
        foreign.terminate()
        foreign.wait(10)
        shutil.rmtree(top, ignore_errors=True)


def test_a_user_cannot_list_or_revoke_anothers_keys_and_a_revoked_key_is_refused_by_every_worker(
        users: Users) -> None:
    bed = users.bed
    made = users.key(ALICE, "create", "--account", "chem", "--name", "shortlived")
    assert made.returncode == 0, made.stderr
    key_id, secret = _made(made.stdout)
    tier = f"http://127.0.0.1:{bed.bed.port_base + TIER_OFFSET}"
    direct = f"http://127.0.0.1:{bed.bed.builtin_gateway_port}"  # the controller's own gateway
    wait_until("the tier knowing the new key", lambda: _status(tier, secret) == 200, 30, 0.05)
    bobs = users.key(BOB, "list")
    assert bobs.returncode == 0 and key_id not in bobs.stdout
    theft = users.key(BOB, "revoke", key_id)
    assert theft.returncode == 1 and "no key" in theft.stderr
    assert _status(direct, secret) == 200 and _status(tier, secret) == 200
    revoked = users.key(ALICE, "revoke", key_id)
    assert revoked.returncode == 0, revoked.stderr
    gone = time.monotonic()
    # Each request is a new connection: the workers share the port, so 40 refusals in a row cover both.
    refused_in_a_row = 0
    first_401 = None
    while refused_in_a_row < 40:
        code = _status(tier, secret)
        refused_in_a_row = refused_in_a_row + 1 if code == 401 else 0
        if code == 401 and first_401 is None:
            first_401 = time.monotonic() - gone
        assert time.monotonic() - gone < REVOKE_BOUND_S, f"still {code} {time.monotonic() - gone:.1f}s after"
    everywhere = time.monotonic() - gone
    assert _status(direct, secret) == 401
    print(f"\nrevocation to refusal (after `slinfer key revoke` returned): first 401 at the tier "
          f"{(first_401 or 0) * 1000:.0f} ms, 40 in a row across both workers by {everywhere * 1000:.0f} ms")


def test_a_coordinator_sees_the_accounts_usage(users: Users) -> None:
    """Bob has no association with physics: he sees his own usage there (none) until slurmdbd makes him a
    coordinator of physics; then `slinfer usage --account physics` shows alice's physics keys too."""
    bed = users.bed
    made = users.key(ALICE, "create", "--account", "physics", "--name", "billed")
    assert made.returncode == 0, made.stderr
    key_id, secret = _made(made.stdout)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{bed.bed.gateway_port}/v1", api_key=secret, timeout=300,
                           max_retries=0)
    client.chat.completions.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "hi"}])

    def bobs_view() -> str:
        seen = bed.as_user(BOB, f"{sys.prefix}/bin/slinfer", "usage", "--account", "physics", "--format", "csv",
                           "--config", str(users.config))
        assert seen.returncode == 0, seen.stderr
        return seen.stdout

    assert key_id not in bobs_view()  # the positive control: no coordinator, no account view
    bed.run("sacctmgr", "-i", "add", "coordinator", "account=physics", f"names={BOB}")
    try:
        assert key_id in bobs_view()
    finally:
        bed.run("sacctmgr", "-i", "remove", "coordinator", "account=physics", f"names={BOB}")
    assert key_id not in bobs_view()
