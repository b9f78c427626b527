"""The controller's database (controller/store.py) and what lives in it: keys, pins and the usage ledger, on SQLite
and, where a server is given, on MariaDB; and the database election (controller/election.py) with an injected
clock: lease expiry, takeover, release, and the fence that refuses a stale leader's write (positive control: the
current leader's write lands).

MariaDB: the server SLINFER_TEST_MYSQL=mysql://USER@HOST:PORT/PREFIX names (with SLINFER_TEST_MYSQL_PASSWORD_FILE),
or else, as root where Debian's mariadbd is installed (CI), a private server of the session's own started as the
bed starts one (slinfer.dev.accounting); each test gets a database PREFIX_<random> of its own, dropped after.
Without either the MariaDB cases skip, and fail where SLINFER_REQUIRE_ARTEFACTS=1 or in CI."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from slinfer.controller.election import DbElection
from slinfer.controller.keys import KeyStore, KeyStoreError
from slinfer.controller.pins import PinStore, PinStoreError
from slinfer.controller.store import Database, Fenced, MysqlDatabase, SqliteDatabase, open_database
from slinfer.controller.usage import DAY_S, Meter, UsageLedger, UsageRow
from tests.unit.test_control_plane_loop_share import _with_ticker
from tests.unit.test_keys import _SlowCommits

MYSQL = os.environ.get("SLINFER_TEST_MYSQL", "")
# The private server's test user may make and drop the tests' databases, and nothing else.
TEST_DB_PREFIX = "slinfer_t"
T0 = 1728000000.0  # 2024-10-04 00:00:00 UTC


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def mysql_server() -> Iterator[tuple[str, str]]:
    """(url, password file) of a MariaDB for the MariaDB cases: SLINFER_TEST_MYSQL's, or a private one."""
    if MYSQL:
        yield MYSQL, os.environ.get("SLINFER_TEST_MYSQL_PASSWORD_FILE", "")
        return
    if os.geteuid() != 0 or not shutil.which("mariadbd"):
        why = "no MariaDB: neither SLINFER_TEST_MYSQL nor root with Debian's mariadbd"
        if os.environ.get("SLINFER_REQUIRE_ARTEFACTS") == "1" or os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    from slinfer.dev import accounting

    folder = Path(tempfile.mkdtemp(prefix="slinfer-test-mysql-"))
    folder.chmod(0o755)  # mariadbd runs as mysql and must reach its folder below this one
    paths = accounting.Paths(folder / "db")
    accounting.install_db(paths)
    port = _free_port()
    server = subprocess.Popen(accounting.mariadbd_argv(paths, port), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not paths.socket.exists():
            assert server.poll() is None, f"mariadbd exited {server.returncode}: {paths.log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "mariadbd did not listen within 60 s"
            time.sleep(0.1)
        secret = secrets.token_hex(12)
        accounting.sql(paths, f"CREATE USER 'slinfer'@'127.0.0.1' IDENTIFIED BY '{secret}'; "
                              f"GRANT ALL PRIVILEGES ON `{TEST_DB_PREFIX}\\_%`.* TO 'slinfer'@'127.0.0.1';")
        password_file = folder / "password"
        password_file.write_text(secret + "\n")
        yield f"mysql://slinfer@127.0.0.1:{port}/{TEST_DB_PREFIX}", str(password_file)
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(params=["sqlite", "mysql"])
def connect(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Database]]:
    """Makes connections to one fresh database: each call is another process's (another host's) connection."""
    made: list[Database] = []
    if request.param == "sqlite":
        def one() -> Database:
            made.append(SqliteDatabase(tmp_path / "slinfer.db"))
            return made[-1]
        yield one
    else:
        url, password_file = request.getfixturevalue("mysql_server")
        import pymysql

        base = open_database(url, password_file, tmp_path)
        assert isinstance(base, MysqlDatabase)
        args = dict(base._args)
        name = f"{args['database']}_{secrets.token_hex(4)}"
        admin = pymysql.connect(**{**args, "database": None}, autocommit=True)
        admin.cursor().execute(f"CREATE DATABASE `{name}`")

        def one() -> Database:
            made.append(MysqlDatabase(str(args["host"]), int(args["port"]), str(args["user"]),
                                      str(args["password"]), name))
            return made[-1]
        try:
            yield one
        finally:
            for db in made:
                db.close()
            admin.cursor().execute(f"DROP DATABASE `{name}`")
            admin.close()
    for db in made:
        db.close()


def _used(prompt: int, completion: int) -> Meter:
    meter = Meter()
    meter.prompt_tokens, meter.completion_tokens = prompt, completion
    return meter


