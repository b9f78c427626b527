"""The admin gRPC service (`proto/slinfer/v1/admin.proto`) behind `slinfer status|scale|drain|keys|usage`.

Responsible for: authenticating each call with `[controller].token` (empty only with `insecure = true`),
translating requests into calls on the Autoscaler, the Pins, the Registry, the KeyStore and the UsageLedger, and their
failures into gRPC status codes with a readable message. Not responsible for: any decision (the autoscaler
decides, this only forwards the admin's wish), formatting for people (the CLI does), or TLS (the server's
credentials, controller/main.py).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import grpc

from slinfer import tls
from slinfer.config import Config
from slinfer.controller.autoscaler import Autoscaler, ModelStatus
from slinfer.controller.identity import IdentityError, OwnKeys
from slinfer.controller.keys import KeyInfo, KeyStore, KeyStoreError
from slinfer.controller.pins import Pins, PinStoreError
from slinfer.controller.registry import Registry
from slinfer.controller.slurm import JOB_ID
from slinfer.controller.usage import UsageLedger
from slinfer.v1 import admin_pb2, admin_pb2_grpc, engine_pb2

log = logging.getLogger(__name__)

# The end of year 9999 UTC: past it a time cannot name a day.
LAST_TIME = 253402300799.0
# Status lets the event loop run after this many rows: at 5,000 nodes (40,000 replicas and as many jobs) it held
# the loop 0.3-1.2 s in one piece, and every change to the gateways waited behind it (bench/control_plane_scale.py);
# a chunk of rows is a few ms.
STATUS_CHUNK = 1000
# Each engine state's name, looked up once (EngineState.Name per replica was a tenth of Status's time).
_STATE_NAMES = {number: name for name, number in engine_pb2.EngineState.items()}

_T = TypeVar("_T")


def _by_model(rows: Iterable[tuple[str, _T]], key: Callable[[_T], str]) -> Iterator[tuple[str, _T]]:
    """(model, row) pairs ordered by model, then by `key` of the row: the order a sort by (model, key) gives,
    without a key tuple per row (40,000 tuples a call made the collector's full collections at 5,000 nodes)."""
    groups: dict[str, list[_T]] = {}
    for model, row in rows:
        groups.setdefault(model, []).append(row)
    for model in sorted(groups):
        for row in sorted(groups[model], key=key):
            yield model, row


def model_status(st: ModelStatus) -> admin_pb2.ModelStatus:
    return admin_pb2.ModelStatus(
        name=st.name, min_replicas=st.min_replicas, max_replicas=st.max_replicas, pinned=st.pinned is not None,
        pinned_count=st.pinned or 0, desired=st.desired, load=st.load, target=st.target, window_s=st.window_s,
        in_flight=st.in_flight, queued=st.queued, ready=st.ready, starting=st.starting, pending=st.pending,
        draining=st.draining, expiring=st.expiring, lost=st.lost, lead_s=st.lead_s,
        last_decision=st.last_decision, last_decision_at=st.last_decision_at)


class AdminService(admin_pb2_grpc.AdminServicer):
    """The Admin servicer (grpc.aio); register it with `admin_pb2_grpc.add_AdminServicer_to_server`."""

    def __init__(self, autoscaler: Autoscaler, registry: Registry, keys: KeyStore, token: str = "",
                 clock: Callable[[], float] = time.time, usage: UsageLedger | None = None,
                 pins: Pins | None = None, own_keys: OwnKeys | None = None,
                 tier_in_flight: Callable[[], dict[str, int]] | None = None) -> None:
        self._autoscaler = autoscaler
        # The gateway tier's requests in flight per engine (GatewayHub.in_flight): a replica's outstanding in
        # `Status` is the built-in gateway's count and the tier's.
        self._tier_in_flight = tier_in_flight
        # The live pins (controller/pins.py): `slinfer scale` sets them there; the autoscaler reads the same.
        self._pins = pins if pins is not None or autoscaler is None else autoscaler.pins
        self._usage = usage
        # Users' own keys, proven by munge (controller/identity.py); None: `slinfer key` is not offered.
        self._own = own_keys
        self._registry = registry
        self._keys = keys
        self._token = token.encode()
        self._clock = clock
        # How often a reply let the event loop run (STATUS_CHUNK rows each); read by the tests.
        self.yields = 0

    async def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        if not self._token:
            return
        presented = ""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
                presented = value.removeprefix("Bearer ")
        if not hmac.compare_digest(presented.encode(), self._token):
            log.warning("admin call from %s rejected: wrong or missing token", context.peer())
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "wrong or missing admin token "
                                "([controller].token of the config)")

    async def Status(self, request: admin_pb2.StatusRequest,
                     context: grpc.aio.ServicerContext) -> admin_pb2.StatusResponse:
        await self._authorize(context)
        reply = admin_pb2.StatusResponse(squeue_ok=self._autoscaler.squeue_ok, now=self._clock())
        reply.models.extend(model_status(st) for st in self._autoscaler.status())
        # One snapshot of each list; the loop runs between chunks of rows (STATUS_CHUNK), so a row shows its
        # replica as of when it was written, as a report landing just after a one-piece Status would have.
        agents = self._registry.agents()
        alive = {a.node for a in agents if self._registry.agent_alive(a.node)}
        replicas = _by_model(((r.model, r) for r in self._registry.replicas()), key=lambda r: r.job_id)
        jobs = _by_model(self._autoscaler.jobs(), key=lambda j: j.job_id)
        tier = self._tier_in_flight() if self._tier_in_flight is not None else {}
        rows = 0
        add = reply.replicas.add  # built in place: a message made and then appended is copied
        for _, r in replicas:
            rows += 1
            if rows % STATUS_CHUNK == 0:
                await self._let_loop_run()
            state = "LOST" if r.node not in alive else "DRAINING" if r.draining else (
                _STATE_NAMES.get(r.state) or r.state_name)
            add(job_id=r.job_id, model=r.model, node=r.node, state=state, pool=r.pool,
                outstanding=r.outstanding + tier.get(r.job_id, 0), running=r.running, waiting=r.waiting,
                kv_cache_usage=r.kv_cache_usage, ready_at=r.ready_at, base_url=r.base_url)
        add_job = reply.jobs.add
        for model, job in jobs:
            rows += 1
            if rows % STATUS_CHUNK == 0:
                await self._let_loop_run()
            add_job(job_id=job.job_id, model=model, state=job.state, node=job.node, submit_time=job.submit_time,
                    start_time=job.start_time, end_time=job.end_time, reason=job.reason)
        add_agent = reply.agents.add
        for a in sorted(agents, key=lambda a: a.node):
            rows += 1
            if rows % STATUS_CHUNK == 0:
                await self._let_loop_run()
            add_agent(node=a.node, address=a.address, alive=a.node in alive, last_seen=a.last_seen,
                      engines=len(a.job_ids), load1=a.host.load1 if a.host is not None else 0.0, gpus=len(a.gpus))
        return reply

    async def _let_loop_run(self) -> None:
        """Lets the event loop run what waits (reports, the gateways' feed) between chunks of a long reply."""
        self.yields += 1
        await asyncio.sleep(0)

    async def Scale(self, request: admin_pb2.ScaleRequest,
                    context: grpc.aio.ServicerContext) -> admin_pb2.ScaleResponse:
        await self._authorize(context)
        count = None if request.auto else request.replicas
        if self._pins is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this server holds no pins")
        try:
            self._pins.set(request.model, count)
        except KeyError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc.args[0]))
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except PinStoreError as exc:
            await context.abort(grpc.StatusCode.INTERNAL, f"applied, but lost at the next restart: {exc}")
        log.info("admin %s: scale %s %s", context.peer(), request.model, "auto" if count is None else count)
        (st,) = [s for s in self._autoscaler.status() if s.name == request.model]
        return admin_pb2.ScaleResponse(model=model_status(st))

    async def Drain(self, request: admin_pb2.DrainRequest,
                    context: grpc.aio.ServicerContext) -> admin_pb2.DrainResponse:
        await self._authorize(context)
        if not JOB_ID.match(request.job_id):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{request.job_id!r} is not a Slurm job id")
        try:
            model = self._autoscaler.drain(request.job_id)
        except KeyError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc.args[0]))
        log.info("admin %s: drain %s (%s)", context.peer(), request.job_id, model)
        return admin_pb2.DrainResponse(model=model)

    async def CreateKey(self, request: admin_pb2.CreateKeyRequest,
                        context: grpc.aio.ServicerContext) -> admin_pb2.CreateKeyResponse:
        await self._authorize(context)
        try:
            key_id, secret = await self._keys.create_async(
                request.name, request.account,
                request.requests_per_minute if request.HasField("requests_per_minute") else None,
                request.tokens_per_day if request.HasField("tokens_per_day") else None)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except KeyStoreError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return admin_pb2.CreateKeyResponse(key_id=key_id, secret=secret)

    async def ListKeys(self, request: admin_pb2.ListKeysRequest,
                       context: grpc.aio.ServicerContext) -> admin_pb2.ListKeysResponse:
        await self._authorize(context)
        return admin_pb2.ListKeysResponse(keys=[_key_info(k) for k in self._keys.list()])

    async def RevokeKey(self, request: admin_pb2.RevokeKeyRequest,
                        context: grpc.aio.ServicerContext) -> admin_pb2.RevokeKeyResponse:
        await self._authorize(context)
        if any(k.key_id == request.key_id and k.source == "config" for k in self._keys.list()):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"{request.key_id} comes from [gateway].api_keys: remove it from the config")
        try:
            found = await self._keys.revoke_async(request.key_id)
        except KeyStoreError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        if not found:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no key {request.key_id!r}")
        return admin_pb2.RevokeKeyResponse()

    async def Usage(self, request: admin_pb2.UsageRequest,
                    context: grpc.aio.ServicerContext) -> admin_pb2.UsageResponse:
        await self._authorize(context)
        return await self._usage_rows(request, context)

    async def _usage_rows(self, request: admin_pb2.UsageRequest,
                          context: grpc.aio.ServicerContext) -> admin_pb2.UsageResponse:
        """The ledger's rows for `request`, each with the user its key was made for, filtered by account and
        user when given."""
        if self._usage is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this controller keeps no usage ledger")
        for name in ("since", "until"):
            value = getattr(request, name)
            if not math.isfinite(value) or not 0 <= value <= LAST_TIME:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{name} must be unix seconds, not {value}")
        if request.until and request.until <= request.since:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "until must be later than since")
        assert self._usage is not None
        rows = await self._usage.query_async(request.key_id, request.since, request.until)
        owned = [(r, self._keys.owner(r.key_id)) for r in rows]
        return admin_pb2.UsageResponse(rows=[admin_pb2.UsageRow(
            day=r.day, key_id=r.key_id, key_name=r.key_name, account=r.account, model=r.model, requests=r.requests,
            failed=r.failed, prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens,
            estimated=r.estimated, user=user) for r, user in owned
            if (not request.account or r.account == request.account) and (not request.user or user == request.user)])

    # The user's own keys: no admin token (any user may call them); each carries a munge credential instead.

    async def _own_keys(self, context: grpc.aio.ServicerContext) -> OwnKeys:
        if self._own is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this controller offers no user keys")
        assert self._own is not None
        return self._own

    async def CreateOwnKey(self, request: admin_pb2.OwnKeyCreateRequest,
                           context: grpc.aio.ServicerContext) -> admin_pb2.CreateKeyResponse:
        own = await self._own_keys(context)
        try:
            made = await own.create(request.credential, request.name, request.account, request.expires_days)
        except IdentityError as exc:
            await context.abort(_IDENTITY_CODES[exc.kind], str(exc))
        except KeyStoreError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return admin_pb2.CreateKeyResponse(key_id=made.key_id, secret=made.secret, user=made.user,
                                           account=made.account, expires_at=made.expires_at)

    async def ListOwnKeys(self, request: admin_pb2.OwnKeysRequest,
                          context: grpc.aio.ServicerContext) -> admin_pb2.ListKeysResponse:
        own = await self._own_keys(context)
        try:
            found = await own.list(request.credential)
        except IdentityError as exc:
            await context.abort(_IDENTITY_CODES[exc.kind], str(exc))
        return admin_pb2.ListKeysResponse(keys=[_key_info(k) for k in found])

    async def RevokeOwnKey(self, request: admin_pb2.OwnKeyRevokeRequest,
                           context: grpc.aio.ServicerContext) -> admin_pb2.RevokeKeyResponse:
        own = await self._own_keys(context)
        try:
            await own.revoke(request.credential, request.key_id)
        except IdentityError as exc:
            await context.abort(_IDENTITY_CODES[exc.kind], str(exc))
        except KeyStoreError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return admin_pb2.RevokeKeyResponse()

    async def OwnUsage(self, request: admin_pb2.OwnUsageRequest,
                       context: grpc.aio.ServicerContext) -> admin_pb2.UsageResponse:
        own = await self._own_keys(context)
        try:
            user = await own.prove(request.credential)
        except IdentityError as exc:
            await context.abort(_IDENTITY_CODES[exc.kind], str(exc))
        query = admin_pb2.UsageRequest()
        query.CopyFrom(request.query)
        # A coordinator of the account asked for (Slurm's flag) sees the account's usage, every user's.
        try:
            coordinator = bool(query.account) and await own.coordinates(user, query.account)
        except IdentityError as exc:
            await context.abort(_IDENTITY_CODES[exc.kind], str(exc))
        if not coordinator:
            if query.user and query.user != user:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                    f"you ({user}) may see only your own usage, not {query.user!r}'s, unless you "
                                    f"are a coordinator of the account you name (--account)")
            query.user = user
        return await self._usage_rows(query, context)


