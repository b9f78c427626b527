"""`slinfer-gateway --config PATH [--listen HOST:PORT] [--workers N]`: the gateway tier, its own program.

Responsible for: running the OpenAI gateway (gateway.py) in N worker processes that share one port
(SO_REUSEPORT), each fed routes, client keys, limits and quota totals by the controller (routefeed.py) and
reporting its load and usage back; supervising the workers (a worker that dies is started again; SIGHUP
restarts them one by one, each replacement listening before its predecessor drains; SIGTERM drains all); and
asking the kernel to hand a closing listener's queued connections to another listener of the port
(`net.ipv4.tcp_migrate_req`), so that a rolling restart resets none.
Not responsible for: scaling, the usage ledger, quotas' totals or the registry (the controller owns them all;
a gateway keeps serving from its last table while the controller is away, and `/healthz` says so).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

from slinfer import tls
from slinfer.config import DEFAULT_PATH, Config, ConfigError, load, require_token
from slinfer.controller import metrics
from slinfer.controller.balancer import Balancer
from slinfer.controller.eventloop import loop_factory
from slinfer.controller.files import batch_routes
from slinfer.controller.gateway import Gateway
from slinfer.controller.keys import KeyStore
from slinfer.controller.keywait import KeyWait
from slinfer.controller.limits import GroupTokens, KeyLimits, Limiter
from slinfer.controller.main import SHUTDOWN_GRACE_S, split_listen
from slinfer.controller.modelstatus import ModelBoard
from slinfer.controller.proxy import Proxy
from slinfer.controller.queue import for_gateway as queue_for_gateway
from slinfer.controller.registry import Registry
from slinfer.controller.routefeed import RouteFeed
from slinfer.controller.usagerelay import UsageRelay
from slinfer.waits import bounded, within

log = logging.getLogger("slinfer.gateway")

# A new worker waits this long for the controller's first table before it listens without one (it then
# queues requests of catalog models until routes arrive); a restarted controller sends its first in ~12 s.
FIRST_TABLE_WAIT_S = 30.0
# How long the supervisor waits for a worker to say it listens before it counts the start as failed.
WORKER_START_S = 60.0
# A worker that died is started again after this long (doubled per death in a row, capped at a minute).
RESPAWN_DELAY_S = 1.0
# The kernel's knob that moves a closing listener's queued connections to another listener of the port.
MIGRATE_REQ = Path("/proc/sys/net/ipv4/tcp_migrate_req")


# ---- one worker -------------------------------------------------------------------------------------------
async def serve_worker(config: Config, listen: str, name: str, stop: asyncio.Event, ready_fd: int = -1,
                       reuse_port: bool = True, metrics_port: int = 0, instance: str = "") -> None:
    """Runs one gateway worker until `stop` is set, then drains it. With `metrics_port` it also serves on that
    port of its own (scrape each worker there); `instance` labels its series (default `name`)."""
    g = config.gateway
    # In the gateway tier the table alone says which engines' agents are alive: the mirror's clock stands
    # still, so a route ages only when a new table says so, never while the controller is away.
    registry = Registry(agent_timeout_s=1.0, clock=lambda: 0.0)
    keys = KeyStore.mirror([])
    relay = UsageRelay()
    # Every key of the table carries its resolved limits, so the defaults here are never used.
    # The accounts' and users' limits are the config's, applied here by each worker.
    limiter = Limiter(KeyLimits(), relay.tokens_today, accounts=g.accounts, users=g.users,
                      group_tokens=GroupTokens(keys, relay.tokens_today))
    models = [m.name for m in config.models]
    feed: RouteFeed | None = None
    gateway = Gateway(g, config.models, registry, keys,
                      Proxy(g.connect_timeout_s, g.read_timeout_s, g.client_timeout_s,
                            tls.engine_client_context(config) if g.engine_ca else None),
                      Balancer(), queue_for_gateway(g), limiter, relay,
                      ModelBoard(config.models, registry,
                                 remote=lambda model: feed.model_state(model) if feed is not None else None),
                      scaled_to_zero=lambda model: feed is not None and feed.scaled_to_zero(model),
                      health=lambda: feed.health() if feed is not None else {},
                      state_collectors=[metrics.GaugeCollector(
                          "slinfer_gateway_controller_connected",
                          "1 while this gateway's watch of the controller is up (0: serving its last table)",
                          lambda: 1.0 if feed is not None and feed.connected else 0.0)],
                      instance=instance or name)
    late = KeyWait(keys.verify, lambda: feed is not None and feed.connected)
    gateway.extra_routes.extend(batch_routes(config, keys.verify, verify_late=late.verify))
    feed = RouteFeed(config, name, registry, keys, relay, models, gateway.demand, gateway.outstanding)
    feed.on_applied = late.fed
    gateway.verify_late = late.verify
    gateway.settle_late = late.settle
    feeding = asyncio.create_task(feed.run(), name="route-feed")
    try:
        started = time.monotonic()
        await within(feed.first_table.wait(), FIRST_TABLE_WAIT_S)
        if not feed.tables:
            log.warning("gateway %s: no table from controller %s within %.0f s; listening without routes",
                        name, config.controller.address, FIRST_TABLE_WAIT_S)
        host, port = split_listen(listen)
        bound = await gateway.start(host, port, SHUTDOWN_GRACE_S, reuse_port=reuse_port)
        log.info("gateway %s listening on %s:%d (first table after %.2f s, %d replicas, %d keys)", name, host,
                 bound, time.monotonic() - started, len(registry.replicas()), len(keys.entries()))
        if metrics_port:
            own = await gateway.listen_also(host, metrics_port)
            log.info("gateway %s: its own port (for /metrics) is %s:%d", name, host, own)
        gc.collect()
        gc.freeze()  # see controller/main.py: long-lived objects stay out of the collector's scans
        if ready_fd >= 0:
            os.write(ready_fd, f"{bound}\n".encode())
            os.close(ready_fd)
        await stop.wait()
        demand = [gateway.demand(m) for m in models]
        log.info("gateway %s stopping: %d in flight, %d queued", name, sum(d.in_flight for d in demand),
                 sum(d.queued for d in demand))
        await gateway.drain(SHUTDOWN_GRACE_S)
    finally:
        feeding.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await feeding
        await gateway.stop()
        log.info("gateway %s stopped", name)


# ---- the supervisor ---------------------------------------------------------------------------------------
def enable_migrate_req() -> str:
    """Sets net.ipv4.tcp_migrate_req to 1 where it is 0 and writable; says what it is now."""
    try:
        value = MIGRATE_REQ.read_text().strip()
    except OSError as exc:
        return f"unknown ({exc.strerror}): a closing worker's queued connections may be reset"
    if value == "1":
        return "1"
    try:
        MIGRATE_REQ.write_text("1\n")
    except OSError as exc:
        return f"{value} (cannot set it: {exc.strerror}): a closing worker's queued connections may be reset"
    return "1 (set now)"


class Supervisor:
    """Starts N workers on one port and keeps them running; rolls them on SIGHUP."""

    def __init__(self, config_path: str, listen: str, workers: int, metrics_port: int = 0) -> None:
        self._config_path = config_path
        self._metrics_port = metrics_port
        self._listen = listen
        self._count = workers
        self._workers: list[asyncio.subprocess.Process | None] = [None] * workers
        self._rolling = False
        self.restarts = 0

    async def _spawn(self, index: int) -> asyncio.subprocess.Process:
        read_end, write_end = os.pipe()
        # -P: the working directory is not searched for modules (a `slinfer` folder there, a checkout's, shadowed
        # the installed package: the packages' CI saw "No module named 'slinfer.controller'"), and a root
        # process imports nothing from a folder that others may write.
        argv = [sys.executable, "-P", "-m", "slinfer.controller.gateway_main", "--config", self._config_path,
                "--listen", self._listen, "--worker-index", str(index), "--ready-fd", str(write_end)]
        if self._metrics_port:
            argv += ["--metrics-port", str(self._metrics_port + index)]
        try:
            proc = await asyncio.create_subprocess_exec(*argv, pass_fds=(write_end,))
        finally:
            os.close(write_end)
        loop = asyncio.get_running_loop()
        try:
            line = await bounded(loop.run_in_executor(None, os.read, read_end, 64), WORKER_START_S)
        except TimeoutError:
            line = b""
        finally:
            os.close(read_end)
        if not line:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise RuntimeError(f"gateway worker {index} did not start (exit {proc.returncode})")
        log.info("gateway worker %d (pid %d) listening", index, proc.pid)
        return proc

    async def start(self) -> None:
        for i in range(self._count):
            self._workers[i] = await self._spawn(i)

    async def roll(self) -> None:
        """Replaces the workers one at a time: the new one listens before the old one drains."""
        if self._rolling:
            return
        self._rolling = True
        try:
            for i in range(self._count):
                old = self._workers[i]
                self._workers[i] = await self._spawn(i)
                if old is not None and old.returncode is None:
                    old.terminate()
                    await old.wait()
                log.info("gateway worker %d restarted (old pid %s exited %s)", i, old.pid if old else None,
                         old.returncode if old else None)
                self.restarts += 1
        finally:
            self._rolling = False

    async def watch(self, stop: asyncio.Event) -> None:
        """Starts a worker again when one dies (not the ones a roll or the stop ends)."""
        deaths = 0
        while not stop.is_set():
            await asyncio.sleep(0.5)
            for i, proc in enumerate(self._workers):
                if proc is None or proc.returncode is None or self._rolling or stop.is_set():
                    continue
                delay = min(60.0, RESPAWN_DELAY_S * 2 ** deaths)
                log.warning("gateway worker %d (pid %d) exited %s; starting it again in %.0f s", i, proc.pid,
                            proc.returncode, delay)
                deaths += 1
                await asyncio.sleep(delay)
                try:
                    self._workers[i] = await self._spawn(i)
                    deaths = 0
                except RuntimeError as exc:
                    log.error("%s", exc)

    async def stop(self) -> None:
        for proc in self._workers:
            if proc is not None and proc.returncode is None:
                proc.terminate()
        for proc in self._workers:
            if proc is not None:
                await proc.wait()


async def supervise(config_path: str, listen: str, workers: int, stop: asyncio.Event,
                    roll: asyncio.Event, metrics_port: int = 0) -> None:
    log.info("net.ipv4.tcp_migrate_req = %s", enable_migrate_req())
    sup = Supervisor(config_path, listen, workers, metrics_port)
    await sup.start()
    log.info("slinfer-gateway: %d workers on %s", workers, listen)
    watcher = asyncio.create_task(sup.watch(stop))
    try:
        while not stop.is_set():
            rolled = asyncio.create_task(roll.wait())
            stopped = asyncio.create_task(stop.wait())
            await asyncio.wait({rolled, stopped}, return_when=asyncio.FIRST_COMPLETED)
            rolled.cancel()
            stopped.cancel()
            if roll.is_set() and not stop.is_set():
                roll.clear()
                log.info("SIGHUP: restarting the %d workers one by one", workers)
                await sup.roll()
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await sup.stop()
        log.info("slinfer-gateway stopped")


def worker_instance(listen: str, index: int) -> str:
    """The worker's metrics label: stable across its restarts, so its counters continue one series."""
    return f"{socket.gethostname()}:{split_listen(listen)[1]}/w{index}"


