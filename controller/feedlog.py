"""The gateway feed's versioned state: the controller's published copy with its recent deltas, and a gateway's copy.

Responsible for: turning what the controller holds now (pool replicas, client keys that changed, models held at
zero, today's token totals, the number of gateways) into one versioned delta per change, as a Kubernetes watch
does with resourceVersion; keeping the last `LOG_KEEP` deltas so a gateway that reconnects soon resumes from the
version it holds; the full state for a gateway that connects afresh or fell behind; and, on the gateway's side,
applying the full state and deltas in order, refusing a delta that does not follow the version it holds (the
gateway then asks for the full state).
Not responsible for: the gRPC stream or its authentication (gatewayhub.py, routefeed.py), reading the registry,
key store or ledger (the hub passes what they hold), or acting on the state (routefeed.py does).
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from slinfer.v1 import gateway_pb2

# Deltas kept for gateways that resume: a few minutes of steady change at a site, a few hundred KB at most.
LOG_KEEP = 1024
# A delta larger than this is not kept for resuming (the first publication is the whole state, 11 MB at 100,000 keys
# and 40,000 replicas): a gateway behind it gets the full state, which costs the same to send, and the log holds no
# second copy of the state (issue 35.4).
LOG_MAX_DELTA_BYTES = 256 * 1024
# The full state goes out in pages of about this size to gateways that ask for pages: 32 gateways connecting at
# once then hold gRPC's send buffers to a page each, not to a copy of the whole state each (issue 35.4).
PAGE_BYTES = 256 * 1024
# A page size no state reaches: the full state as one message (to a gateway that does not take pages).
ONE_MESSAGE = 1 << 62
# Today's totals are serialized this many to a fragment of a page (a map entry each, ~20 bytes): a fragment stays
# small beside a page.
TOTALS_PER_FRAGMENT = 256

# A replica's row as the feed compares it: (job_id, model, node, base_url, api_key, state, pool, draining,
# agent_alive).
ReplicaRow = tuple[str, str, str, str, str, int, bool, bool, bool]


def replica_row(r: gateway_pb2.RoutedReplica) -> ReplicaRow:
    return (r.job_id, r.model, r.node, r.base_url, r.api_key, r.state, r.pool, r.draining, r.agent_alive)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


# RouteTable's `replicas` (1) and `keys` (2) as length-delimited fields (wire type 2): a fragment is one element of
# the repeated field, serialized once, so a full state is the concatenation of fragments the log already holds.
_REPLICA_TAG, _KEY_TAG = b"\x0a", b"\x12"


def _fragment(tag: bytes, payload: bytes) -> bytes:
    return tag + _varint(len(payload)) + payload


def _replica_msg(row: ReplicaRow) -> gateway_pb2.RoutedReplica:
    job_id, model, node, base_url, api_key, state, pool, draining, alive = row
    return gateway_pb2.RoutedReplica(job_id=job_id, model=model, node=node, base_url=base_url, api_key=api_key,
                                     state=state, pool=pool, draining=draining, agent_alive=alive)


class FeedLog:
    """The controller's side: what it last published, at which version, and the deltas that led there."""

    def __init__(self, epoch: str | None = None, keep: int = LOG_KEEP,
                 wall: Callable[[], float] = time.time) -> None:
        # A new controller run starts a new epoch: versions of an earlier run mean nothing to it.
        self.epoch = epoch or secrets.token_hex(8)
        self.version = 0
        self._wall = wall
        self._replicas: dict[str, ReplicaRow] = {}
        # Each replica's and each key's serialized fragment of a full state (not a message each: 100,000 ClientKey
        # messages took 64 MB, their fragments 15).
        self._replica_frags: dict[str, bytes] = {}
        self._keys: dict[bytes, bytes] = {}
        self._zero: tuple[str, ...] = ()
        self._model_states: dict[str, str] = {}
        self._day = ""
        self._totals: dict[str, int] = {}
        self._gateways = 0
        self._log: deque[gateway_pb2.RouteTable] = deque(maxlen=keep)
        # The full state at `_pages_version`, serialized, by page size (a gateway that takes pages, one that does not).
        self._pages: dict[int, list[bytes]] = {}
        self._pages_version = -1
        self.pages_built = 0  # full states serialized (one per version asked for, whatever the number of gateways)

    def publish(self, replicas: Iterable[ReplicaRow], keys: Mapping[bytes, gateway_pb2.ClientKey | None],
                zero: Iterable[str], day: str, totals: Mapping[str, int],
                gateways: int, removed_replicas: Iterable[str] | None = None,
                model_states: Mapping[str, str] | None = None) -> gateway_pb2.RouteTable | None:
        """Compares what the controller holds now with what was published; the delta (a new version), or None
        when nothing changed. `replicas` is complete, unless `removed_replicas` is given: then `replicas` holds
        only the rows that may have changed and `removed_replicas` those that may be gone (the cost is what
        changed, not the cluster). `keys` holds only keys that may have changed (None: gone); `totals` at least
        every total that changed (every one with a new day). Totals only grow within a day: a new day starts
        them from nothing. `model_states` is the whole map of what the controller holds of each model (None:
        unchanged); a change sends the whole map, tens of short entries."""
        delta = gateway_pb2.RouteTable(epoch=self.epoch, base_version=self.version, day=day, gateways=gateways)
        changed = False
        if removed_replicas is not None:
            for row in replicas:
                if self._replicas.get(row[0]) != row:
                    self._set_replica(row, delta)
            for job_id in removed_replicas:
                if self._replicas.pop(job_id, None) is not None:
                    del self._replica_frags[job_id]
                    delta.removed_replicas.append(job_id)
            changed = bool(delta.replicas) or bool(delta.removed_replicas)
        else:
            now_replicas = {row[0]: row for row in replicas}
            for job_id, row in now_replicas.items():
                if self._replicas.get(job_id) != row:
                    self._set_replica(row, delta)
            removed = [job_id for job_id in self._replicas if job_id not in now_replicas]
            for job_id in removed:
                del self._replicas[job_id], self._replica_frags[job_id]
            delta.removed_replicas.extend(removed)
            changed = bool(delta.replicas) or bool(removed)
        for digest, key in keys.items():
            if key is None:
                if self._keys.pop(digest, None) is not None:
                    delta.removed_keys.append(digest)
                continue
            fragment = _fragment(_KEY_TAG, key.SerializeToString(deterministic=True))
            if self._keys.get(digest) != fragment:
                self._keys[digest] = fragment
                delta.keys.append(key)
        changed = changed or bool(delta.keys) or bool(delta.removed_keys)
        zero_now = tuple(sorted(zero))
        if zero_now != self._zero:
            self._zero = zero_now
            delta.scaled_to_zero.extend(zero_now)
            delta.scaled_to_zero_set = changed = True
        if model_states is not None and dict(model_states) != self._model_states:
            self._model_states = dict(model_states)
            delta.model_states.update(self._model_states)
            delta.model_states_set = changed = True
        if day != self._day:
            self._day, self._totals = day, {}
            changed = True
        for key_id, tokens in totals.items():
            if self._totals.get(key_id) != tokens:
                self._totals[key_id] = tokens
                delta.tokens_today[key_id] = tokens
        if gateways != self._gateways:
            self._gateways = gateways
            changed = True
        if not changed and not delta.tokens_today:
            return None
        self.version += 1
        delta.version = self.version
        delta.sent_at = self._wall()
        if delta.ByteSize() > LOG_MAX_DELTA_BYTES:
            self._log.clear()  # whoever is behind this version gets the full state
        else:
            self._log.append(delta)
        return delta

    def _set_replica(self, row: ReplicaRow, delta: gateway_pb2.RouteTable) -> None:
        msg = _replica_msg(row)
        self._replicas[row[0]] = row
        self._replica_frags[row[0]] = _fragment(_REPLICA_TAG, msg.SerializeToString())
        delta.replicas.append(msg)

    def pages(self, page_bytes: int | None = None) -> list[bytes]:
        """The whole published state at the current version as serialized RouteTable pages of about `page_bytes`
        each (one page for a small state). Built once per version and page size from the fragments held: every
        gateway that connects at this version is sent the same bytes. Concatenated, the pages parse as one
        full RouteTable; `ONE_MESSAGE` makes the one page a gateway that does not take pages is sent."""
        page_bytes = page_bytes or PAGE_BYTES
        if self._pages_version != self.version:
            self._pages, self._pages_version = {}, self.version  # the previous version's go before new ones are built
        cached = self._pages.get(page_bytes)
        if cached is not None:
            return cached
        pages = self._build(page_bytes)
        self._pages[page_bytes] = pages
        self.pages_built += 1
        return pages

    def _build(self, page_bytes: int) -> list[bytes]:
        sent_at = self._wall()
        first = gateway_pb2.RouteTable(full=True, epoch=self.epoch, version=self.version, base_version=0,
                                       scaled_to_zero=list(self._zero), scaled_to_zero_set=True,
                                       model_states=self._model_states, model_states_set=True, day=self._day,
                                       gateways=self._gateways, sent_at=sent_at).SerializeToString()
        later = gateway_pb2.RouteTable(full=True, epoch=self.epoch, version=self.version,
                                       sent_at=sent_at).SerializeToString()
        totals = list(self._totals.items())
        fragments = [*self._replica_frags.values(), *self._keys.values(),
                     *(gateway_pb2.RouteTable(tokens_today=dict(totals[i:i + TOTALS_PER_FRAGMENT])).SerializeToString()
                       for i in range(0, len(totals), TOTALS_PER_FRAGMENT))]
        pages: list[bytes] = []
        part: list[bytes] = [first]
        size = len(first)
        for fragment in fragments:
            if size + len(fragment) > page_bytes and len(part) > 1:
                part.append(gateway_pb2.RouteTable(page=len(pages), more=True).SerializeToString())
                pages.append(b"".join(part))
                part, size = [later], len(later)
            part.append(fragment)
            size += len(fragment)
        part.append(gateway_pb2.RouteTable(page=len(pages)).SerializeToString())
        pages.append(b"".join(part))
        return pages

    def snapshot(self) -> gateway_pb2.RouteTable:
        """The whole published state at the current version, as one message (not kept)."""
        return gateway_pb2.RouteTable.FromString(self._build(ONE_MESSAGE)[0])

    def heartbeat(self) -> gateway_pb2.RouteTable:
        """An empty delta at the current version: the stream is alive, nothing changed."""
        return gateway_pb2.RouteTable(epoch=self.epoch, version=self.version, base_version=self.version,
                                      day=self._day, gateways=self._gateways, sent_at=self._wall())

    def since(self, epoch: str, version: int) -> list[gateway_pb2.RouteTable] | None:
        """The deltas that take a gateway holding (epoch, version) to now, or None: it needs the full state."""
        if epoch != self.epoch or version <= 0 or version > self.version:
            return None
        if version == self.version:
            return []
        if not self._log or self._log[0].base_version > version:
            return None  # fell behind what the log keeps
        # From the newest back: a watcher is usually one version behind, and 32 of them woken by each change
        # looked at all LOG_KEEP deltas each.
        out = []
        for m in reversed(self._log):
            if m.version <= version:
                break
            out.append(m)
        out.reverse()
        return out