def test_keys_created_on_one_connection_verify_on_another_and_revoke(
        connect: Callable[[], Database], tmp_path: Path) -> None:
    leader = KeyStore(tmp_path / "keys.json", db=connect())
    key_id, secret = leader.create("alice", "physics", 60, 1000, user="alice", expires_at=T0 * 2)
    standby = KeyStore(tmp_path / "keys.json", db=connect())  # the standby reads the same rows
    info = standby.verify(secret)
    assert info is not None and (info.key_id, info.account, info.requests_per_minute, info.tokens_per_day,
                                 info.user) == (key_id, "physics", 60, 1000, "alice")
    assert standby.verify(secret + "x") is None
    assert leader.revoke(key_id)
    heard: list[bytes] = []
    standby.subscribe(heard.append)
    standby.reload()
    assert standby.verify(secret) is None and len(heard) == 1  # the revoke reached the reloaded standby
    assert standby.owner(key_id) == "alice"  # a revoked key's usage is still its user's


def test_an_earlier_versions_key_files_move_into_the_database(connect: Callable[[], Database],
                                                             tmp_path: Path) -> None:
    # An earlier version's keys.db (SQLite) beside keys.json: both move into the controller's database.
    old = KeyStore(tmp_path / "keys.json")
    old_id, old_secret = old.create("from-db")
    legacy = {"keys": [{"sha256": "ab" * 32, "key_id": "fromjson", "name": "from-json", "account": "chem"}]}
    (tmp_path / "keys.json").write_text(json.dumps(legacy))
    store = KeyStore(tmp_path / "keys.json", db=connect())
    assert {k.key_id for k in store.list()} == {old_id, "fromjson"}
    assert store.verify(old_secret) is not None
    assert (tmp_path / "keys.db.migrated").exists() and (tmp_path / "keys.json.migrated").exists()


def test_the_default_database_takes_the_previous_versions_keys_db(tmp_path: Path) -> None:
    _, secret = KeyStore(tmp_path / "keys.json").create("old")
    db = open_database("", "", tmp_path)
    assert isinstance(db, SqliteDatabase) and db.path == tmp_path / "slinfer.db"
    assert not (tmp_path / "keys.db").exists()
    assert KeyStore(tmp_path / "keys.json", db=db).verify(secret) is not None


@pytest.mark.parametrize("url, password_file, key, why", [
    ("postgres://x@h/db", "", "state.database", "neither sqlite"),
    ("sqlite://relative/path", "", "state.database", "ABSOLUTE"),
    ("mysql://u:pw@h:3306/db", "", "state.database", "password_file"),
    ("mysql://h:3306/db", "", "state.database", "USER@HOST"),
    ("mysql://u@h:3306/", "", "state.database", "USER@HOST"),
    ("mysql://u@h:99999/db", "", "state.database", "port"),
    ("mysql://u@h/db", "/nonexistent/pw", "state.password_file", "cannot read"),
])
def test_a_bad_database_setting_names_its_key(url: str, password_file: str, key: str, why: str,
                                              tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=why) as info:
        open_database(url, password_file, tmp_path)
    assert str(info.value).startswith(key + ":")


def test_pins_live_in_the_shared_database(connect: Callable[[], Database], tmp_path: Path) -> None:
    PinStore(tmp_path / "pins.json", connect()).save("tiny", 3)
    assert PinStore(tmp_path / "pins.json", connect()).pins() == {"tiny": 3}


def test_the_ledger_in_the_database_sums_reads_back_and_keeps_todays_totals(
        connect: Callable[[], Database], tmp_path: Path) -> None:
    clock = Clock()
    ledger = UsageLedger(tmp_path / "usage", clock=clock, db=connect())
    ledger.record("k1", "alice", "physics", "m", 200, _used(10, 20))
    ledger.record("k1", "alice", "physics", "m", 500, _used(1, 2))
    ledger.flush()
    clock.t += 10
    ledger.record("k1", "alice", "physics", "m", 200, _used(5, 5))  # pending: queries see it too
    ledger.add_rows([UsageRow(day="2024-10-04", key_id="k2", account="chem", model="m", requests=4,
                              prompt_tokens=4, completion_tokens=8, start=clock.t, end=clock.t)])
    rows = {r.key_id: r for r in ledger.query()}
    assert (rows["k1"].requests, rows["k1"].failed, rows["k1"].prompt_tokens, rows["k1"].completion_tokens) == \
        (3, 1, 16, 27)
    assert rows["k2"].requests == 4 and [r.key_id for r in ledger.query(key_id="k2")] == ["k2"]
    assert [r.key_id for r in ledger.query(since=T0 + 5)] == ["k1", "k2"]
    assert ledger.query(until=T0 + 5)[0].requests == 2
    # add_rows wrote at once: a standby's ledger (another connection) has k2's report without any flush.
    standby = UsageLedger(tmp_path / "usage", clock=clock, db=connect())
    assert standby.tokens_today("k2") == 12 and standby.tokens_today("k1") == 33
    clock.t += DAY_S
    assert standby.tokens_today("k1") == 0  # a new day


