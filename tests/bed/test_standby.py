"""A standby controller without Kubernetes, on the bed's MariaDB (issue 35 point 5): two controllers, each with
a state folder of its own (as on two hosts), share only a database of slinfer's own on slurmdbd's server
([state].database, leader_election). Under 16-way load through the gateway tier with a key made before, the
leader is killed with SIGKILL; the standby takes over (it listens on nothing until then), serves the same keys,
and the ledger counts every request exactly once: the client's count of answered requests equals the ledger's.
Positive control: before the kill the standby submitted nothing and the leader did."""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from slinfer.dev import accounting, devcluster
from tests.bed.test_gateway_tier import MESSAGES, MODEL, Load, _get
from tests.fakes.slurmbed import SlurmBed, wait_until

pytestmark = pytest.mark.bed
# The tier's port on the bed: clear of the bed's own and of the other modules' tiers (port_base + 82, 84, 86, 87).
TIER_OFFSET = 85
# slinfer's own database on the bed's MariaDB, and its user (slurmdbd's are `slurm` and slurm_acct_db_*).
DATABASE = "slinfer_state"
DB_USER = "slinfer"
# A short lease keeps the test short: the standby takes over 6 s after the last renewal it saw.
LEASE_S = 6.0
RENEW_S = 1.0

_wait = functools.partial(wait_until, tolerating=(OSError,))


@dataclass
class Pair:
    bed: SlurmBed
    configs: dict[str, Path]
    logs: dict[str, Path]
    url: str


def _config(bed: devcluster.Bed, name: str, secret: Path) -> Path:
    """The bed's config with a state folder of this controller's own and the shared database."""
    text = bed.config.read_text()
    text, found = re.subn(r'(?m)^state_dir = "([^"]*)"$', lambda m: f'state_dir = "{m.group(1)}-{name}"', text)
    assert found == 1
    text += (f'\n[state]\ndatabase = "mysql://{DB_USER}@127.0.0.1:{bed.mariadb_port}/{DATABASE}"\n'
             f'password_file = "{secret}"\nleader_election = true\nlease_duration_s = {LEASE_S}\n'
             f'renew_interval_s = {RENEW_S}\n')
    path = bed.state / f"slinfer-{name}.toml"
    path.write_text(text)
    return path


def _start(bed: devcluster.Bed, name: str, config: Path) -> None:
    devcluster.launch(bed, f"controller-{name}", [f"{sys.prefix}/bin/slinfer-controller", "--config", str(config)])


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def pair(slurm_bed: SlurmBed) -> Iterator[Pair]:
    bed = slurm_bed.bed
    slurm_bed.cleanup_jobs()
    slurm_bed.run("scancel", "--name", f"slinfer-{MODEL}", check=False)
    _wait("no controller job", lambda: not slurm_bed.controller_jobs(), 120)
    secret = bed.state / "slinfer-db.secret"
    password = accounting.password(secret)
    accounting.sql(bed.database, f"DROP DATABASE IF EXISTS `{DATABASE}`; CREATE DATABASE `{DATABASE}`; "
                                 f"CREATE USER IF NOT EXISTS '{DB_USER}'@'127.0.0.1' IDENTIFIED BY '{password}'; "
                                 f"GRANT ALL PRIVILEGES ON `{DATABASE}`.* TO '{DB_USER}'@'127.0.0.1';")
    devcluster.stop_daemon(bed, "controller")
    configs = {name: _config(bed, name, secret) for name in ("a", "b")}
    logs = {name: bed.logs / f"controller-{name}.out" for name in configs}
    for log in logs.values():
        log.unlink(missing_ok=True)
    url = f"http://127.0.0.1:{bed.port_base + TIER_OFFSET}"
    try:
        _start(bed, "a", configs["a"])
        _wait("controller a serving", lambda: _port_open(bed.builtin_gateway_port), 60)
        _start(bed, "b", configs["b"])
        _wait("controller b on standby", lambda: "waiting for the lease" in logs["b"].read_text(), 30)
        devcluster.start_gateway(bed, bed.port_base + TIER_OFFSET, workers=1)
        yield Pair(slurm_bed, configs, logs, url)
    finally:
        devcluster.stop_daemon(bed, "gateway", grace=60)
        for name in configs:
            devcluster.stop_daemon(bed, f"controller-{name}", grace=30)
        devcluster.start_controller(bed)
        slurm_bed.retire_models(MODEL)
        accounting.sql(bed.database, f"DROP DATABASE IF EXISTS `{DATABASE}`")