@dataclass
class Applied:
    """What one message changed in a gateway's copy (what the gateway must act on)."""

    full: bool = False
    pending: bool = False  # a page of a full state that continues: nothing changed yet, the gateway waits
    replicas: bool = False
    keys: list[bytes] = field(default_factory=list)  # added or changed
    removed_keys: list[bytes] = field(default_factory=list)
    gateways: bool = False
    zero: bool = False
    totals: dict[str, int] = field(default_factory=dict)  # totals that grew (every total with full or a new day)


class FeedMirror:
    """A gateway's copy of the published state, kept by applying the feed's messages in order."""

    def __init__(self) -> None:
        self.epoch = ""
        self.version = 0
        self.replicas: dict[str, gateway_pb2.RoutedReplica] = {}
        self.keys: dict[bytes, gateway_pb2.ClientKey] = {}
        self.zero: frozenset[str] = frozenset()
        self.model_states: dict[str, str] = {}
        self.day = ""
        self.totals: dict[str, int] = {}
        self.gateways = 0
        self._paged: gateway_pb2.RouteTable | None = None  # a full state's pages so far, until the last

    def apply(self, msg: gateway_pb2.RouteTable) -> Applied | None:
        """Applies the full state or the delta that follows the held version; None for a delta that does not
        (a gap, or another epoch): the caller must ask for the full state, and nothing was changed. A full
        state in pages is gathered aside (Applied.pending) and replaces the copy at its last page; a page out of
        order is a gap too."""
        if msg.full and (msg.more or msg.page):
            paged = self._paged
            if msg.page == 0:
                paged = self._paged = gateway_pb2.RouteTable()
            elif paged is None or (paged.epoch, paged.version, paged.page + 1) != (msg.epoch, msg.version, msg.page):
                self._paged = None
                return None
            paged.MergeFrom(msg)
            if msg.more:
                return Applied(pending=True)
            self._paged = None
            msg = paged
        elif msg.full:
            self._paged = None
        if msg.full:
            self.epoch, self.version = msg.epoch, msg.version
            self.replicas = {r.job_id: r for r in msg.replicas}
            self.keys = {k.sha256: k for k in msg.keys}
            self.zero = frozenset(msg.scaled_to_zero)
            self.model_states = dict(msg.model_states)
            self.day, self.totals = msg.day, dict(msg.tokens_today)
            self.gateways = msg.gateways
            return Applied(full=True, replicas=True, keys=list(self.keys), gateways=True, zero=True,
                           totals=dict(self.totals))
        if not self.epoch or msg.epoch != self.epoch or msg.base_version != self.version:
            return None
        applied = Applied()
        for r in msg.replicas:
            self.replicas[r.job_id] = r
        for job_id in msg.removed_replicas:
            self.replicas.pop(job_id, None)
        applied.replicas = bool(msg.replicas) or bool(msg.removed_replicas)
        for k in msg.keys:
            self.keys[k.sha256] = k
            applied.keys.append(k.sha256)
        for digest in msg.removed_keys:
            if self.keys.pop(digest, None) is not None:
                applied.removed_keys.append(digest)
        if msg.scaled_to_zero_set:
            self.zero = frozenset(msg.scaled_to_zero)
            applied.zero = True
        if msg.model_states_set:
            self.model_states = dict(msg.model_states)
        if msg.day and msg.day != self.day:
            self.day, self.totals = msg.day, {}
        for key_id, tokens in msg.tokens_today.items():
            self.totals[key_id] = tokens
            applied.totals[key_id] = tokens
        if msg.gateways != self.gateways:
            self.gateways = msg.gateways
            applied.gateways = True
        self.version = msg.version
        return applied

    def state(self) -> tuple[object, ...]:
        """Everything held, in a form two copies can be compared by (the tests' fresh-table check)."""
        return (sorted(replica_row(r) for r in self.replicas.values()),
                sorted(k.SerializeToString(deterministic=True) for k in self.keys.values()),
                sorted(self.zero), self.day, dict(sorted(self.totals.items())), self.gateways,
                sorted(self.model_states.items()))
