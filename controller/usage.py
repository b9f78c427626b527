"""The usage ledger: requests and tokens per client key, model and Slurm account, kept on disk append-only.

Responsible for: counting each answered request of an authenticated key (requests, failed ones, prompt and
completion tokens), summing them in memory per (UTC day, key, account, model) and appending those sums every
`flush_s` (one row per sum and interval, never rewritten) to the controller's database (controller/store.py,
table `usage_sums`, where the daily files of an earlier version are moved on start) or, for a ledger made
without one, to `FOLDER/usage-YYYY-MM-DD.jsonl`; writing a gateway tier's report at once (`add_rows`), before
its ack;
answering how many tokens a key used today (the quota of controller/limits.py) and what was used since a time
(`slinfer usage`). `Meter` reads the token counts of one answer: the engine's `usage` object of a JSON body or
of a stream's final chunk (`stream_options.include_usage`), else one completion token per content chunk of
the stream (then the request is counted as `estimated`, with no prompt tokens). It counts a stream's events
with byte scans over what each read delivered and parses only events that carry `usage` (or an error, or
are not plain `data:` events), so that metering costs the relay little per chunk. Where the gateway asked the
engine for the usage event and the client did not, `UsageFilter` takes that event out of the stream and
meters from it alone.
Not responsible for: refusing requests (limits.py), authenticating keys, or Prometheus metrics.

Memory is bounded by what is pending (sums of at most one flush interval) and one total per key for today,
whatever the request rate. A crash loses at most the last interval of this process's own gateway (a tier's
reports are written before they are acknowledged); a write error keeps the sums in memory and retries at the
next flush.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import msgspec

from slinfer.controller.store import Database, SqliteDatabase, StoreError

log = logging.getLogger(__name__)

DAY_S = 86400
_FILE = re.compile(r"^usage-(\d{4}-\d{2}-\d{2})\.jsonl$")
_EMPTY = re.compile(rb'"(?:content|text)":\s*""')
# The usage-only chunk that ends a stream with stream_options.include_usage: no choices, a usage object.
_USAGE_ONLY = re.compile(rb'"choices":\s*\[\s*\].*"usage":\s*\{|"usage":\s*\{.*"choices":\s*\[\s*\]', re.S)
# A stream's bytes after its last complete event are kept until the rest arrives; an engine's events are
# far smaller than this, so more means a malformed stream and counting stops rather than growing.
MAX_EVENT_BYTES = 1 << 20


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _WithUsage(msgspec.Struct):
    usage: _Usage | None = None


_decode_usage = msgspec.json.Decoder(_WithUsage).decode


class Meter:
    """The token counts of one request's answer, fed its JSON body or its SSE chunks as they are relayed."""

    __slots__ = ("_carry", "completion_tokens", "estimated", "prompt_tokens", "reported")

    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.reported = False  # the engine said its counts
        self.estimated = False  # counted from chunks
        self._carry = b""

    def feed_body(self, body: bytes) -> None:
        try:
            usage = _decode_usage(body).usage
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        if usage is not None:
            self.prompt_tokens, self.completion_tokens, self.reported = (usage.prompt_tokens,
                                                                          usage.completion_tokens, True)

    def feed_chunk(self, chunk: bytes) -> None:
        """Counts the complete events in `chunk` (after what an earlier chunk left unfinished)."""
        data = self._carry + chunk if self._carry else chunk
        end = data.rfind(b"\n\n")
        if end < 0:
            self._carry = data if len(data) <= MAX_EVENT_BYTES else b""
            return
        end += 2
        if end < len(data):
            self._carry = data[end:]
            if len(self._carry) > MAX_EVENT_BYTES:
                self._carry = b""
            data = data[:end]
        else:
            self._carry = b""
        if b'"usage"' in data or b'"error"' in data:
            self._feed_events(data.split(b"\n\n")[:-1])
            return
        if self.reported:
            return
        events = data.count(b"\n\n")
        # Every event a plain `data:` line (as vLLM sends): count with scans; anything else, event by event.
        if data.count(b"\n\ndata:") + data.startswith(b"data:") != events or b"\n\n\n" in data:
            self._feed_events(data.split(b"\n\n")[:-1])
            return
        # vLLM sends one chunk per generated token; its first chat chunk carries only the role.
        tokens = events - data.count(b"[DONE]\n\n")
        if _EMPTY.search(data) is not None:  # rare: the role chunk; count events, not matches
            tokens -= sum(1 for event in data.split(b"\n\n") if _EMPTY.search(event) is not None)
        if tokens > 0:
            self.completion_tokens += tokens
            self.estimated = True

    def _feed_events(self, events: list[bytes]) -> None:
        for event in events:
            event = event.strip()
            if not event.startswith(b"data:"):
                continue
            if b'"usage"' in event and b'"prompt_tokens"' in event:
                self.feed_body(event[5:])
                if self.reported:
                    self.estimated = False
                    continue
            if self.reported or event.endswith(b"[DONE]") or b'"error"' in event[:16]:
                continue
            if _EMPTY.search(event) is not None:
                continue
            self.completion_tokens += 1
            self.estimated = True