def test_the_ledgers_daily_files_move_into_the_database(connect: Callable[[], Database], tmp_path: Path) -> None:
    clock = Clock()
    old = UsageLedger(tmp_path / "usage", clock=clock)
    old.record("k1", "alice", "physics", "m", 200, _used(10, 20))
    old.close()
    ledger = UsageLedger(tmp_path / "usage", clock=clock, db=connect())
    assert [p.name for p in (tmp_path / "usage").iterdir()] == ["usage-2024-10-04.jsonl.migrated"]
    assert ledger.tokens_today("k1") == 30
    assert [(r.requests, r.prompt_tokens) for r in ledger.query()] == [(1, 10)]


# ---- the database election ----------------------------------------------------------------------------------

def test_the_lease_passes_only_after_it_expired_and_never_to_two(connect: Callable[[], Database]) -> None:
    clock = Clock(100.0)
    a = DbElection(connect(), "a", clock=clock, lease_duration_s=10)
    b = DbElection(connect(), "b", clock=clock, lease_duration_s=10)
    c = DbElection(connect(), "c", clock=clock, lease_duration_s=10)
    assert a.step_now() and a.generation == 1  # nobody held it: taken at once
    for _ in range(5):  # the standbys watch a leader that renews: they never lead (the positive control)
        clock.t += 3
        assert a.step_now() and not b.step_now() and not c.step_now()
        assert b.holder == "a"
    clock.t += 9.9  # a stops renewing (killed); 9.9 s is not yet its lease
    assert not b.step_now() and not c.step_now()
    clock.t += 0.2
    assert b.step_now() and b.generation == 2
    assert not c.step_now()  # b won the compare-and-set; c sees the new holder
    assert c.holder == "b"
    assert not a.step_now() and not a.is_leader  # a, back, finds the lease gone


def test_a_stale_leaders_write_is_fenced_off_and_the_new_leaders_lands(connect: Callable[[], Database],
                                                                       tmp_path: Path) -> None:
    clock = Clock(100.0)
    db_a, db_b = connect(), connect()
    a = DbElection(db_a, "a", clock=clock, lease_duration_s=10)
    b = DbElection(db_b, "b", clock=clock, lease_duration_s=10)
    assert a.step_now() and not b.step_now()
    keys_a = KeyStore(tmp_path / "keys.json", db=db_a)
    made, secret = keys_a.create("before")  # the leader's write lands
    clock.t += 11  # a is paused past its lease; b takes over
    assert b.step_now()
    assert a.is_leader  # a has not stepped since: it still believes it leads
    with pytest.raises(KeyStoreError, match="generation 1: write refused"):
        keys_a.create("stale")
    with pytest.raises(PinStoreError, match="write refused"):
        PinStore(tmp_path / "pins.json", db_a).save("tiny", 1)
    ledger_a = UsageLedger(tmp_path / "usage", clock=Clock(), db=db_a)
    with pytest.raises(Fenced):
        ledger_a.add_rows([UsageRow(day="2024-10-04", key_id="k", account="", model="m", requests=1)])
    ledger_a.record("k", "n", "", "m", 200, _used(1, 1))
    ledger_a.flush()
    assert ledger_a.write_errors == 1  # fenced: kept in memory, not written
    keys_b = KeyStore(tmp_path / "keys.json", db=db_b)
    assert [k.name for k in keys_b.list()] == ["before"]  # nothing of a's after the takeover
    assert keys_b.verify(secret) is not None and keys_b.revoke(made)  # the new leader's write lands
    assert UsageLedger(tmp_path / "usage", clock=Clock(), db=db_b).query() == []


