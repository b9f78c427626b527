"""The controller's database: client keys, pins and the usage ledger in one place, SQLite or MariaDB/MySQL.

Responsible for: `Database`, the one small interface the key store (keys.py), the pins (pins.py), the usage
ledger (usage.py) and the database election (election.py) use: reads, and write transactions that check the
fence first (`Fence`: a write of a controller that no longer holds the lease is refused, `Fenced`);
`SqliteDatabase` (a one-host site, the default: one file, 0600, under `[controller].state_dir`) and
`MysqlDatabase` (a database of slinfer's own on the site's MariaDB or MySQL, e.g. slurmdbd's server, through
PyMySQL, so that a standby controller on another host reads the same keys, pins and ledger); `open_database`,
which makes one from `[state].database`; moving an earlier version's SQLite key database into MariaDB on start.
Not responsible for: the tables' meaning (each module makes and reads its own), or who leads (election.py).

The SQL the modules write is one dialect: `?` placeholders, backquoted names, VARCHAR/BIGINT/DOUBLE columns and
`INSERT OR IGNORE` (written `INSERT IGNORE` for MySQL); `Database.sql` words it for the server.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import urllib.parse
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

# A MariaDB query that takes longer than this (a server gone, a lock held by a paused leader) fails rather than
# stalling the controller's event loop for good; the election's renewals come every few seconds.
MYSQL_TIMEOUT_S = 5
# How long a SQLite writer waits for another's lock (two processes on one file: a test, `slinfer doctor`).
SQLITE_BUSY_S = 5.0
# The default database's file under [controller].state_dir; the keys' database of the previous version
# (keys.db) is renamed to it on start, so one file holds keys, pins and the ledger.
DEFAULT_FILE = "slinfer.db"
LEGACY_KEYS_FILE = "keys.db"


class StoreError(RuntimeError):
    """The database cannot be reached, read or written; the message names it."""


class Fenced(StoreError):
    """A write refused: this controller no longer holds the lease (another took over since)."""


class Fence(Protocol):
    """What a write transaction checks first, inside the transaction (the election's lease row)."""

    def check(self, tx: Transaction) -> None:
        """Raises Fenced when this process may no longer write."""


class Transaction(Protocol):
    def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Runs one statement; the rows it changed."""

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> int: ...

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...


class Database(Protocol):
    """The store interface: one SQL dialect (see the module's docstring), reads and fenced write transactions."""

    # "sqlite" or "mysql".
    dialect: str
    # Where it is, for messages: a file, or mysql://user@host:port/db (never the password).
    name: str
    # Set by the database election once this controller leads; every write transaction checks it.
    fence: Fence | None

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...

    def transaction(self, fenced: bool = True) -> contextlib.AbstractContextManager[Transaction]:
        """A write transaction: committed when the block ends, rolled back on an exception. With `fenced`
        (the default) the fence is checked first, inside it. Raises StoreError (Fenced)."""

    def close(self) -> None: ...


def _mysql_sql(sql: str) -> str:
    return sql.replace("INSERT OR IGNORE", "INSERT IGNORE").replace("?", "%s")


class _SqliteTx:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        return self._db.execute(sql, tuple(args)).rowcount

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> int:
        return self._db.executemany(sql, [tuple(r) for r in rows]).rowcount

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._db.execute(sql, tuple(args)).fetchall()


class SqliteDatabase:
    """One SQLite file (0600, its folder 0700), made on the first use; writes are `BEGIN IMMEDIATE` (one writer
    at a time, the fence check inside) and `synchronous = FULL`."""

    dialect = "sqlite"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.name = str(self.path)
        self.fence: Fence | None = None
        self._db: sqlite3.Connection | None = None
        # The gateway's event loop and query_async's thread share the connection: one statement at a time.
        self._lock = threading.RLock()

    def _connect(self) -> sqlite3.Connection:
        if self._db is not None:
            return self._db
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # mkdir's mode binds only a folder it makes: one that exists (the state dir) is forced too.
            self.path.parent.chmod(0o700)
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            self.path.chmod(0o600)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=SQLITE_BUSY_S)
            db.execute("PRAGMA synchronous = FULL")
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"{self.name}: cannot open the database: {exc}") from exc
        self._db = db
        return db

    def exists(self) -> bool:
        return self._db is not None or self.path.exists()

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return self._connect().execute(sql, tuple(args)).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"{self.name}: cannot read the database: {exc}") from exc

    @contextlib.contextmanager
    def transaction(self, fenced: bool = True) -> Iterator[Transaction]:
        with self._lock:
            db = self._connect()
            try:
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StoreError(f"{self.name}: cannot write the database: {exc}") from exc
            tx = _SqliteTx(db)
            try:
                if fenced and self.fence is not None:
                    self.fence.check(tx)
                yield tx
            except BaseException as exc:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise StoreError(f"{self.name}: cannot write the database: {exc}") from exc
                raise
            try:
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise StoreError(f"{self.name}: cannot write the database: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


class _MysqlTx:
    def __init__(self, cursor: Any) -> None:
        self._cursor = cursor

    def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        return int(self._cursor.execute(_mysql_sql(sql), tuple(args)))

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> int:
        if not rows:
            return 0
        return int(self._cursor.executemany(_mysql_sql(sql), [tuple(r) for r in rows]) or 0)

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        self._cursor.execute(_mysql_sql(sql), tuple(args))
        return list(self._cursor.fetchall())


class MysqlDatabase:
    """A database on a MariaDB or MySQL server, through PyMySQL: one connection (re-made after an error),
    transactions at REPEATABLE READ with the fence's row read `FOR UPDATE` first."""

    dialect = "mysql"

    def __init__(self, host: str, port: int, user: str, password: str, database: str) -> None:
        self._args = {"host": host, "port": port, "user": user, "password": password, "database": database}
        self.name = f"mysql://{user}@{host}:{port}/{database}"
        self.fence: Fence | None = None
        self._conn: Any = None
        self._lock = threading.RLock()

    def _connect(self) -> Any:
        if self._conn is not None:
            return self._conn
        try:
            import pymysql
        except ImportError as exc:
            raise StoreError(f"{self.name}: the MariaDB/MySQL driver is missing: install slinfer[mysql] "
                             "(PyMySQL)") from exc
        try:
            self._conn = pymysql.connect(**self._args, autocommit=True, charset="utf8mb4",
                                         connect_timeout=MYSQL_TIMEOUT_S, read_timeout=MYSQL_TIMEOUT_S,
                                         write_timeout=MYSQL_TIMEOUT_S)
        except pymysql.MySQLError as exc:
            raise StoreError(f"{self.name}: cannot connect: {exc}") from exc
        return self._conn

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        import pymysql

        with self._lock:
            try:
                with self._connect().cursor() as cursor:
                    cursor.execute(_mysql_sql(sql), tuple(args))
                    return list(cursor.fetchall())
            except pymysql.MySQLError as exc:
                self._drop()
                raise StoreError(f"{self.name}: cannot read: {exc}") from exc

    @contextlib.contextmanager
    def transaction(self, fenced: bool = True) -> Iterator[Transaction]:
        import pymysql

        with self._lock:
            conn = self._connect()
            try:
                conn.begin()
                cursor = conn.cursor()
            except pymysql.MySQLError as exc:
                self._drop()
                raise StoreError(f"{self.name}: cannot write: {exc}") from exc
            tx = _MysqlTx(cursor)
            try:
                if fenced and self.fence is not None:
                    self.fence.check(tx)
                yield tx
            except BaseException as exc:
                try:
                    conn.rollback()
                except pymysql.MySQLError:
                    self._drop()
                if isinstance(exc, pymysql.MySQLError):
                    self._drop()
                    raise StoreError(f"{self.name}: cannot write: {exc}") from exc
                raise
            finally:
                with contextlib.suppress(Exception):
                    cursor.close()
            try:
                conn.commit()
            except pymysql.MySQLError as exc:
                self._drop()
                raise StoreError(f"{self.name}: cannot write: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._drop()


def open_database(url: str, password_file: str, state_dir: str | Path) -> Database:
    """The database `[state].database` names ("" is `sqlite:///STATE_DIR/slinfer.db`). Raises ValueError with
    the dotted key at fault; the server is reached only at the first use."""
    state = Path(state_dir)
    if not url:
        path = state / DEFAULT_FILE
        legacy = state / LEGACY_KEYS_FILE
        if legacy.exists() and not path.exists():
            legacy.rename(path)  # the previous version's keys' database already has the keys' tables
            log.info("renamed %s to %s (keys, pins and the usage ledger in one database)", legacy, path)
        return SqliteDatabase(path)
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme == "sqlite":
        if not parsed.path or parsed.netloc:
            raise ValueError(f"state.database: {url!r} is not sqlite:///ABSOLUTE/PATH")
        return SqliteDatabase(parsed.path)
    if parsed.scheme in ("mysql", "mariadb"):
        if parsed.password is not None:
            raise ValueError("state.database: put the password in state.password_file, not in the URL")
        database = parsed.path.lstrip("/")
        if not parsed.hostname or not parsed.username or not database or "/" in database:
            raise ValueError(f"state.database: {url!r} is not mysql://USER@HOST[:PORT]/DATABASE")
        try:
            port = parsed.port or 3306
        except ValueError as exc:
            raise ValueError(f"state.database: {url!r} has no valid port") from exc
        password = ""
        if password_file:
            try:
                password = Path(password_file).read_text().strip()
            except OSError as exc:
                raise ValueError(f"state.password_file: cannot read {password_file}: {exc}") from exc
        return MysqlDatabase(parsed.hostname, port, urllib.parse.unquote(parsed.username), password, database)
    raise ValueError(f"state.database: {url!r} is neither sqlite:///PATH nor mysql://USER@HOST:PORT/DATABASE")