class TypedEventMeter(Meter):
    """A Meter for APIs whose streams are typed SSE events (`event: KIND` then `data: ...`): the Responses and
    Messages APIs. Splits the chunks into whole events (an unfinished one waits for the next chunk, up to
    MAX_EVENT_BYTES) and hands each to `on_event(kind, payload)`."""

    __slots__ = ("_rest",)

    def __init__(self) -> None:
        super().__init__()
        self._rest = b""

    def feed_chunk(self, chunk: bytes) -> None:
        data = self._rest + chunk if self._rest else chunk
        events = data.split(b"\n\n")
        self._rest = events.pop()
        if len(self._rest) > MAX_EVENT_BYTES:
            self._rest = b""
        for event in events:
            kind = b""
            payload = b""
            for line in event.split(b"\n"):
                if line.startswith(b"event:"):
                    kind = line[6:].strip()
                elif line.startswith(b"data:"):
                    payload = line[5:]
            self.on_event(kind, payload)

    def on_event(self, kind: bytes, payload: bytes) -> None:
        raise NotImplementedError


class UsageFilter:
    """A stream whose usage event the gateway asked the engine for and the client did not: that event is taken
    out of what the client gets and read into the meter; nothing else of the stream is parsed. Bytes after
    the last complete event are held until the rest arrives (only an event split across reads waits)."""

    __slots__ = ("_carry", "events", "meter")

    def __init__(self, meter: Meter) -> None:
        self.meter = meter
        self.events = 0
        self._carry = b""

    def __call__(self, data: bytes) -> bytes:
        """What of `data` the client gets."""
        if self._carry:
            data = self._carry + data
            self._carry = b""
        end = data.rfind(b"\n\n") + 2
        if end < len(data):
            if end == 1:  # no complete event yet
                if len(data) <= MAX_EVENT_BYTES:
                    self._carry = data
                    return b""
                return data  # not an engine's stream: pass it on as it is
            self._carry = data[end:]
            data = data[:end]
        self.events += data.count(b"\n\n")
        if b'"usage"' not in data:
            return data
        kept = []
        for event in data.split(b"\n\n")[:-1]:
            if event.startswith(b"data:") and _USAGE_ONLY.search(event) and b'"usage"' in event:
                self.meter.feed_body(event[5:])
            else:
                kept.append(event + b"\n\n")
        return b"".join(kept)

    def finish(self) -> bytes:
        """At the stream's end: what is still held (a malformed last event, passed on), and the meter's
        estimate from the events where the engine sent no usage after all."""
        if not self.meter.reported and self.events:
            # One event per token, less [DONE] (and a chat stream's role chunk, which carries none).
            self.meter.completion_tokens = max(0, self.events - 2)
            self.meter.estimated = True
        held, self._carry = self._carry, b""
        return held


