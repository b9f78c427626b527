"""`slinfer doctor [--config PATH]`: what an administrator checks on a node, one line per check, OK or FAIL with
the fix. Exits 1 when any check fails.

Responsible for: reading the site's Slurm files (slurm.conf, plugstack.conf and its includes) and the slinfer
config, and probing the real parts: `sbatch --help` shows the plugin's options, the plugin's embedded Slurm
version against `sinfo -V`, the hook runs, the agent's root-only socket answers ListEngines, the gRPC port's
certificates (readable, in their dates, issued by the CA, named for `[controller].address`), the controller
answers gRPC over the config's TLS, each catalog model's engine command can start (`{python}` can
`import vllm`), and munge round-trips a credential. With `--gateway-host`, a gateway host's line: the
controller's GatewayFeed accepts this config's token, and `net.ipv4.tcp_migrate_req` is 1. It says plainly
(a NOTE line) when the gateway-to-engine hop is plaintext. Every command runs as an argv list with a timeout,
never through a shell.
Not responsible for: repairing anything, or starting daemons; each FAIL names the fix.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from slinfer import config as config_mod
from slinfer import tls
from slinfer.agent import enginetrust

PLUGIN_FILE = "spank_slinfer.so"
# Debian's; RPM sites set PluginDir in slurm.conf (e.g. /usr/lib64/slurm).
DEFAULT_PLUGIN_DIR = "/usr/lib/x86_64-linux-gnu/slurm-wlm"
CHECKS = ("config", "plugin", "plugin-version", "hook", "agent", "tls", "controller", "engine-hop", "engines",
          "engine-python", "pool", "munge", "gateway")
# Where a rolling restart of slinfer-gateway's workers keeps a closing listener's queued connections.
MIGRATE_REQ = Path("/proc/sys/net/ipv4/tcp_migrate_req")
# Importing vLLM pulls in torch: tens of seconds on a busy node.
IMPORT_TIMEOUT_S = 180.0
RPC_TIMEOUT_S = 5.0
# A certificate this close to its end fails the tls line: time for the site to renew and copy it out.
EXPIRY_WARNING_DAYS = 14


@dataclass(frozen=True)
class Result:
    check: str
    ok: bool
    detail: str
    fix: str = ""
    # A fact the administrator should know that is not a fault (the line says NOTE and does not fail doctor).
    note: bool = False

    def line(self) -> str:
        if self.note:
            return f"NOTE {self.check}: {self.detail}" + (f" -- to change: {self.fix}" if self.fix else "")
        text = f"{'OK  ' if self.ok else 'FAIL'} {self.check}: {self.detail}"
        return f"{text} -- fix: {self.fix}" if not self.ok and self.fix else text


@dataclass(frozen=True)
class Completed:
    """A finished command: `code` is None when it could not run at all (then `output` says why)."""

    code: int | None
    output: str


class Runner:
    """Runs commands as argv lists with a timeout, folding every way they can fail into a Completed."""

    def run(self, argv: list[str], timeout: float, env: dict[str, str] | None = None,
            stdin: bytes | None = None) -> Completed:
        try:
            proc = subprocess.run(argv, input=stdin, capture_output=True, timeout=timeout, check=False,
                                  env=env, cwd="/")
        except FileNotFoundError:
            return Completed(None, f"{argv[0]} not found")
        except PermissionError:
            return Completed(None, f"{argv[0]} is not executable")
        except subprocess.TimeoutExpired:
            return Completed(None, f"{Path(argv[0]).name} did not finish within {timeout:.0f}s")
        out = (proc.stdout or b"") + (proc.stderr or b"")
        return Completed(proc.returncode, out.decode(errors="replace"))


# ---- the site's Slurm files -----------------------------------------------------------------------------------
def slurm_conf_path() -> Path:
    return Path(os.environ.get("SLURM_CONF") or "/etc/slurm/slurm.conf")


def read_slurm_conf(path: Path) -> dict[str, str]:
    """slurm.conf's `Key=Value` settings with lowercased keys (the first wins, as in Slurm); {} when absent."""
    settings: dict[str, str] = {}
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return settings
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or "=" not in line.split()[0]:
            continue
        key, value = line.split()[0].split("=", 1)
        settings.setdefault(key.lower(), value)
    return settings