def test_a_released_lease_is_taken_at_once_and_a_leader_that_cannot_renew_steps_down(
        connect: Callable[[], Database]) -> None:
    clock = Clock(100.0)
    a = DbElection(connect(), "a", clock=clock, lease_duration_s=10, renew_deadline_s=6)
    b = DbElection(connect(), "b", clock=clock, lease_duration_s=10)
    assert a.step_now() and not b.step_now()
    a.release_now()
    assert not a.is_leader
    assert b.step_now()  # no wait for the duration

    class Down:
        dialect, name, fence = "sqlite", "down", None

        def transaction(self, fenced: bool = True) -> object:
            raise Fenced("down: server gone")

    c = DbElection(connect(), "c", clock=clock, lease_duration_s=10, renew_deadline_s=6)
    assert not c.step_now()  # c first sees b's lease now: the duration counts from here, on c's clock
    clock.t += 11
    assert c.step_now()  # b stopped renewing
    c._db = Down()  # type: ignore[assignment]
    clock.t += 5
    with pytest.raises(Fenced):
        c.step_now()
    assert c.is_leader  # 5 s without a renewal: within its deadline
    clock.t += 2
    with pytest.raises(Fenced):
        c.step_now()
    assert not c.is_leader  # past 6 s: it steps down before a standby may take over at 10


def test_candidates_stepping_at_once_never_deadlock(connect: Callable[[], Database]) -> None:
    """Two controllers' steps at the same moments, many times: each step is one lock on the lease row (an
    INSERT IGNORE and a FOR UPDATE in one transaction deadlocked on MariaDB: error 1213, a leader's renewal lost)."""
    import threading

    clock = Clock(100.0)
    elections = [DbElection(connect(), name, clock=clock, lease_duration_s=10) for name in ("a", "b")]
    assert elections[0].step_now()
    errors: list[Exception] = []
    start = threading.Barrier(2)

    def steps(election: DbElection) -> None:
        for _ in range(40):
            start.wait()
            try:
                election.step_now()
            except Exception as exc:  # counted, then asserted on
                errors.append(exc)

    threads = [threading.Thread(target=steps, args=(e,)) for e in elections]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert elections[0].is_leader and not elections[1].is_leader  # the positive control: it kept renewing


@pytest.mark.parametrize("state, key, why", [
    ('database = "postgres://x@h/db"', "state.database", "neither sqlite"),
    ('password_file = "/etc/pw"', "state.password_file", "mysql:// database only"),
    ("leader_election = true", "state.leader_election", "standby on another host"),
    ("renew_interval_s = 8.0", "state.renew_interval_s", "below half of lease_duration_s"),
    ('database = "mysql://u@h/db"\nleader_election = true\n[kubernetes]\nenabled = true\nleader_election = true',
     "state.leader_election", "choose one"),
])
def test_the_state_sections_errors_name_their_key(state: str, key: str, why: str) -> None:
    import tomllib

    from slinfer.config import ConfigError, parse

    with pytest.raises(ConfigError, match=why) as info:
        parse(tomllib.loads(f'[controller]\nuser = "slinfer"\n[state]\n{state}\n'))
    assert info.value.key == key
    parse(tomllib.loads('[controller]\nuser = "slinfer"\n[state]\ndatabase = "mysql://u@h/db"\n'
                        'leader_election = true\n'))  # the positive control: a valid standby's section


def test_a_controller_that_writes_nothing_leaves_no_database_file(tmp_path: Path) -> None:
    db = open_database("", "", tmp_path / "state")
    PinStore(tmp_path / "state" / "pins.json", db)
    KeyStore(tmp_path / "state" / "keys.json", db=db)
    ledger = UsageLedger(tmp_path / "state" / "usage", clock=Clock(), db=db)
    assert ledger.query() == [] and ledger.tokens_today("k") == 0
    assert not (tmp_path / "state").exists()  # a start that fails later (a port in use) leaves nothing
    ledger.record("k", "n", "", "m", 200, _used(1, 1))
    ledger.flush()
    assert (tmp_path / "state" / "slinfer.db").exists() and ledger.query()[0].requests == 1


async def test_a_gateways_usage_report_commits_while_the_loop_goes_on_and_counts_once_committed(
        tmp_path: Path) -> None:
    clock = Clock()
    slow = _SlowCommits(tmp_path / "slinfer.db")
    ledger = UsageLedger(tmp_path / "usage", clock=clock, db=slow)
    row = UsageRow(day="2024-10-04", key_id="k2", account="chem", model="m", requests=4, prompt_tokens=4,
                   completion_tokens=8, start=clock.t, end=clock.t)
    _, ticks = await _with_ticker(ledger.add_rows_async([row]))
    assert ticks >= 10  # 0.4 s of commit: the loop ran meanwhile
    assert ledger.tokens_today("k2") == 12
    assert UsageLedger(tmp_path / "usage", clock=clock, db=SqliteDatabase(slow.path)).tokens_today("k2") == 12

    async def held() -> None:  # control: add_rows holds the loop for its commit
        ledger.add_rows([row])

    _, ticks = await _with_ticker(held())
    assert ticks <= 1 and ledger.tokens_today("k2") == 24
