"""Key create, verify and revoke latency against the number of keys, in SQLite and in MariaDB (issue 35 point 5).

    .venv/bin/python bench/keystore_scale.py [--mysql mysql://USER@HOST:PORT/DB --password-file FILE]
                                             [--rows 100 100000] [--ops 200]

For each backend and each row count: a fresh database filled with that many keys (one bulk insert: how they
got there is not what is measured), then `--ops` creates, verifies (of keys spread over the table) and revokes
through KeyStore, each timed on its own; prints mean and p99 in ms. A cost flat in the number of rows shows as
the same figures at 100 and 100,000. The MariaDB database is made and dropped by the bench (its user needs
CREATE and DROP on it).
"""

from __future__ import annotations

import argparse
import hashlib
import secrets
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from slinfer.controller.keys import KeyStore
from slinfer.controller.store import Database, MysqlDatabase, SqliteDatabase, open_database


def _fill(store: KeyStore, db: Database, rows: int) -> list[str]:
    """`rows` keys written in bulk; returns some of their secrets for verifying."""
    store.create("seed")  # makes the tables
    secrets_kept: list[str] = []
    batch = []
    for i in range(rows):
        secret = f"sk-slinfer-bench-{i}"
        if i % max(1, rows // 1000) == 0:
            secrets_kept.append(secret)
        batch.append((hashlib.sha256(secret.encode()).hexdigest(), f"b{i:011d}", f"bench-{i}", "acct",
                      time.time(), None, None))
        if len(batch) == 5000:
            with db.transaction() as tx:
                tx.executemany("INSERT INTO `keys` VALUES (?, ?, ?, ?, ?, ?, ?)", batch)
            batch = []
    if batch:
        with db.transaction() as tx:
            tx.executemany("INSERT INTO `keys` VALUES (?, ?, ?, ?, ?, ?, ?)", batch)
    return secrets_kept


def _timed(n: int, op: Callable[[int], object]) -> tuple[float, float]:
    times = []
    for i in range(n):
        began = time.perf_counter()
        op(i)
        times.append((time.perf_counter() - began) * 1000)
    times.sort()
    return statistics.fmean(times), times[min(len(times) - 1, int(len(times) * 0.99))]


def measure(name: str, make: Callable[[], Database], rows: int, ops: int, folder: Path) -> None:
    db = make()
    seed = KeyStore(folder / "keys.json", db=db)
    kept = _fill(seed, db, rows)
    began = time.perf_counter()  # a controller's start: every key read once
    store = KeyStore(folder / "keys.json", db=make())
    load_s = time.perf_counter() - began
    made: list[str] = []
    create = _timed(ops, lambda i: made.append(store.create(f"new-{i}")[0]))
    verify = _timed(ops, lambda i: store.verify(kept[i % len(kept)]))
    revoke = _timed(ops, lambda i: store.revoke(made[i]))
    assert all(store.verify(s) is not None for s in kept[:10])
    print(f"| {name} | {rows:,} | {create[0]:.2f} / {create[1]:.2f} | {verify[0]:.3f} / {verify[1]:.3f} | "
          f"{revoke[0]:.2f} / {revoke[1]:.2f} | {load_s:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mysql", default="")
    parser.add_argument("--password-file", default="")
    parser.add_argument("--rows", type=int, nargs="+", default=[100, 100000])
    parser.add_argument("--ops", type=int, default=200)
    args = parser.parse_args()
    print("| database | keys | create ms mean / p99 | verify ms mean / p99 | revoke ms mean / p99 | start s |")
    print("|---|---|---|---|---|---|")
    for rows in args.rows:
        with tempfile.TemporaryDirectory() as tmp:
            measure("SQLite", lambda tmp=tmp: SqliteDatabase(Path(tmp) / "slinfer.db"), rows, args.ops, Path(tmp))
        if args.mysql:
            import pymysql

            base = open_database(args.mysql, args.password_file, "/nonexistent")
            assert isinstance(base, MysqlDatabase)
            conn_args = dict(base._args)
            name = f"{conn_args['database']}_bench_{secrets.token_hex(3)}"
            admin = pymysql.connect(**{**conn_args, "database": None}, autocommit=True)
            admin.cursor().execute(f"CREATE DATABASE `{name}`")
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    measure("MariaDB", lambda name=name, conn_args=conn_args: MysqlDatabase(
                        str(conn_args["host"]), int(conn_args["port"]), str(conn_args["user"]),
                        str(conn_args["password"]), name), rows, args.ops, Path(tmp))
            finally:
                admin.cursor().execute(f"DROP DATABASE `{name}`")
                admin.close()


if __name__ == "__main__":
    main()