@dataclass
class UsageRow:
    """Sums for one key and model: a line of the ledger, or a day of `query`'s answer."""

    day: str  # YYYY-MM-DD, UTC
    key_id: str
    account: str
    model: str
    requests: int = 0
    failed: int = 0  # answered with a status of 400 or more, or left by the client
    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated: int = 0  # requests whose tokens were counted from stream chunks
    key_name: str = ""
    start: float = 0.0  # unix seconds of the first request summed here
    end: float = 0.0  # ... and of the last

    def count(self, now: float, status: int, meter: Meter) -> None:
        """One answered request, at `now`."""
        self.end = now
        self.requests += 1
        if status >= 400:
            self.failed += 1
        self.prompt_tokens += meter.prompt_tokens
        self.completion_tokens += meter.completion_tokens
        if meter.estimated:
            self.estimated += 1

    @staticmethod
    def pending(rows: dict[tuple[str, str, str, str], UsageRow], day: str, key_id: str, key_name: str,
                account: str, model: str, now: float) -> UsageRow:
        """The row of (day, key, account, model) in `rows`, made at `now` when it is the first."""
        row = rows.get((day, key_id, account, model))
        if row is None:
            row = rows[(day, key_id, account, model)] = UsageRow(day=day, key_id=key_id, account=account,
                                                                 model=model, key_name=key_name, start=now)
        return row

    def add(self, other: UsageRow) -> None:
        self.requests += other.requests
        self.failed += other.failed
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.estimated += other.estimated
        self.start = min(self.start, other.start) if self.start else other.start
        self.end = max(self.end, other.end)


_ROW_FIELDS = {f.name for f in fields(UsageRow)}


def day_of(t: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(t))