def worker_name(listen: str, index: int) -> str:
    """The worker's name at the controller: a restarted worker is a new gateway (the old one's load expires)."""
    return f"{worker_instance(listen, index)}.{os.getpid()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slinfer-gateway", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_PATH), help=f"the site config (default {DEFAULT_PATH})")
    parser.add_argument("--listen", default="", help="HOST:PORT to serve on (default [gateway].listen)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes sharing the port (default 1)")
    parser.add_argument("--metrics-port", type=int, default=0,
                        help="worker I also serves on this port + I, for scraping each worker's /metrics")
    parser.add_argument("--worker-index", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--ready-fd", type=int, default=-1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        config = load(args.config)
        require_token(config)
    except ConfigError as exc:
        print(f"slinfer-gateway: config error in {args.config}: {exc}", file=sys.stderr)
        return 2
    listen = args.listen or config.gateway.listen
    try:
        port = split_listen(listen)[1]
    except ValueError:
        print(f"slinfer-gateway: --listen {listen!r} is not HOST:PORT", file=sys.stderr)
        return 2
    if args.workers < 1:
        print("slinfer-gateway: --workers must be 1 or more", file=sys.stderr)
        return 2
    if args.workers > 1 and port == 0:
        print("slinfer-gateway: --workers > 1 needs a fixed port (the workers share it)", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.controller.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def run() -> None:
        stop, roll = asyncio.Event(), asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if args.worker_index >= 0:
            loop.add_signal_handler(signal.SIGHUP, lambda: None)  # the supervisor's, not a worker's
            await serve_worker(config, listen, worker_name(listen, args.worker_index), stop, args.ready_fd,
                               metrics_port=args.metrics_port,
                               instance=worker_instance(listen, args.worker_index))
        else:
            loop.add_signal_handler(signal.SIGHUP, roll.set)
            await supervise(args.config, listen, args.workers, stop, roll, args.metrics_port)

    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            runner.run(run())
    except (OSError, RuntimeError) as exc:
        print(f"slinfer-gateway: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