def munge_socket(settings: dict[str, str]) -> str:
    """The munged socket that Slurm uses: `AuthInfo=socket=PATH[,...]`, or "" for munge's default."""
    for part in settings.get("authinfo", "").split(","):
        key, _, value = part.partition("=")
        if key.strip().lower() == "socket" and value:
            return value.strip()
    return ""


@dataclass(frozen=True)
class PlugstackEntry:
    path: Path
    required: bool
    args: dict[str, str]
    source: Path


def plugstack_path(settings: dict[str, str], conf: Path) -> Path:
    return Path(settings.get("plugstackconfig") or conf.parent / "plugstack.conf")


def plugstack_entries(path: Path, plugin_dir: str, depth: int = 0) -> Iterator[PlugstackEntry]:
    """The plugins a plugstack.conf loads, following `include GLOB` as Slurm does."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return
    for raw in lines:
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        if words[0] == "include" and len(words) > 1 and depth < 8:
            for included in sorted(glob.glob(words[1])):
                yield from plugstack_entries(Path(included), plugin_dir, depth + 1)
        elif words[0] in ("required", "optional") and len(words) > 1:
            plugin = Path(words[1]) if words[1].startswith("/") else Path(plugin_dir) / words[1]
            args = dict(w.split("=", 1) for w in words[2:] if "=" in w)
            yield PlugstackEntry(plugin, words[0] == "required", args, path)


def elf_symbol_u32(path: Path, name: str) -> int:
    """The 32-bit value of an initialised global in a 64-bit little-endian ELF shared object."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError(f"{path} is not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    for _, sh_type, _, _, sh_offset, sh_size, sh_link, _, _, sh_entsize in sections:
        if sh_type != 11:  # SHT_DYNSYM
            continue
        strtab_offset = sections[sh_link][4]
        for pos in range(sh_offset, sh_offset + sh_size, sh_entsize or 24):
            st_name, _, _, st_shndx, st_value, _ = struct.unpack_from("<IBBHQQ", data, pos)
            end = data.index(b"\0", strtab_offset + st_name)
            if data[strtab_offset + st_name:end].decode() == name and 0 < st_shndx < len(sections):
                target = sections[st_shndx]
                value, = struct.unpack_from("<I", data, st_value - target[3] + target[4])
                return int(value)
    raise ValueError(f"{path} has no symbol {name}")


def version_text(number: int) -> str:
    return f"{number >> 16}.{(number >> 8) & 0xFF:02d}.{number & 0xFF}"