def _key(bed: SlurmBed, name: str) -> tuple[str, str]:
    out = bed.run(sys.executable, "-m", "slinfer.cli.main", "keys", "create", name).stdout
    return (re.search(r"key id: (\S+)", out).group(1),  # type: ignore[union-attr]
            re.search(r"secret: (\S+)", out).group(1))  # type: ignore[union-attr]


def _ledger(bed: SlurmBed, key_id: str) -> tuple[int, int]:
    out = bed.run(sys.executable, "-m", "slinfer.cli.main", "usage", "--key", key_id, "--format", "json").stdout
    rows = json.loads(out)
    return sum(int(r["requests"]) for r in rows), sum(int(r["failed"]) for r in rows)


def _served(url: str, secret: str, timeout: float = 120) -> bool:
    """One request with `secret` answered through the tier; False while the tier does not know the key yet."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=secret, timeout=timeout, max_retries=0)
    try:
        answer = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
    except openai.AuthenticationError:
        return False
    return answer.choices[0].message.content is not None


def test_the_standby_takes_over_with_the_same_keys_and_counts_every_request_once(pair: Pair) -> None:
    bed, url = pair.bed, pair.url
    key_id, secret = _key(bed, "before-the-kill")
    # A scale from zero: the request waits in the tier's queue while tiny starts (minutes on a loaded machine).
    _wait("the key answered through the tier", lambda: _served(url, secret, timeout=600), 600, 0.2)
    answered = 1
    # A key of the test's own: its ledger rows are the test's alone.
    load = Load(url, 16, key=secret, max_tokens=16).start()
    try:
        time.sleep(5)
        # The positive control: the leader scaled (it submitted), the standby, alive and watching, did nothing.
        a_log, b_log = pair.logs["a"].read_text(), pair.logs["b"].read_text()
        assert "submitted job" in a_log and "submitted job" not in b_log, b_log[-2000:]
        assert "leads (generation" not in b_log and devcluster.daemon_pid(bed.bed, "controller-b")
        before = load.outcomes["ok"]
        os.kill(devcluster.daemon_pid(bed.bed, "controller-a"), signal.SIGKILL)
        killed = time.monotonic()
        _wait("the tier seeing a gone", lambda: _get(f"{url}/healthz")["controller"] == "unreachable", 10, 0.05)
        _wait("b leading", lambda: "leads (generation 2)" in pair.logs["b"].read_text(), 60, 0.05)
        lead = time.monotonic() - killed
        _wait("b serving", lambda: _port_open(bed.bed.builtin_gateway_port), 60, 0.05)
        up = time.monotonic() - killed
        _wait("the tier connected to b", lambda: _get(f"{url}/healthz")["controller"] == "connected", 90, 0.05)
        tier = time.monotonic() - killed
        # A key the new leader makes, first answered through the tier: the whole control plane is back.
        _, fresh = _key(bed, "after-the-kill")
        _wait("a key made after the takeover answered", lambda: _served(url, fresh), 90, 0.1)
        served = time.monotonic() - killed
        time.sleep(2)
    finally:
        outcomes = load.stop()
    print(f"\nkill -> b leads {lead:.1f}s, b serving {up:.1f}s, tier connected {tier:.1f}s, a key made by b "
          f"answered {served:.1f}s; load {dict(outcomes)}, {outcomes['ok'] - before} answered after the kill")
    assert set(outcomes) == {"ok"}, f"failed requests: {dict(outcomes)} {load.errors[:5]}"
    assert outcomes["ok"] > before > 0
    assert _served(url, secret)  # the key made before the kill, on the new leader
    answered += outcomes["ok"] + 1
    # Exactly once: every answered request in the ledger (the tier reports every 0.5 s), none twice.
    counted = _wait("the ledger counting every request", lambda: _ledger(bed, key_id)[0] >= answered, 30, 0.5)
    time.sleep(2)  # a report more: a double count would show now
    assert _ledger(bed, key_id) == (answered, 0), f"client {answered}, ledger {_ledger(bed, key_id)}"
    print(f"ledger: {answered} requests of the key made before the kill, each counted once ({counted:.1f}s)")