class UsageLedger:
    """Per-key usage, summed in memory and appended to daily files under `folder`."""

    def __init__(self, folder: str | Path, flush_s: float = 10.0, clock: Callable[[], float] = time.time,
                 db: Database | None = None) -> None:
        self._folder = Path(folder)
        self._flush_s = flush_s
        self._clock = clock
        # The controller's database (controller/store.py): the sums go into its `usage_sums` table, and the
        # daily files of an earlier version in `folder` are moved into it on start. None: the daily files.
        self._db = db
        self._pending: dict[tuple[str, str, str, str], UsageRow] = {}
        self._today = ""
        self._today_tokens: dict[str, int] = {}
        # Keys whose total grew since the gateway feed last asked (None: every key, after a new day; issue 35.7).
        self._grown: set[str] | None = None
        self.write_errors = 0
        # The table is made at the first write (or a read of a database that exists): a controller that fails
        # to start leaves no file behind.
        self._tables = False
        if db is not None:
            self._db_migrate(db)
        self._roll(self._clock())

    # ---- the gateway's side ------------------------------------------------------------------------------
    def record(self, key_id: str, key_name: str, account: str, model: str, status: int, meter: Meter) -> None:
        now = self._clock()
        day = day_of(now)
        if day != self._today:
            self._roll(now)
        UsageRow.pending(self._pending, day, key_id, key_name, account, model, now).count(now, status, meter)
        tokens = meter.prompt_tokens + meter.completion_tokens
        if tokens:
            self._today_tokens[key_id] = self._today_tokens.get(key_id, 0) + tokens
            self._grew(key_id)

    def add_row(self, other: UsageRow) -> None:
        """Adds sums another gateway counted (the gateway tier's reports), as `record` adds one request."""
        if other.day != self._today:
            self._roll(self._clock())
        slot = (other.day, other.key_id, other.account, other.model)
        row = self._pending.get(slot)
        if row is None:
            row = self._pending[slot] = UsageRow(day=other.day, key_id=other.key_id, account=other.account,
                                                 model=other.model, key_name=other.key_name)
        row.add(other)
        if other.day == self._today:
            tokens = other.prompt_tokens + other.completion_tokens
            self._today_tokens[other.key_id] = self._today_tokens.get(other.key_id, 0) + tokens
            self._grew(other.key_id)

    def add_rows(self, rows: list[UsageRow]) -> None:
        """A gateway tier's report: with a database, written before this returns (one transaction, fenced) so
        that the ack the gateway gets means the sums are kept, whatever happens to this process next; raises
        StoreError, and nothing is counted (the gateway keeps them for its next report). Without one, pending
        as `add_row`."""
        if self._db is None or not rows:
            for row in rows:
                self.add_row(row)
            return
        self._db_append(rows)
        self._counted(rows)

    async def add_rows_async(self, rows: list[UsageRow]) -> None:
        """`add_rows` with the database's commit in a thread: a gateway tier's reports come twice a second from
        each gateway, and a commit is an fsync (166-225 ms on the bench's shared disk) that on the controller's
        loop held every other stream. Counted in today's totals once committed."""
        if self._db is None or not rows:
            self.add_rows(rows)
            return
        await asyncio.to_thread(self._db_append, rows)
        self._counted(rows)

    def _counted(self, rows: list[UsageRow]) -> None:
        """Today's totals after `rows` were written."""
        if day_of(self._clock()) != self._today:
            self._roll(self._clock())
        for row in rows:
            if row.day == self._today:
                tokens = row.prompt_tokens + row.completion_tokens
                self._today_tokens[row.key_id] = self._today_tokens.get(row.key_id, 0) + tokens
                self._grew(row.key_id)

    def totals_today(self) -> tuple[str, dict[str, int]]:
        """(UTC day, tokens per key today): what the gateways enforce quotas from."""
        if day_of(self._clock()) != self._today:
            self._roll(self._clock())
        return self._today, dict(self._today_tokens)

    def _grew(self, key_id: str) -> None:
        if self._grown is not None:
            self._grown.add(key_id)

    def totals_grown(self) -> tuple[str, dict[str, int]]:
        """(UTC day, today's totals of the keys whose total grew since the last call; every key's at the first
        call and after a new day): the gateway feed publishes what changed without copying every key's total."""
        if day_of(self._clock()) != self._today:
            self._roll(self._clock())
        grown, self._grown = self._grown, set()
        if grown is None:
            return self._today, dict(self._today_tokens)
        return self._today, {k: self._today_tokens[k] for k in grown if k in self._today_tokens}

    def totals_of(self, key_ids: Iterable[str]) -> tuple[str, dict[str, int]]:
        """(UTC day, today's totals of these keys): a gateway's report is answered with its keys' only."""
        if day_of(self._clock()) != self._today:
            self._roll(self._clock())
        return self._today, {k: self._today_tokens[k] for k in key_ids if k in self._today_tokens}

    def tokens_today(self, key_id: str) -> int:
        if day_of(self._clock()) != self._today:
            self._roll(self._clock())
        return self._today_tokens.get(key_id, 0)

    # ---- persistence -------------------------------------------------------------------------------------
    def _path(self, day: str) -> Path:
        return self._folder / f"usage-{day}.jsonl"

    def _roll(self, now: float) -> None:
        """A new UTC day: today's totals start from what today's file already holds (a restarted controller)."""
        self._today = day_of(now)
        totals: dict[str, int] = {}
        if self._db is not None:
            try:
                db = self._readable()
                for key_id, tokens in [] if db is None else db.query(
                        "SELECT key_id, SUM(prompt_tokens + completion_tokens) FROM usage_sums WHERE `day` = ? "
                        "GROUP BY key_id", (self._today,)):
                    totals[str(key_id)] = int(tokens or 0)
            except StoreError as exc:
                log.error("usage ledger: cannot read today's totals from %s: %s", self._db.name, exc)
        else:
            for row in self._read(self._path(self._today)):
                totals[row.key_id] = totals.get(row.key_id, 0) + row.prompt_tokens + row.completion_tokens
        for row in self._pending.values():
            if row.day == self._today:
                totals[row.key_id] = totals.get(row.key_id, 0) + row.prompt_tokens + row.completion_tokens
        self._today_tokens = totals
        self._grown = None

    def flush(self) -> None:
        """Appends the pending sums to their day's file; on an error they stay pending."""
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        if self._db is not None:
            try:
                self._db_append(list(pending.values()))
            except StoreError as exc:
                self.write_errors += 1
                log.error("usage ledger: cannot write %d sums to %s (kept in memory, retried in %.0f s): %s",
                          len(pending), self._db.name, self._flush_s, exc)
                self._keep(list(pending.values()))
            return
        by_day: dict[str, list[UsageRow]] = {}
        for row in pending.values():
            by_day.setdefault(row.day, []).append(row)
        for day, rows in by_day.items():
            text = "".join(json.dumps(row.__dict__, separators=(",", ":")) + "\n" for row in rows)
            path = self._path(day)
            try:
                self._folder.mkdir(mode=0o700, parents=True, exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, text.encode())
                finally:
                    os.close(fd)
            except OSError as exc:
                self.write_errors += 1
                log.error("usage ledger: cannot append %d sums to %s (kept in memory, retried in %.0f s): %s",
                          len(rows), path, self._flush_s, exc)
                self._keep(rows)

    def _keep(self, rows: list[UsageRow]) -> None:
        """Sums a write failed to keep go back to pending, merged with what came since."""
        merge_back(self._pending, rows)

    # ---- the database ------------------------------------------------------------------------------------
    def _readable(self) -> Database | None:
        """The database to read, None while it has nothing (a SQLite file not made yet)."""
        db = self._db
        if db is None or (not self._tables and isinstance(db, SqliteDatabase) and not db.exists()):
            return None
        self._db_tables(db)
        return db

    def _db_tables(self, db: Database) -> None:
        """The `usage_sums` table: one row per flushed sum (append-only, as the files were), indexed by day and
        key (today's totals) and by start (`slinfer usage --since`)."""
        if self._tables:
            return
        columns = ("`day` CHAR(10) NOT NULL, key_id VARCHAR(64) NOT NULL, account VARCHAR(128) NOT NULL, "
                   "model VARCHAR(128) NOT NULL, requests BIGINT NOT NULL, failed BIGINT NOT NULL, "
                   "prompt_tokens BIGINT NOT NULL, completion_tokens BIGINT NOT NULL, estimated BIGINT NOT NULL, "
                   "key_name VARCHAR(128) NOT NULL, `start` DOUBLE NOT NULL, `end` DOUBLE NOT NULL")
        with db.transaction(fenced=False) as tx:
            if db.dialect == "mysql":
                tx.execute(f"CREATE TABLE IF NOT EXISTS usage_sums ({columns}, INDEX by_day (`day`, key_id), "
                           "INDEX by_start (`start`))")
            else:
                tx.execute(f"CREATE TABLE IF NOT EXISTS usage_sums ({columns})")
                tx.execute("CREATE INDEX IF NOT EXISTS usage_by_day ON usage_sums (`day`, key_id)")
                tx.execute("CREATE INDEX IF NOT EXISTS usage_by_start ON usage_sums (`start`)")
        self._tables = True

    def _db_append(self, rows: list[UsageRow]) -> None:
        db = self._db
        assert db is not None
        self._db_tables(db)
        with db.transaction() as tx:
            tx.executemany("INSERT INTO usage_sums VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           [(r.day, r.key_id, r.account, r.model, r.requests, r.failed, r.prompt_tokens,
                             r.completion_tokens, r.estimated, r.key_name, r.start, r.end) for r in rows])

    def _db_migrate(self, db: Database) -> None:
        """The daily files of an earlier version go into the table (one transaction), then are renamed
        `.migrated`; a torn line is skipped as a read skips it."""
        try:
            files = sorted(p for p in self._folder.iterdir() if _FILE.match(p.name))
        except (FileNotFoundError, NotADirectoryError):
            return
        if not files:
            return
        rows = [row for path in files for row in self._read(path)]
        try:
            self._db_append(rows)
            for path in files:
                path.rename(path.with_name(path.name + ".migrated"))
        except OSError as exc:
            raise StoreError(f"{self._folder}: cannot move the usage files into {db.name}: {exc}") from exc
        log.info("moved %d usage sums from %d files in %s into %s", len(rows), len(files), self._folder, db.name)

    async def run(self) -> None:
        """Flushes every `flush_s` until cancelled, then once more."""
        try:
            while True:
                await asyncio.sleep(self._flush_s)
                self.flush()
        finally:
            self.flush()

    # ---- reading back ------------------------------------------------------------------------------------
    def _read(self, path: Path) -> Iterator[UsageRow]:
        try:
            f = path.open()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("usage ledger: cannot read %s: %s", path, exc)
            return
        bad = 0
        with f:
            for line in f:
                try:
                    data = json.loads(line)
                    row = UsageRow(**{k: v for k, v in data.items() if k in _ROW_FIELDS})
                except (ValueError, TypeError):
                    bad += 1  # a line cut by a crash mid-write
                    continue
                yield row
        if bad:
            log.warning("usage ledger: %d unreadable line(s) in %s skipped", bad, path)

    def query(self, key_id: str = "", since: float = 0.0, until: float = 0.0) -> list[UsageRow]:
        """Sums per (day, key, account, model) of the sums that started at or after `since` (and before
        `until` when it is set), pending ones included. Reads files: on the event loop, use `query_async`."""
        return self._query(self._snapshot(), key_id, since, until)

    async def query_async(self, key_id: str = "", since: float = 0.0, until: float = 0.0) -> list[UsageRow]:
        """`query`, reading the files in a thread so that the gateway keeps serving meanwhile."""
        return await asyncio.to_thread(self._query, self._snapshot(), key_id, since, until)

    def _snapshot(self) -> list[UsageRow]:
        return [UsageRow(**row.__dict__) for row in self._pending.values()]

    def _db_rows(self, db: Database, key_id: str, since: float, until: float) -> list[UsageRow]:
        """The table's sums per (day, key, account, model), summed by the server (one query, by index)."""
        where, args = ["`start` >= ?"], [since]
        if until:
            where.append("`start` < ?")
            args.append(until)
        if key_id:
            where.append("key_id = ?")
            args.append(key_id)
        found = db.query("SELECT `day`, key_id, account, model, SUM(requests), SUM(failed), SUM(prompt_tokens), "
                         "SUM(completion_tokens), SUM(estimated), MAX(key_name), MIN(`start`), MAX(`end`) "
                         f"FROM usage_sums WHERE {' AND '.join(where)} GROUP BY `day`, key_id, account, model",
                         args)
        return [UsageRow(day=str(r[0]), key_id=str(r[1]), account=str(r[2]), model=str(r[3]),
                         requests=int(r[4]), failed=int(r[5]), prompt_tokens=int(r[6]), completion_tokens=int(r[7]),
                         estimated=int(r[8]), key_name=str(r[9]), start=float(r[10]), end=float(r[11]))
                for r in found]

    def _query(self, pending: list[UsageRow], key_id: str, since: float, until: float) -> list[UsageRow]:
        since_day = day_of(since) if since else ""
        until_day = day_of(until) if until else ""
        totals: dict[tuple[str, str, str, str], UsageRow] = {}
        sources: list[UsageRow] = []
        db = self._readable()
        if db is not None:
            sources.extend(self._db_rows(db, key_id, since, until))
        try:
            paths = sorted(self._folder.iterdir()) if self._db is None else []
        except (FileNotFoundError, NotADirectoryError):
            paths = []
        for path in paths:
            m = _FILE.match(path.name)
            if m is None or (since_day and m.group(1) < since_day) or (until_day and m.group(1) > until_day):
                continue
            sources.extend(self._read(path))
        sources.extend(pending)
        for row in sources:
            if (key_id and row.key_id != key_id) or row.start < since or (until and row.start >= until):
                continue
            slot = (row.day, row.key_id, row.account, row.model)
            total = totals.get(slot)
            if total is None:
                totals[slot] = UsageRow(**row.__dict__)
            else:
                total.add(row)
                total.key_name = total.key_name or row.key_name
        return [totals[s] for s in sorted(totals)]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.flush()


def merge_back(pending: dict[tuple[str, str, str, str], UsageRow], rows: list[UsageRow]) -> None:
    """Puts sums that were taken out (for a write or a report that failed) back into `pending`, each merged with
    what its (day, key, account, model) gathered since."""
    for row in rows:
        slot = (row.day, row.key_id, row.account, row.model)
        again = pending.get(slot)
        if again is not None:
            row.add(again)
        pending[slot] = row