# The gRPC status of each refusal of controller/identity.py.
_IDENTITY_CODES = {
    "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
    "denied": grpc.StatusCode.PERMISSION_DENIED,
    "exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
}


def _key_info(k: KeyInfo) -> admin_pb2.KeyInfo:
    return admin_pb2.KeyInfo(key_id=k.key_id, name=k.name, account=k.account, created_at=k.created_at,
                             source=k.source, requests_per_minute=k.requests_per_minute,
                             tokens_per_day=k.tokens_per_day, user=k.user, expires_at=k.expires_at)


class UserKeysService(admin_pb2_grpc.AdminServicer):
    """The Admin service as served on `[controller].user_listen`: the user-key methods, proven by munge, and
    nothing else (every other method is the base's UNIMPLEMENTED). Users have no client certificate where
    `[controller].tls_client_auth` holds the main port; this port asks none, and offers nothing an agent uses."""

    def __init__(self, admin: AdminService) -> None:
        self.CreateOwnKey = admin.CreateOwnKey  # type: ignore[method-assign]
        self.ListOwnKeys = admin.ListOwnKeys  # type: ignore[method-assign]
        self.RevokeOwnKey = admin.RevokeOwnKey  # type: ignore[method-assign]
        self.OwnUsage = admin.OwnUsage  # type: ignore[method-assign]


def user_server(config: Config, admin: AdminService) -> tuple[grpc.aio.Server, int]:
    """The users' port (`[controller].user_listen`): TLS with the controller's certificate but no client
    certificate asked, or plaintext when the controller has none. Raises ValueError naming the key."""
    c = config.controller
    server = grpc.aio.server()
    admin_pb2_grpc.add_AdminServicer_to_server(UserKeysService(admin), server)
    try:
        if c.tls_cert:
            creds = grpc.ssl_server_credentials([(tls.read_pem("controller.tls_key", c.tls_key),
                                                  tls.read_pem("controller.tls_cert", c.tls_cert))])
            port = server.add_secure_port(c.user_listen, creds)
        else:
            port = server.add_insecure_port(c.user_listen)
    except RuntimeError as exc:
        raise ValueError(f"controller.user_listen: cannot listen on {c.user_listen}: {exc}") from exc
    if not port:
        raise ValueError(f"controller.user_listen: cannot listen on {c.user_listen}")
    return server, port
