"""Keys from the site's own identity: a user proves who they are with munge and gets a key bound to one of
their Slurm accounts, with no administrator (`slinfer key create|list|revoke`).

Responsible for: turning a munge credential into a user name (slinfer/munge.py decodes; the uid is looked up
in the controller's passwd), choosing the account (the one asked for, else the user's default) and refusing one
the user has no association with (sacctmgr, through slinfer/slurm/accounts.py), the bound on keys per user
([gateway].keys_per_user), letting a user list and revoke only their own keys, and revoking keys past their
expiry (so that the feed tells every gateway worker); and whether a user is a coordinator of an account
(Slurm's coordinator flag, `sacctmgr show account A withcoord`), who then sees the account's usage.
Not responsible for: gRPC (controller/admin.py maps IdentityError to status codes), storing or verifying keys
(controller/keys.py), or an administrator's keys (the token's API sees and revokes all).
"""

from __future__ import annotations

import asyncio
import logging
import pwd
import time
from collections.abc import Callable
from dataclasses import dataclass

from slinfer import munge
from slinfer.controller.keys import KeyInfo, KeyStore
from slinfer.slurm import accounts
from slinfer.slurm.runner import Query, Runner, SlurmError

log = logging.getLogger(__name__)

# A day in seconds, for --expires DAYS.
DAY_S = 86400.0
# The longest --expires a user may ask for: ten years, past which a "temporary" key is a permanent one.
MAX_EXPIRES_DAYS = 3650
# How often keys past their expiry are revoked (and so dropped by every gateway worker through the feed).
EXPIRY_SWEEP_S = 30.0


class IdentityError(Exception):
    """A refusal; `kind` is one of unauthenticated, denied, exhausted, invalid, not_found, unavailable."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Created:
    key_id: str
    secret: str
    user: str
    account: str
    expires_at: float


def _user_name(uid: int) -> str:
    return pwd.getpwuid(uid).pw_name


class OwnKeys:
    """A user's own keys, proven by munge."""

    def __init__(self, keys: KeyStore, runner: Runner, *, munge_socket: str = "", keys_per_user: int = 5,
                 clock: Callable[[], float] = time.time,
                 user_name: Callable[[int], str] = _user_name) -> None:
        self._keys = keys
        self._runner = runner
        self._socket = munge_socket
        self._keys_per_user = keys_per_user
        self._clock = clock
        self._user_name = user_name
        # One creation per user at a time, so that two concurrent calls cannot both pass the bound.
        self._creating = asyncio.Lock()

    async def prove(self, credential: str) -> str:
        """The user name the credential proves; IdentityError("unauthenticated") for any bad credential."""
        try:
            who = await asyncio.to_thread(munge.decode, credential, self._socket)
        except munge.MungeError as exc:
            log.warning("munge credential refused: %s", exc)
            raise IdentityError("unauthenticated", f"munge credential refused: {exc}") from exc
        try:
            return self._user_name(who.uid)
        except KeyError as exc:
            raise IdentityError("unauthenticated", f"uid {who.uid} has no user on the controller's host") from exc

    async def account_for(self, user: str, asked: str) -> str:
        """The account a key of `user` is bound to: `asked`, or the user's default; it must be associated."""
        try:
            rows = await self._runner.aget(accounts.associations(user))
            account = asked or await self._runner.aget(accounts.default_account(user))
        except SlurmError as exc:
            raise IdentityError("unavailable", f"cannot read the Slurm associations of {user!r}: {exc}") from exc
        if not account:
            raise IdentityError("denied", f"user {user!r} has no default Slurm account: name one with --account")
        if not any(r.account == account for r in rows):
            raise IdentityError("denied", f"user {user!r} has no association with Slurm account {account!r} "
                                          f"(sacctmgr show assoc user={user})")
        return account

    async def coordinates(self, user: str, account: str) -> bool:
        """Whether `user` is a coordinator of the Slurm `account` (sacctmgr's coordinator flag)."""
        try:
            return user in await self._runner.aget(coordinators(account))
        except SlurmError as exc:
            raise IdentityError("unavailable", f"cannot read the coordinators of account {account!r}: {exc}") from exc

    def owned(self, user: str) -> list[KeyInfo]:
        return sorted((k for k in self._keys.list() if k.source == "store" and k.user == user),
                      key=lambda k: k.created_at)

    async def create(self, credential: str, name: str = "", account: str = "", expires_days: int = 0) -> Created:
        user = await self.prove(credential)
        if not 0 <= expires_days <= MAX_EXPIRES_DAYS:
            raise IdentityError("invalid", f"--expires must be 0 (never) to {MAX_EXPIRES_DAYS} days")
        bound = await self.account_for(user, account)
        async with self._creating:
            held = len(self.owned(user))
            if held >= self._keys_per_user:
                raise IdentityError("exhausted", f"user {user!r} holds {held} keys, the most allowed "
                                                 f"([gateway].keys_per_user): revoke one first")
            expires_at = self._clock() + expires_days * DAY_S if expires_days else 0.0
            try:
                key_id, secret = await self._keys.create_async(name or f"{user}@{bound}", bound, user=user,
                                                               expires_at=expires_at)
            except ValueError as exc:
                raise IdentityError("invalid", str(exc)) from exc
        log.info("user %s made key %s for account %s", user, key_id, bound)
        return Created(key_id, secret, user, bound, expires_at)

    async def list(self, credential: str) -> list[KeyInfo]:
        return self.owned(await self.prove(credential))

    async def revoke(self, credential: str, key_id: str) -> None:
        user = await self.prove(credential)
        # Another user's key and no key at all get the same answer: ids of others' keys are not disclosed.
        if not any(k.key_id == key_id for k in self.owned(user)):
            raise IdentityError("not_found", f"you ({user}) have no key {key_id!r}")
        await self._keys.revoke_async(key_id)
        log.info("user %s revoked key %s", user, key_id)

    def sweep(self) -> list[str]:
        """Revokes the keys past their expiry; their ids."""
        now = self._clock()
        gone = [k.key_id for k in self._keys.list() if k.expires_at and k.expires_at <= now]
        for key_id in gone:
            self._keys.revoke(key_id)
            log.info("key %s expired: revoked", key_id)
        return gone

    async def run(self, interval_s: float = EXPIRY_SWEEP_S) -> None:
        """Sweeps expired keys until cancelled."""
        while True:
            try:
                self.sweep()
            except Exception:  # a failed write is retried at the next sweep
                log.exception("expiry sweep failed")
            await asyncio.sleep(interval_s)


def _coordinators(text: str) -> frozenset[str]:
    """`account|user1,user2` lines (one per cluster, or none for an unknown account): the coordinators."""
    names: set[str] = set()
    for line in text.splitlines():
        _, _, users = line.partition("|")
        names.update(u.strip() for u in users.split(",") if u.strip())
    return frozenset(names)


def coordinators(account: str) -> Query[frozenset[str]]:
    """The coordinators of a Slurm account."""
    return Query(("sacctmgr", "--noheader", "--parsable2", "show", "account", account, "withcoord",
                  "format=account,coordinators"), _coordinators)
