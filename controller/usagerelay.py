"""A gateway tier's usage: what this gateway counted, until the controller's ledger has it, and the totals it
enforces quotas from.

Responsible for: summing each answered request per (UTC day, key, account, model) as the ledger does, handing
the sums over for a report (and taking them back when the report failed), and answering a key's tokens today
as the controller's latest total plus what this gateway counted since. Totals only grow within a day, so an
older table arriving after a newer ack never lowers them.
Not responsible for: persisting anything (the controller's UsageLedger), refusing requests (limits.py), or
talking to the controller (routefeed.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from slinfer.controller.usage import Meter, UsageRow, day_of, merge_back


class UsageRelay:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._pending: dict[tuple[str, str, str, str], UsageRow] = {}
        self._unreported: dict[str, int] = {}  # key id -> tokens counted here, not yet in a total
        self._day = day_of(clock())
        self._totals: dict[str, int] = {}

    def record(self, key_id: str, key_name: str, account: str, model: str, status: int, meter: Meter) -> None:
        now = self._clock()
        day = day_of(now)
        UsageRow.pending(self._pending, day, key_id, key_name, account, model, now).count(now, status, meter)
        tokens = meter.prompt_tokens + meter.completion_tokens
        if tokens:
            self._unreported[key_id] = self._unreported.get(key_id, 0) + tokens

    def take(self) -> list[UsageRow]:
        """The sums since the last take, for one report; `put_back` them if it fails."""
        rows, self._pending = list(self._pending.values()), {}
        return rows

    def put_back(self, rows: list[UsageRow]) -> None:
        merge_back(self._pending, rows)

    def reported(self, rows: list[UsageRow], day: str, totals: dict[str, int]) -> None:
        """A report of `rows` was accepted; `totals` (the ack's) include them."""
        for row in rows:
            left = self._unreported.get(row.key_id, 0) - row.prompt_tokens - row.completion_tokens
            if left > 0:
                self._unreported[row.key_id] = left
            else:
                self._unreported.pop(row.key_id, None)
        self.apply_totals(day, totals)

    def apply_totals(self, day: str, totals: dict[str, int]) -> None:
        if day != self._day:
            if day < self._day:
                return  # a table from before midnight
            self._day, self._totals = day, {}
        for key_id, tokens in totals.items():
            if tokens > self._totals.get(key_id, 0):
                self._totals[key_id] = tokens

    def tokens_today(self, key_id: str) -> int:
        if day_of(self._clock()) != self._day:
            return self._unreported.get(key_id, 0)
        return self._totals.get(key_id, 0) + self._unreported.get(key_id, 0)