# ---- the checks -----------------------------------------------------------------------------------------------
@dataclass
class Doctor:
    """Runs the checks in order; each returns Results and never raises for what it finds on the node."""

    config_path: Path
    slurm_conf: Path
    runner: Runner
    is_root: bool = field(default_factory=lambda: os.geteuid() == 0)
    # The host runs slinfer-gateway: its check runs too.
    gateway_host: bool = False

    def __post_init__(self) -> None:
        self.settings = read_slurm_conf(self.slurm_conf)
        self.plugin_dir = self.settings.get("plugindir", DEFAULT_PLUGIN_DIR).split(":")[0]
        self.config: config_mod.Config | None = None

    def checks(self) -> dict[str, Callable[[], list[Result]]]:
        return {"config": self.check_config, "plugin": self.check_plugin,
                "plugin-version": self.check_plugin_version, "hook": self.check_hook, "agent": self.check_agent,
                "tls": self.check_tls, "controller": self.check_controller, "engine-hop": self.check_engine_hop,
                "engines": self.check_engines, "containment": self.check_containment,
                "engine-python": self.check_engine_python, "pool": self.check_pool, "munge": self.check_munge,
                "gateway": self.check_gateway, "kubernetes": self.check_kubernetes}

    def run(self, skip: set[str] | None = None) -> Iterator[Result]:
        for name, check in self.checks().items():
            if name in (skip or set()):
                continue
            if name in ("agent", "tls", "controller", "engine-hop", "engines", "containment", "engine-python",
                        "pool", "gateway", "kubernetes") and self.config is None:
                continue  # the config line already failed, and says why
            if name == "gateway" and not self.gateway_host:
                continue
            yield from check()

    def _entry(self) -> PlugstackEntry | None:
        path = plugstack_path(self.settings, self.slurm_conf)
        return next((e for e in plugstack_entries(path, self.plugin_dir) if e.path.name == PLUGIN_FILE), None)

    def check_config(self) -> list[Result]:
        try:
            self.config = config_mod.load(self.config_path)
        except config_mod.ConfigError as exc:
            return [Result("config", False, str(exc), f"correct {exc.key} in {self.config_path}")]
        except OSError as exc:
            return [Result("config", False, f"{self.config_path}: {exc.strerror}",
                           "run as root, or make the file readable (root:slinfer 0640)")]
        names = ", ".join(m.name for m in self.config.models)
        if not self.config.models:
            return [Result("config", False, f"{self.config_path} loads but its catalog is empty",
                           "add a [[models]] table (see the commented example in the file)")]
        return [Result("config", True, f"{self.config_path} loads; catalog: {names}")]

    def check_plugin(self) -> list[Result]:
        done = self.runner.run(["sbatch", "--help"], 30)
        stack = plugstack_path(self.settings, self.slurm_conf)
        if done.code == 0 and "--inference" in done.output:
            return [Result("plugin", True, f"sbatch offers --inference (plugstack {stack})")]
        why = done.output.strip().splitlines()[-1] if done.output.strip() else f"exit {done.code}"
        if done.code is None or done.code != 0:
            return [Result("plugin", False, f"sbatch --help failed: {why}",
                           "install slurm-client and check SLURM_CONF / /etc/slurm/slurm.conf")]
        entry = self._entry()
        fix = (f"{entry.path} is listed in {entry.source}; check that file and the slurmd/sbatch logs"
               if entry else f"install slinfer-spank, or add the plugstack line (spank/README.md) to {stack}")
        return [Result("plugin", False, "sbatch --help does not show --inference: the plugin is not loaded", fix)]

    def check_plugin_version(self) -> list[Result]:
        entry = self._entry()
        if entry is None:
            return [Result("plugin-version", False, "no spank_slinfer.so in the plugstack",
                           "install slinfer-spank, or add its plugstack line")]
        try:
            built = elf_symbol_u32(entry.path, "plugin_version")
        except (OSError, ValueError) as exc:
            return [Result("plugin-version", False, f"cannot read {entry.path}: {exc}",
                           "reinstall slinfer-spank")]
        done = self.runner.run(["sinfo", "-V"], 30)
        # "slurm 22.05.8" from SchedMD's builds, "slurm-wlm 22.05.8" from Debian's.
        found = re.match(r"slurm\S*\s+(\d+\.\d+\.\d+)", done.output.strip())
        if done.code != 0 or not found:
            return [Result("plugin-version", False, f"sinfo -V failed: {done.output.strip()[-200:]}",
                           "install slurm-client and check SLURM_CONF")]
        running = found.group(1)
        built_text = version_text(built)
        if built_text.split(".")[:2] != running.split(".")[:2]:
            return [Result("plugin-version", False,
                           f"{entry.path.name} was built for Slurm {built_text}, this Slurm is {running}",
                           f"install the slinfer-spank built for Slurm {'.'.join(running.split('.')[:2])} "
                           "(or rebuild: make deb / make rpm against this Slurm's headers; for a release in a "
                           "root of its own, make -C spank SLURM_ROOT=/opt/slurm/RELEASE)")]
        return [Result("plugin-version", True, f"{entry.path} built for Slurm {built_text}, running {running}")]

    def check_hook(self) -> list[Result]:
        entry = self._entry()
        if entry is None:
            return [Result("hook", False, "no spank_slinfer.so in the plugstack, so no hook is run",
                           "install slinfer-spank, or add its plugstack line")]
        if "hook" not in entry.args:
            return [Result("hook", False, f"the spank_slinfer.so line in {entry.source} has no hook=",
                           "add hook=/usr/libexec/slinfer/slinfer-hook to the line")]
        hook = Path(entry.args["hook"])
        results = []
        try:
            real = hook.resolve(strict=True)
            st = real.stat()
        except OSError:
            return [Result("hook", False, f"{hook} does not exist", "install the slinfer package on this node")]
        # slurmd runs it as root: anyone who can change it owns the node.
        if st.st_uid != 0 or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return [Result("hook", False, f"{real} is owned by uid {st.st_uid} with mode {st.st_mode & 0o7777:o}",
                           f"chown root {real} && chmod go-w {real}")]
        done = self.runner.run([str(hook), "--help"], 60)
        if done.code != 0:
            return [Result("hook", False, f"{hook} --help failed: {done.output.strip()[-300:]}",
                           "reinstall the slinfer package (its Python environment is broken)")]
        wanted = entry.args.get("config", str(config_mod.DEFAULT_PATH))
        if Path(wanted).resolve() != self.config_path.resolve():
            results.append(Result("hook", False, f"the hook reads {wanted}, this check read {self.config_path}",
                                  f"run slinfer doctor --config {wanted}, or set config= in {entry.source}"))
        else:
            results.append(Result("hook", True, f"{hook} runs, reads {wanted}"))
        return results

    def check_agent(self) -> list[Result]:
        assert self.config is not None
        sock = Path(self.config.agent.socket)
        if not self.is_root:
            return [Result("agent", False, f"cannot check {sock} as uid {os.geteuid()}", "run slinfer doctor as root")]
        try:
            st = sock.lstat()
        except OSError:
            return [Result("agent", False, f"{sock} does not exist: the agent is not running",
                           "systemctl start slinfer-agent (the first --inference job's prolog also starts it)")]
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o077:
            return [Result("agent", False, f"{sock} must be a root-owned socket with mode 0600, it is uid "
                           f"{st.st_uid} mode {st.st_mode & 0o7777:o}",
                           "stop whatever made it, remove it and restart slinfer-agent")]
        from slinfer.v1 import agent_pb2, agent_pb2_grpc

        try:
            with grpc.insecure_channel(f"unix:{sock}") as channel:
                reply = agent_pb2_grpc.AgentStub(channel).ListEngines(agent_pb2.ListEnginesRequest(),
                                                                    timeout=RPC_TIMEOUT_S)
        except grpc.RpcError as exc:
            return [Result("agent", False, f"{sock} does not answer ListEngines: {_rpc_error(exc)}",
                           "systemctl restart slinfer-agent; see journalctl -u slinfer-agent")]
        return [Result("agent", True, f"{sock} (root, 0600) answers ListEngines: {len(reply.engines)} engine(s)")]

    def check_controller(self) -> list[Result]:
        assert self.config is not None
        address = self.config.controller.address
        token = self.config.controller.token
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        secured = "over TLS" if tls.client_uses_tls(self.config) else "in PLAINTEXT"
        try:
            channel_of = tls.sync_channel(address, self.config)
        except config_mod.ConfigError as exc:
            return [Result("controller", False, str(exc), f"correct {exc.key} (a readable PEM file)")]
        try:
            with channel_of as channel:
                # Called generically: any gRPC answer, even UNIMPLEMENTED from an older controller, proves it runs.
                status = channel.unary_unary("/slinfer.v1.Admin/Status")
                status(b"", timeout=RPC_TIMEOUT_S, metadata=metadata)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            if code == grpc.StatusCode.UNIMPLEMENTED:
                return [Result("controller", True, f"{address} answers gRPC {secured}")]
            if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                return [Result("controller", False, f"{address} refuses this config's token",
                               "use the same [controller].token on every node")]
            return [Result("controller", False, f"{address} does not answer: {_rpc_error(exc)} ({secured})",
                           "systemctl start slinfer-controller on the head node, set [controller].address to its "
                           "HOST:PORT, and give every node the same [controller].tls_ca (a TLS port refuses a "
                           "plaintext client, and a client refuses a certificate its CA did not sign)")]
        return [Result("controller", True, f"{address} answers gRPC {secured} (Admin.Status)")]

    def check_kubernetes(self) -> list[Result]:
        """The API server as this host's [kubernetes] reaches it: the leader, the standbys, the node Leases."""
        from slinfer.kube.health import doctor_check

        assert self.config is not None
        return [Result("kubernetes", ok, detail, fix) for ok, detail, fix in doctor_check(self.config)]

    def check_gateway(self) -> list[Result]:
        """A gateway host: the controller's feed takes this config's token; a rolling restart resets nothing."""
        from slinfer.v1 import gateway_pb2, gateway_pb2_grpc

        assert self.config is not None
        address = self.config.controller.address
        results = []
        try:
            with tls.sync_channel(address, self.config) as channel:
                report = gateway_pb2.GatewayReport(gateway=f"doctor@{os.uname().nodename}",
                                                   token=self.config.controller.token)
                gateway_pb2_grpc.GatewayFeedStub(channel).Report(report, timeout=RPC_TIMEOUT_S)
            results.append(Result("gateway", True, f"{address} feeds gateways (GatewayFeed.Report accepted)"))
        except config_mod.ConfigError as exc:
            results.append(Result("gateway", False, str(exc), f"correct {exc.key} (a readable PEM file)"))
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            fix = ("use the controller's [controller].token" if code == grpc.StatusCode.UNAUTHENTICATED else
                   "start slinfer-controller (of this release: older ones have no GatewayFeed) and set "
                   "[controller].address to its HOST:PORT")
            results.append(Result("gateway", False, f"{address}: GatewayFeed {_rpc_error(exc)}", fix))
        try:
            migrate = MIGRATE_REQ.read_text().strip()
        except OSError as exc:
            migrate = f"unreadable ({exc.strerror})"
        if migrate != "1":
            results.append(Result("gateway", False, f"net.ipv4.tcp_migrate_req is {migrate}: a rolling restart "
                                  "of the workers resets the connections queued on a closing worker",
                                  "echo net.ipv4.tcp_migrate_req=1 > /etc/sysctl.d/60-slinfer-gateway.conf && "
                                  "sysctl --system"))
        else:
            results.append(Result("gateway", True, "net.ipv4.tcp_migrate_req is 1 (rolling restarts reset nothing)"))
        return results

    def check_tls(self) -> list[Result]:
        """The certificates this node holds: the controller's (on the head node), the CA, an agent's client one."""
        assert self.config is not None
        c, a = self.config.controller, self.config.agent
        if not tls.client_uses_tls(self.config):
            return [Result("tls", False, "the gRPC port is plaintext: agents' reports carry every engine's API key "
                           "in the clear", "set [controller].tls_cert, tls_key and tls_ca (docs/admin/security.md)")]
        host = c.address.rpartition(":")[0].strip("[]")
        now = datetime.datetime.now(datetime.UTC)
        ca = None
        results = []
        if c.tls_ca:
            ca, problem = _load_cert(c.tls_ca)
            if ca is None:
                return [Result("tls", False, f"controller.tls_ca: {problem}", "point it at the site CA's PEM file")]
            results.append(_dates("tls", f"CA {c.tls_ca}", ca, now))
        for key, path, name in (("controller.tls_cert", c.tls_cert, host), ("agent.tls_cert", a.tls_cert, "")):
            if not path:
                continue
            if key == "controller.tls_cert" and not Path(path).exists():
                # A compute node has the shared config but not the head node's files: the handshake checks it.
                results.append(Result("tls", True, f"{key} is not on this node (the controller line verifies "
                                      "what the port serves)"))
                continue
            cert, problem = _load_cert(path)
            if cert is None:
                results.append(Result("tls", False, f"{key}: {problem}", "point it at a readable PEM certificate"))
                continue
            results.append(_dates("tls", f"{key} {path}", cert, now))
            if ca is not None:
                try:
                    cert.verify_directly_issued_by(ca)
                except (ValueError, TypeError, InvalidSignature):
                    results.append(Result("tls", False, f"{key} {path} was not issued by {c.tls_ca}",
                                          "issue it from the CA in controller.tls_ca, or point tls_ca at its CA"))
            if name and name not in _names(cert):
                results.append(Result("tls", False, f"{key} {path} is for {', '.join(_names(cert)) or 'no name'}, "
                                      f"not {name!r} of controller.address",
                                      "issue it with that name (subjectAltName), or set controller.address to one "
                                      "of its names"))
        failed = [r for r in results if not r.ok]
        if failed:
            return failed
        mode = "mutual TLS" if c.tls_client_auth else "TLS"
        return [Result("tls", True, f"{mode}; " + "; ".join(r.detail for r in results))]

    def check_engine_hop(self) -> list[Result]:
        assert self.config is not None
        a, g = self.config.agent, self.config.gateway
        if a.engine_tls_cert:
            ca = g.engine_ca or "the system's CAs"
            return [Result("engine-hop", True, f"engines serve HTTPS with {a.engine_tls_cert}; the gateway verifies "
                           f"them against {ca}")]
        return [Result("engine-hop", True, "the gateway-to-engine hop is PLAINTEXT HTTP on the cluster network: "
                       "prompts, answers and engine API keys cross it in the clear",
                       "give engines node certificates ([agent].engine_tls_cert/engine_tls_key) and the gateway "
                       "their CA ([gateway].engine_ca)", note=True)]

    def check_engines(self) -> list[Result]:
        assert self.config is not None
        agent = self.config.agent
        results = []
        imports: dict[tuple[str, tuple[tuple[str, str], ...]], Result] = {}
        for model in self.config.models:
            check = f"engine {model.name}"
            template = model.engine_command or agent.engine_command
            if model.source.startswith("/") and not Path(model.source).exists():
                results.append(Result(check, False, f"source {model.source} does not exist on this node",
                                      "put the weights there (shared storage), or fix models.source"))
                continue
            program = agent.python if template[0] == "{python}" else template[0]
            found = shutil.which(program)
            if not found:
                what = "[agent].python" if template[0] == "{python}" else "the engine command"
                results.append(Result(check, False, f"{what} {program!r} is not an executable on this node",
                                      "install it, or point the config at the right path"))
                continue
            if template[0] != "{python}":
                results.append(Result(check, True, f"{found} exists (what runs inside it is not checked)"))
                continue
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/tmp",
                   **agent.engine_env, **model.engine_env}
            key = (found, tuple(sorted(env.items())))
            if key not in imports:
                done = self.runner.run([found, "-c", "import vllm; print('vllm', vllm.__version__)"],
                                       IMPORT_TIMEOUT_S, env=env)
                version = done.output.strip().splitlines()[-1] if done.output.strip() else ""
                if done.code == 0 and version.startswith("vllm "):
                    imports[key] = Result(check, True, f"{found} imports {version}")
                else:
                    imports[key] = Result(check, False, f"{found} cannot import vllm: {version[-200:]}",
                                          "install vLLM into that Python, or set [agent].python to one that has it")
            previous = imports[key]
            results.append(Result(check, previous.ok, previous.detail, previous.fix))
        return results

    def check_containment(self) -> list[Result]:
        """Engines live in their job's cgroups only where Slurm gives each job an extern step in cgroups."""
        assert self.config is not None
        proctrack = self.settings.get("proctracktype", "proctrack/cgroup")
        flags = [f.strip().lower() for f in self.settings.get("prologflags", "").split(",")]
        missing = [what for what, ok in ((f"ProctrackType=proctrack/cgroup (is {proctrack})",
                                          proctrack == "proctrack/cgroup"),
                                         ("PrologFlags=Contain", "contain" in flags),
                                         ("[agent].contain = true", self.config.agent.contain)) if not ok]
        if missing:
            return [Result("containment", True, "engines are NOT contained in their jobs' cgroups: the job's "
                           "memory, core and device limits do not bind them and Slurm cannot kill them itself",
                           f"set {', '.join(missing)}", note=True)]
        return [Result("containment", True, "engines join their job's extern-step cgroups (proctrack/cgroup, "
                                            "PrologFlags=Contain)")]

    def check_pool(self) -> list[Result]:
        """sbatch refuses --inference-pool at submit from the users the plugstack line's pool_users= names; the
        agent refuses it at the prolog from those the config names. The two lists must be one."""
        assert self.config is not None
        wanted = ",".join(sorted(config_mod.pool_users(self.config)))
        entry = self._entry()
        given = entry.args.get("pool_users") if entry is not None else None
        if given is None:
            return [Result("pool", True, "sbatch does not refuse another user's --inference-pool at submit (the "
                           "agent refuses it at the prolog, failing the job)",
                           f"add pool_users={wanted} to the spank_slinfer.so plugstack line", note=True)]
        if sorted(given.split(",")) != wanted.split(","):
            return [Result("pool", False, f"the plugstack line's pool_users={given} is not the config's "
                           f"controller.user and agent.pool_users ({wanted}): sbatch and the agent would disagree "
                           "on who may publish to the shared pool", f"set pool_users={wanted} on the line")]
        return [Result("pool", True, f"only {wanted} may publish an engine to the shared pool (sbatch and the "
                                     "agent agree)")]

    def check_engine_python(self) -> list[Result]:
        """The warm start runs [agent].python as root: only where it and its import path are root's alone."""
        assert self.config is not None
        agent = self.config.agent
        if not agent.warm_start:
            return [Result("engine-python", True, "agent.warm_start is off: engines start cold, as their job's "
                                                  "user", note=True)]
        from slinfer.agent.warmstart import TEMPLATE_SCRIPT

        env = {"PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"), **agent.engine_env}
        verdict = enginetrust.check(agent.python, env, [str(TEMPLATE_SCRIPT.parent)])
        if not verdict.trusted:
            return [Result("engine-python", False, f"the warm template would run {agent.python} as root, but "
                           f"{verdict.problem}: whoever can write there could own this node, so engines start "
                           "cold", "make the engine Python's files root's and not group- or world-writable "
                           "(chown -R root, chmod -R go-w), or set agent.warm_start = false")]
        return [Result("engine-python", True, f"{agent.python} and its import path are root's alone "
                                              f"({verdict.checked} paths): the warm template may run it")]

    def check_munge(self) -> list[Result]:
        sock = munge_socket(self.settings)
        extra = [f"--socket={sock}"] if sock else []
        where = sock or "munge's default socket"
        made = self.runner.run(["munge", "-n", *extra], 15)
        if made.code != 0:
            return [Result("munge", False, f"munge -n via {where} failed: {made.output.strip()[-200:]}",
                           "systemctl start munge (with the cluster's /etc/munge/munge.key)")]
        back = self.runner.run(["unmunge", *extra], 15, stdin=made.output.encode())
        if back.code != 0 or "STATUS:" not in back.output or "Success" not in back.output:
            return [Result("munge", False, f"unmunge via {where} failed: {back.output.strip()[-200:]}",
                           "check munged's log; every node needs the same munge.key and a synchronised clock")]
        return [Result("munge", True, f"munge -n | unmunge via {where}: Success")]


