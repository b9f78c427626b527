"""`make bench`: every benchmark of issue 7 on a fresh dev-cluster bed, into one results folder.

Brings up its own bed (`--state-dir`, `--port-base`: real Slurm, SPANK plugin, agent, controller, vLLM on the
CPU), then, in the order that needs the fewest engine starts:
  2. the scaling timeline (0 -> 2 replicas -> 0 under a load step),
  4. engine busy fraction under peak load (2 replicas pinned),
  3. routing quality per balancer policy on shared-prefix prompts (2 replicas, controller restarted per policy),
  1. the seed paper's table (1 replica pinned: 100/500/1000 concurrent requests via the gateway and direct),
  5. streaming through the gateway against that one engine (bench/stream_relay.py: throughput and TTFT ratios),
then takes the bed down and, unless `--skip-standin`, runs bench/gateway_overhead.py and bench/stream_relay.py
against the fast engine stand-in (the gateway's own cost, without a slow engine hiding it). Writes
results.json, results.md, the PNG plots and bench.log to `--out` (default results/<timestamp>/); `--latest
DIR` also copies the Markdown and plots there (bench/results/latest for the committed copy).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: `bench` is importable

from bench import peakbusy, plots, report, routing, scaling, seedtable, stream_relay
from bench.bedprobe import BedProbe
from slinfer.dev import devcluster

log = logging.getLogger("bench")
REPO = Path(__file__).resolve().parents[1]
MODEL = "tiny"
POLICIES = ("round_robin", "least_outstanding", "prefix_affinity")
# The dev bed's gateway refuses past 512 outstanding per engine and queues 256: 1000 concurrent requests on one
# replica need more room, or 232 of them get 429 and the comparison with a direct engine is void.
# After a replica is cancelled its engine takes a few seconds to stop, busy on the same CPUs: let it go first.
SETTLE_S = 8.0
GATEWAY_ROOM = "max_outstanding_per_engine = 2048\nqueue_size = 2048\n"


def _machine() -> dict[str, object]:
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    cpu = platform.processor() or ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpus": os.cpu_count(), "memory_gib": round(mem / 2**30, 1), "cpu_model": cpu,
            "kernel": platform.release(), "python": platform.python_version()}


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def _wait_ports_free(bed: devcluster.Bed, within_s: float = 120.0) -> None:
    """Waits until the bed's fixed ports can be bound. They lie in the kernel's ephemeral range, so the
    thousands of connections of a previous run can leave one of them in TIME_WAIT (60 s), and slurmd then
    fails with "Address already in use"."""
    ports = [bed.slurmctld_port, bed.slurmd_port, bed.gateway_port, bed.controller_port]
    deadline = time.monotonic() + within_s
    while True:
        busy = []
        for port in ports:
            with socket.socket() as s:
                try:
                    s.bind(("0.0.0.0", port))
                except OSError:
                    busy.append(port)
        if not busy or time.monotonic() > deadline:
            if busy:
                log.warning("ports %s still in use after %.0fs; trying anyway", busy, within_s)
            return
        log.info("waiting for ports %s to be free (TIME_WAIT from earlier connections?)", busy)
        time.sleep(5)


def _config_variant(base: str, policy: str) -> str:
    """The controller's config text for one routing policy ([[models]] is the config's last table)."""
    if policy == "prefix_affinity":
        return base + "prefix_affinity = true\n"
    if policy == "round_robin":
        return base + 'balancer = "round_robin"\n'
    return base


async def _measure(probe: BedProbe, args: argparse.Namespace, base_config: str, out: dict[str, object]) -> None:
    """Fills `out` part by part, so that a failure keeps what was measured before it."""
    q = args.quick
    parts = {int(x) for x in args.parts.split(",")}
    await probe.wait_routable(0, 30)
    if 2 in parts:
        log.info("== part 2: scaling timeline")
        out["scaling"] = await scaling.run(probe, users=args.step_users, max_tokens=32,
                                           hold_after_ready_s=10 if q else 20, up_timeout_s=420, down_timeout_s=180)

    log.info("== pinning 2 replicas")
    await probe.pin(2)
    await probe.wait_replicas(2, 420)
    await probe.wait_routable(2, 30)
    if 4 in parts:
        log.info("== part 4: engine busy fraction under peak load")
        out["peakbusy"] = await peakbusy.run(probe, users=64 if q else 256, duration_s=8 if q else 20,
                                             warmup_s=3, max_tokens=16, max_tokens_upto=64)

    routed: list[dict[str, object]] = []
    if 3 in parts:
        log.info("== part 3: routing quality")
        out["routing"] = routed
    for policy in POLICIES if 3 in parts else ():
        probe.restart_controller(_config_variant(base_config, policy))
        await probe.pin(2)
        await probe.wait_routable(2, 60)
        routed.append(await routing.run(probe, policy, groups=16 if q else 256, per_group=4, users=32,
                                        max_tokens=16))
    if 3 in parts:
        probe.restart_controller(base_config)
    if not parts & {1, 5}:
        return
    await probe.pin(1)
    await probe.wait_replicas(1, 120)
    await probe.wait_routable(1, 60)
    await asyncio.sleep(SETTLE_S)
    if 1 in parts:
        log.info("== part 1: the seed table, 1 replica pinned")
        levels = [int(x) for x in args.levels.split(",")]
        out["seedtable"] = await seedtable.run(probe, levels, max_tokens=16, repeats=1 if q else 3)
    if 5 in parts:
        log.info("== part 5: streaming through the gateway vs one engine, 1 replica pinned")
        await asyncio.sleep(SETTLE_S)
        out["stream_relay_engine"] = await stream_relay.engine_rounds(probe, rounds=2 if q else 4,
                                                                      requests=100 if q else 300, users=32,
                                                                      max_tokens=64)
    await probe.pin(0)


async def _run_bed(bed: devcluster.Bed, args: argparse.Namespace, base_config: str,
                   out: dict[str, object]) -> None:
    async with BedProbe(bed, MODEL) as probe:
        await _measure(probe, args, base_config, out)


def _standin(args: argparse.Namespace) -> str:
    log.info("== gateway overhead against the engine stand-in (bench/gateway_overhead.py)")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gateway_overhead.py"), "--levels", args.levels,
                           "--duration", "3" if args.quick else "5"],
                          capture_output=True, text=True, check=False, timeout=600)
    if proc.returncode != 0:
        log.error("gateway_overhead.py failed (%d): %s", proc.returncode, proc.stderr[-2000:])
        return f"(failed with exit code {proc.returncode}; see bench.log)\n{proc.stderr[-2000:]}"
    log.info("stand-in:\n%s", proc.stdout)
    return proc.stdout


def _stream_relay(args: argparse.Namespace) -> dict[str, object]:
    log.info("== streaming relay cost against the engine stand-in (bench/stream_relay.py)")
    out = args.out / "stream_relay.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "stream_relay.py"), "--rounds", "1" if args.quick
                           else "3", "--json", str(out)], capture_output=True, text=True, check=False, timeout=1800)
    log.info("stream relay:\n%s", proc.stdout)
    if proc.returncode != 0 or not out.exists():
        log.error("stream_relay.py failed (%d): %s", proc.returncode, proc.stderr[-2000:])
        return {"failed": proc.returncode, "text": proc.stdout + proc.stderr[-2000:]}
    return {**json.loads(out.read_text()), "text": proc.stdout}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    stamp = time.strftime("%Y%m%d-%H%M%S")
    parser.add_argument("--out", type=Path, default=REPO / "results" / stamp)
    parser.add_argument("--latest", type=Path, help="after a run without failure, also copy results.md and the "
                        "plots here")
    parser.add_argument("--state-dir", type=Path, default=Path("/tmp/slinfer-bench"))
    parser.add_argument("--port-base", type=int, default=46800)
    parser.add_argument("--levels", default="100,500,1000", help="concurrencies of the seed table")
    parser.add_argument("--step-users", type=int, default=32, help="users of the scaling step (target is 8 each)")
    parser.add_argument("--parts", default="1,2,3,4,5",
                        help="which parts to run (they run in the order 2, 4, 3, 1, 5)")
    parser.add_argument("--quick", action="store_true", help="shorter phases, for trying the script out")
    parser.add_argument("--skip-standin", action="store_true", help="skip the stand-in gateway overhead run")
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        handlers=[logging.StreamHandler(sys.stderr), logging.FileHandler(args.out / "bench.log")])
    bed = devcluster.Bed(args.state_dir.resolve(), args.port_base)
    meta: dict[str, object] = {"machine": _machine(), "uptime_start": _uptime(), "started": time.time(),
                               "quick": args.quick, "state_dir": str(bed.state), "port_base": bed.port_base}
    log.info("bench on %s; %s", meta["machine"], meta["uptime_start"])
    results: dict[str, object] = {}
    began = time.monotonic()
    failed = ""
    try:
        if devcluster.daemon_pid(bed, "slurmctld"):
            log.info("a bed is already up in %s: taking it down first", bed.state)
            devcluster.down(bed)
        _wait_ports_free(bed)
        (bed.logs / "controller.out").unlink(missing_ok=True)  # this run's log only (launch appends)
        devcluster.up(bed, controller=False)
        base = bed.config.read_text().replace("[gateway]\n", "[gateway]\n" + GATEWAY_ROOM, 1)
        bed.config.write_text(base)
        devcluster.start_controller(bed)
        meta["model_config"] = base[base.index("[[models]]"):]
        meta["gateway_config"] = base[base.index("[gateway]"):base.index("[agent]")]
        asyncio.run(_run_bed(bed, args, base, results))
    except Exception as exc:
        # What was measured before the failure is still written, with the failure named in results.md.
        log.exception("the bed part failed")
        failed = f"{type(exc).__name__}: {exc}"
    finally:
        meta["uptime_bed_end"] = _uptime()
        (args.out / "controller.log").write_text(
            (bed.logs / "controller.out").read_text(errors="replace")[-400_000:]
            if (bed.logs / "controller.out").exists() else "")
        left = devcluster.down(bed)
        if left:
            log.error("processes %s of the bed survived `down`", left)
    meta["bed_minutes"] = (time.monotonic() - began) / 60
    results["standin"] = "" if args.skip_standin else _standin(args)
    if not args.skip_standin:
        results["stream_relay"] = _stream_relay(args)
    meta["uptime_end"] = _uptime()
    meta["minutes"] = (time.monotonic() - began) / 60
    meta["failed"] = failed
    results["meta"] = meta
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    images = plots.draw_all(results, args.out)
    (args.out / "results.md").write_text(report.markdown(results, images) + stream_relay.markdown(results))
    log.info("results in %s (%.1f min)", args.out, meta["minutes"])
    if args.latest and not failed:
        args.latest.mkdir(parents=True, exist_ok=True)
        for old in args.latest.glob("*"):
            old.unlink()
        for name in ["results.md", *images]:
            shutil.copy2(args.out / name, args.latest / name)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
