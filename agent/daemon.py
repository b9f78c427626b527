"""`slinfer-agent`: the root daemon of a node. Wires the engine manager, the local API, the controller reporter
and (when configured) the Kubernetes publisher, and leaves engines running when it stops, so that a restarted
agent re-adopts them.
"""

from __future__ import annotations

import os

# The agent forks engines while gRPC's threads run; gRPC's fork handlers then crash the child before it execs
# (seen: SIGSEGV in about one spawn out of three). The agent never uses gRPC in a forked child, so it needs none.
os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "false"

import argparse
import asyncio
import logging
import signal
import socket
import sys
from pathlib import Path

import aiohttp

from slinfer import config as config_mod
from slinfer import tls
from slinfer.agent.cgroups import JobCgroups
from slinfer.agent.engines import EngineManager
from slinfer.agent.gpu import Gpus
from slinfer.agent.pagecache import PageCacheWarmer
from slinfer.agent.records import RecordStore
from slinfer.agent.reporter import Reporter
from slinfer.agent.server import serve, single_agent_lock
from slinfer.agent.slurmview import SlurmView
from slinfer.agent.warmstart import EngineTemplate

log = logging.getLogger("slinfer.agent")


async def run(config: config_mod.Config) -> None:
    run_dir = Path(config.agent.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = single_agent_lock(Path(config.agent.socket))  # noqa: F841  (held open for the agent's life)
    gpus = Gpus()
    node_name = config.agent.node_name or socket.gethostname().split(".")[0]
    checker = SlurmView(node_name, config.agent.slurm_conf) if config.agent.verify_jobs else None
    # Health and load probes of https engines verify the node's certificate against [gateway].engine_ca.
    connector = aiohttp.TCPConnector(ssl=tls.engine_client_context(config)) if config.agent.engine_tls_cert else None
    async with aiohttp.ClientSession(connector=connector) as http:
        cgroups = JobCgroups(node_name) if config.agent.contain else None
        # The template imports vLLM for about 15 s in the background; engines meanwhile start cold (logged).
        template = EngineTemplate(config, run_dir, run_dir / "logs") if config.agent.warm_start else None
        pagecache = PageCacheWarmer()
        engines = EngineManager(config, RecordStore.of_run_dir(run_dir), http, gpus, checker, cgroups=cgroups,
                                template=template, pagecache=pagecache)
        if template is not None:
            template.start()
        await engines.adopt_all()
        server = await serve(engines, Path(config.agent.socket))
        tasks: list[asyncio.Task[None]] = []
        if any(m.readahead for m in config.models):
            tasks.append(asyncio.create_task(_read_catalog_ahead(config, pagecache, node_name)))
        if config.agent.controller:
            reporter = Reporter(config.agent.controller, node_name, engines.address, engines.endpoints, gpus,
                                config.agent.heartbeat_s, config.controller.token, config)
            engines.add_listener(reporter.notify)
            tasks.append(asyncio.create_task(reporter.run()))
        if config.kubernetes.enabled:
            publisher_task = await _start_kubernetes(config, engines, gpus, node_name)
            if publisher_task is not None:
                tasks.append(publisher_task)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("stopping; engines keep running and will be re-adopted")
        for task in tasks:
            task.cancel()
        await server.stop(grace=1)
        await engines.close()
        if template is not None:
            await template.close()


async def _read_catalog_ahead(config: config_mod.Config, pagecache: PageCacheWarmer, node_name: str) -> None:
    """The agent's start: the `readahead` models of this node's partitions into its page cache, behind the
    socket and the reporter, which are already serving."""
    partitions, _ = await SlurmView(node_name, config.agent.slurm_conf).node_facts()
    await pagecache.read_catalog(config.models, partitions)


async def _start_kubernetes(config: config_mod.Config, engines: EngineManager, gpus: Gpus,
                            node_name: str) -> asyncio.Task[None] | None:
    """Publishes this node and its engines to Kubernetes; trouble there never stops serving."""
    from slinfer.kube.api import ClientKubeAPI, KubeError
    from slinfer.kube.publisher import NodeIdentity, NodePublisher, PublishedEngine

    try:
        api = ClientKubeAPI.from_config(config.kubernetes, field_manager="slinfer-agent")
    except KubeError as exc:
        log.error("Kubernetes disabled: %s", exc)
        return None
    partitions, gpu_count = await SlurmView(node_name, config.agent.slurm_conf).node_facts()
    identity = NodeIdentity.detect(node_name, engines.address, partitions[0] if partitions else "", gpus.name(),
                                   gpu_count or len(gpus.samples()))
    publisher = NodePublisher(api, identity, namespace=config.kubernetes.namespace,
                              renew_interval_s=config.kubernetes.renew_interval_s,
                              lease_duration_s=config.kubernetes.lease_duration_s)

    def publish() -> None:
        publisher.notify([p for e in engines.endpoints() if (p := PublishedEngine.from_engine(e))])

    engines.add_listener(publish)
    publish()
    log.info("publishing node %s to Kubernetes (partitions %s, %d GPUs)", node_name, partitions, gpu_count)
    return asyncio.create_task(publisher.run())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slinfer-agent", description="slinfer node agent (runs as root)")
    parser.add_argument("--config", default=None, help=f"config file (default {config_mod.DEFAULT_PATH})")
    args = parser.parse_args(argv)
    try:
        config = config_mod.load(args.config)
        if config.agent.controller:
            # Only an agent that reports needs the token; one serving private engines talks to no one.
            config_mod.require_token(config)
            tls.channel_credentials(config)  # an unreadable certificate fails here, with its key
        for key, path in (("agent.engine_tls_cert", config.agent.engine_tls_cert),
                          ("agent.engine_tls_key", config.agent.engine_tls_key)):
            if path:
                tls.read_pem(key, path)
    except config_mod.ConfigError as exc:
        print(f"slinfer-agent: config error: {exc}", file=sys.stderr)
        return 2
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if config.agent.log_file:
        handlers = [logging.FileHandler(config.agent.log_file)]
    logging.basicConfig(level=logging.INFO, handlers=handlers,
                        format="%(asctime)s slinfer-agent %(levelname)s %(name)s: %(message)s")
    if config.agent.controller and not config.controller.token:
        log.warning("INSECURE: [controller].insecure = true and no [controller].token: reports to %s carry no "
                    "secret", config.agent.controller)
    if config.agent.controller and not tls.client_uses_tls(config):
        log.warning("INSECURE: reports to %s are plaintext and carry engines' API keys in the clear; set "
                    "[controller].tls_ca", config.agent.controller)
    asyncio.run(run(config))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