def _load_cert(path: str) -> tuple[x509.Certificate | None, str]:
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes()), ""
    except OSError as exc:
        return None, f"cannot read {path}: {exc.strerror}"
    except ValueError:
        return None, f"{path} is not a PEM certificate"


def _names(cert: x509.Certificate) -> list[str]:
    try:
        alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*alt.get_values_for_type(x509.DNSName), *(str(ip) for ip in alt.get_values_for_type(x509.IPAddress))]


def _dates(check: str, what: str, cert: x509.Certificate, now: datetime.datetime) -> Result:
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now < start:
        return Result(check, False, f"{what} is not valid before {start:%Y-%m-%d %H:%M} UTC",
                      "check this node's clock, or issue a certificate valid now")
    if now > end:
        return Result(check, False, f"{what} expired on {end:%Y-%m-%d}", "renew it (docs/admin/security.md)")
    days = (end - now).days
    if days < EXPIRY_WARNING_DAYS:
        return Result(check, False, f"{what} expires in {days} day(s), on {end:%Y-%m-%d}",
                      "renew it now (docs/admin/security.md)")
    return Result(check, True, f"{what} valid until {end:%Y-%m-%d}")


def _rpc_error(exc: grpc.RpcError) -> str:
    if isinstance(exc, grpc.Call):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc)


# ---- command line -----------------------------------------------------------------------------------------------
def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser("doctor", help="check this node's slinfer installation (run as root)")
    parser.add_argument("--config", type=Path, default=None,
                        help=f"slinfer config (default $SLINFER_CONFIG, else {config_mod.DEFAULT_PATH})")
    parser.add_argument("--skip", action="append", default=[], choices=CHECKS,
                        help="leave out a check, e.g. --skip agent on a head node (repeatable)")
    parser.add_argument("--gateway-host", action="store_true",
                        help="this host runs slinfer-gateway: check the controller's feed and tcp_migrate_req")
    parser.set_defaults(func=_command)


def _command(args: argparse.Namespace) -> int:
    config_path = args.config or Path(os.environ.get("SLINFER_CONFIG") or config_mod.DEFAULT_PATH)
    doctor = Doctor(config_path, slurm_conf_path(), Runner(), gateway_host=args.gateway_host)
    failed = 0
    for result in doctor.run(set(args.skip)):
        print(result.line(), flush=True)
        failed += not result.ok
    if failed:
        print(f"slinfer doctor: {failed} check(s) failed", file=sys.stderr)
    return 1 if failed else 0
