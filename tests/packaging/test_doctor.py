"""`slinfer doctor`'s logic against real parts: Slurm's own sbatch and sinfo with generated configs, the compiled
SPANK plugin, munge, real Pythons with and without vLLM, real sockets. The bed run (all OK) is in
test_doctor_bed.py."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import pytest

from slinfer.cli import doctor
from tests.packaging import artefacts

REPO = Path(__file__).resolve().parents[2]
PLUGIN = REPO / "spank" / "spank_slinfer.so"
HEADER = Path("/usr/include/slurm/slurm_version.h")
needs_plugin = pytest.mark.skipif(not PLUGIN.exists(), reason="spank/spank_slinfer.so is not built (make spank)")
needs_slurm = pytest.mark.skipif(not shutil.which("sbatch"), reason="Slurm's client commands are not installed")


def _site(tmp: Path, plugstack: str, extra: str = "") -> Path:
    """A slurm.conf that sbatch --help accepts without a running slurmctld."""
    conf = tmp / "slurm.conf"
    conf.write_text(f"ClusterName=doctor\nSlurmctldHost=localhost\nPlugStackConfig={tmp}/plugstack.conf\n{extra}"
                    "NodeName=n1 CPUs=1\nPartitionName=p Nodes=n1\n")
    (tmp / "plugstack.conf").write_text(plugstack)
    return conf


def _config(tmp: Path, body: str) -> Path:
    path = tmp / "slinfer.toml"
    path.write_text(body)
    return path


def _doctor(tmp: Path, conf: Path, config: Path, monkeypatch: pytest.MonkeyPatch) -> doctor.Doctor:
    monkeypatch.setenv("SLURM_CONF", str(conf))
    return doctor.Doctor(config, conf, doctor.Runner())


def _by_check(results: list[doctor.Result]) -> dict[str, doctor.Result]:
    return {r.check: r for r in results}


@needs_plugin
def test_plugin_version_is_read_from_the_elf_file_as_slurm_does() -> None:
    number = int(re.search(r"SLURM_VERSION_NUMBER (0x[0-9a-fA-F]+)", HEADER.read_text()).group(1), 16)  # type: ignore[union-attr]
    assert doctor.elf_symbol_u32(PLUGIN, "plugin_version") == number
    assert doctor.elf_symbol_u32(PLUGIN, "spank_plugin_version") == 1
    with pytest.raises(ValueError, match="no symbol"):
        doctor.elf_symbol_u32(PLUGIN, "no_such_symbol")


def test_a_file_that_is_not_elf_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "fake.so"
    path.write_bytes(b"#!/bin/sh\n" * 20)
    with pytest.raises(ValueError, match="not a 64-bit little-endian ELF"):
        doctor.elf_symbol_u32(path, "plugin_version")


def test_slurm_conf_settings_munge_socket_and_plugstack_includes(tmp_path: Path) -> None:
    conf = tmp_path / "slurm.conf"
    conf.write_text("# comment\nAuthType=auth/munge\nAuthInfo=ttl=60,socket=/x/munge.socket  # bed\n"
                    "PluginDir=/plugins:/more\nNodeName=n1 CPUs=2\n")
    settings = doctor.read_slurm_conf(conf)
    assert doctor.munge_socket(settings) == "/x/munge.socket"
    assert doctor.munge_socket({}) == ""
    # Slurm's default: plugstack.conf next to slurm.conf.
    assert doctor.plugstack_path(settings, conf) == tmp_path / "plugstack.conf"
    (tmp_path / "plugstack.conf.d").mkdir()
    (tmp_path / "plugstack.conf").write_text(f"optional other.so\ninclude {tmp_path}/plugstack.conf.d/*.conf\n")
    (tmp_path / "plugstack.conf.d" / "slinfer.conf").write_text(
        "# the package's line\nrequired spank_slinfer.so hook=/usr/libexec/slinfer/slinfer-hook config=/c.toml\n")
    entries = list(doctor.plugstack_entries(tmp_path / "plugstack.conf", "/plugins"))
    assert [(e.path, e.required) for e in entries] == [(Path("/plugins/other.so"), False),
                                                       (Path("/plugins/spank_slinfer.so"), True)]
    assert entries[1].args == {"hook": "/usr/libexec/slinfer/slinfer-hook", "config": "/c.toml"}
    assert entries[1].source == tmp_path / "plugstack.conf.d" / "slinfer.conf"


@needs_plugin
@needs_slurm
def test_plugin_checks_pass_with_the_plugin_in_the_plugstack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hook = tmp_path / "hook"
    hook.write_text("#!/bin/sh\nexit 0\n")
    hook.chmod(0o755)
    config = _config(tmp_path, '[[models]]\nname = "m"\nsource = "hub/id"\n')
    conf = _site(tmp_path, f"required {PLUGIN} hook={hook} config={config}\n")
    results = _by_check(list(_doctor(tmp_path, conf, config, monkeypatch).run(
        {"agent", "controller", "engines", "munge"})))
    assert results["config"].ok and "catalog: m" in results["config"].detail
    assert results["plugin"].ok, results["plugin"].line()
    assert results["plugin-version"].ok, results["plugin-version"].line()
    number = int(re.search(r"SLURM_VERSION_NUMBER (0x[0-9a-fA-F]+)", HEADER.read_text()).group(1), 16)  # type: ignore[union-attr]
    assert f"built for Slurm {doctor.version_text(number)}, running " in results["plugin-version"].detail
    assert results["hook"].ok, results["hook"].line()


@needs_slurm
def test_plugin_missing_from_the_plugstack_fails_with_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _config(tmp_path, '[[models]]\nname = "m"\nsource = "hub/id"\n')
    conf = _site(tmp_path, "")
    results = _by_check(list(_doctor(tmp_path, conf, config, monkeypatch).run(
        {"agent", "controller", "engines", "munge"})))
    assert not results["plugin"].ok
    assert "does not show --inference" in results["plugin"].detail
    assert f"{tmp_path}/plugstack.conf" in results["plugin"].fix
    assert not results["plugin-version"].ok
    assert not results["hook"].ok
    assert "FAIL plugin: " in results["plugin"].line() and " -- fix: " in results["plugin"].line()


@needs_plugin
@needs_slurm
def test_hook_that_group_can_write_or_that_reads_another_config_fails(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    hook = tmp_path / "hook"
    hook.write_text("#!/bin/sh\nexit 0\n")
    hook.chmod(0o775)
    config = _config(tmp_path, '[[models]]\nname = "m"\nsource = "hub/id"\n')
    conf = _site(tmp_path, f"required {PLUGIN} hook={hook} config=/etc/other.toml\n")
    check = _doctor(tmp_path, conf, config, monkeypatch)
    (result,) = check.check_hook()
    assert not result.ok and "mode 775" in result.detail and "chmod go-w" in result.fix
    hook.chmod(0o755)
    (result,) = check.check_hook()
    assert not result.ok and "the hook reads /etc/other.toml" in result.detail
    assert "--config /etc/other.toml" in result.fix


@needs_plugin
@needs_slurm
def test_plugin_built_for_another_slurm_release_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The real plugin with its plugin_version patched to 23.02.1: exactly what Slurm would refuse to load.
    data = bytearray(PLUGIN.read_bytes())
    real = doctor.elf_symbol_u32(PLUGIN, "plugin_version")
    at = data.find(real.to_bytes(4, "little"))
    other = tmp_path / "spank_slinfer.so"
    data[at:at + 4] = (0x170201).to_bytes(4, "little")
    other.write_bytes(bytes(data))
    assert doctor.elf_symbol_u32(other, "plugin_version") == 0x170201
    config = _config(tmp_path, "")
    conf = _site(tmp_path, f"required {other} hook=/bin/true\n")
    # sinfo -V needs a loadable slurm.conf; the empty plugstack keeps sinfo from loading the patched plugin.
    conf.write_text(conf.read_text().replace(f"PlugStackConfig={tmp_path}/plugstack.conf",
                                             f"PlugStackConfig={tmp_path}/empty.conf"))
    (tmp_path / "empty.conf").write_text("")
    check = _doctor(tmp_path, conf, config, monkeypatch)
    monkeypatch.setattr(check, "_entry", lambda: doctor.PlugstackEntry(other, True, {}, tmp_path / "p"))
    (result,) = check.check_plugin_version()
    assert not result.ok
    assert "was built for Slurm 23.02.1, this Slurm is 22.05" in result.detail
    assert "slinfer-spank built for Slurm 22.05" in result.fix


def test_engine_command_checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """{python} must exist and import vllm; a container command must exist; a source path must exist."""
    no_vllm = shutil.which("python3.11") or "/usr/bin/python3"
    config = _config(tmp_path, f"""
[agent]
python = "{no_vllm}"
[[models]]
name = "a"
source = "hub/a"
[[models]]
name = "b"
source = "hub/b"
[[models]]
name = "c"
source = "{tmp_path}/no-such-weights"
[[models]]
name = "d"
source = "hub/d"
engine_command = ["no-such-runtime", "exec", "{{source}}"]
[[models]]
name = "e"
source = "{tmp_path}"
engine_command = ["{shutil.which('true')}", "{{source}}"]
""")
    conf = _site(tmp_path, "")
    check = _doctor(tmp_path, conf, config, monkeypatch)
    calls: list[list[str]] = []
    real_run = check.runner.run

    def counting(argv: list[str], timeout: float, env: dict[str, str] | None = None,
                 stdin: bytes | None = None) -> doctor.Completed:
        calls.append(argv)
        return real_run(argv, timeout, env, stdin)

    monkeypatch.setattr(check.runner, "run", counting)
    check.check_config()
    results = _by_check(check.check_engines())
    assert not results["engine a"].ok and "cannot import vllm" in results["engine a"].detail
    assert "No module named 'vllm'" in results["engine a"].detail
    # Both models use the same Python: it is tried once.
    assert results["engine b"].detail == results["engine a"].detail and len(calls) == 1
    assert not results["engine c"].ok and "does not exist on this node" in results["engine c"].detail
    assert not results["engine d"].ok and "'no-such-runtime' is not an executable" in results["engine d"].detail
    assert results["engine e"].ok and "not checked" in results["engine e"].detail


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="this Python has no vLLM")
def test_python_with_vllm_passes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _config(tmp_path, f'[agent]\npython = "{sys.executable}"\n[[models]]\nname = "a"\nsource = "x/y"\n')
    check = _doctor(tmp_path, _site(tmp_path, ""), config, monkeypatch)
    check.check_config()
    (result,) = check.check_engines()
    assert result.ok and re.search(r"imports vllm \d", result.detail), result.line()


def test_agent_socket_missing_or_open_to_others_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sock_path = tmp_path / "agent.sock"
    config = _config(tmp_path, f'[agent]\nsocket = "{sock_path}"\n')
    check = _doctor(tmp_path, _site(tmp_path, ""), config, monkeypatch)
    check.check_config()
    check.is_root = True
    (result,) = check.check_agent()
    assert not result.ok and "does not exist" in result.detail and "systemctl start slinfer-agent" in result.fix
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(sock_path))
        sock_path.chmod(0o666)
        (result,) = check.check_agent()
        assert not result.ok and "mode 0600" in result.detail and "mode 666" in result.detail
        sock_path.chmod(0o600)
        if os.geteuid() == 0:
            # Right owner and mode, but nothing speaks gRPC on it.
            listener.listen(1)
            (result,) = check.check_agent()
            assert not result.ok and "does not answer ListEngines" in result.detail
    check.is_root = False
    (result,) = check.check_agent()
    assert not result.ok and result.fix == "run slinfer doctor as root"


def test_controller_not_listening_fails_with_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = _config(tmp_path, f'[controller]\naddress = "127.0.0.1:{port}"\n')
    check = _doctor(tmp_path, _site(tmp_path, ""), config, monkeypatch)
    check.check_config()
    (result,) = check.check_controller()
    assert not result.ok and f"127.0.0.1:{port} does not answer: UNAVAILABLE" in result.detail
    assert "slinfer-controller" in result.fix


@pytest.mark.skipif(not shutil.which("munge"), reason="munge is not installed")
def test_munge_through_a_socket_that_is_not_there_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = _site(tmp_path, "", extra=f"AuthInfo=socket={tmp_path}/munge.socket\n")
    check = _doctor(tmp_path, conf, _config(tmp_path, ""), monkeypatch)
    (result,) = check.check_munge()
    assert not result.ok and f"via {tmp_path}/munge.socket failed" in result.detail
    assert "munge" in result.fix


def test_command_line_exit_code_and_a_bad_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from slinfer.cli import main as cli

    config = _config(tmp_path, "[agent]\nno_such_key = 1\n")
    monkeypatch.setenv("SLURM_CONF", str(_site(tmp_path, "")))
    code = cli.main(["doctor", "--config", str(config), "--skip", "plugin", "--skip", "plugin-version",
                     "--skip", "hook", "--skip", "munge"])
    out = capsys.readouterr().out
    assert code == 1
    # One line: the key, the problem and the fix (the list of known keys grows with the config).
    (line,) = out.splitlines()
    assert line.startswith("FAIL config: agent.no_such_key: unknown key (known: address, ")
    assert line.endswith(f") -- fix: correct agent.no_such_key in {config}")


@pytest.mark.parametrize(("settings", "contained", "names"), [
    ("ProctrackType=proctrack/cgroup\nPrologFlags=Alloc,Contain\n", True, ""),
    ("ProctrackType=proctrack/linuxproc\nPrologFlags=Alloc,Contain\n", False, "proctrack/linuxproc"),
    ("ProctrackType=proctrack/cgroup\nPrologFlags=Alloc\n", False, "PrologFlags=Contain"),
])
def test_containment_says_when_engines_escape_their_jobs_limits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 settings: str, contained: bool, names: str) -> None:
    config = _config(tmp_path, '[[models]]\nname = "m"\nsource = "hub/id"\n')
    conf = _site(tmp_path, "", extra=settings)
    results = _by_check(list(_doctor(tmp_path, conf, config, monkeypatch).run(
        {"plugin", "plugin-version", "hook", "agent", "controller", "engines", "munge"})))
    line = results["containment"]
    # Not contained is said (NOTE) but fails nothing: a site may run without cgroups.
    assert line.ok and line.note is not contained, line.line()
    assert line.line().startswith("OK  " if contained else "NOTE"), line.line()
    assert names in (line.detail if contained else line.fix)


def test_containment_is_off_when_the_agent_is_told_not_to(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _config(tmp_path, '[agent]\ncontain = false\n[[models]]\nname = "m"\nsource = "hub/id"\n')
    conf = _site(tmp_path, "", extra="ProctrackType=proctrack/cgroup\nPrologFlags=Contain\n")
    results = _by_check(list(_doctor(tmp_path, conf, config, monkeypatch).run(
        {"plugin", "plugin-version", "hook", "agent", "controller", "engines", "munge"})))
    assert results["containment"].note and "[agent].contain = true" in results["containment"].fix


def test_plugin_built_for_another_release_fails_with_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The 24.11 plugin as `make slurm SLURM_RELEASE=24.11` builds it, against the system's 22.05 clients.
    other = Path(__file__).resolve().parents[2] / "spank" / "build" / "24.11" / "spank_slinfer.so"
    if not other.exists():
        artefacts.missing(f"{other} is not built (make slurm SLURM_RELEASE=24.11)")
    assert doctor.version_text(doctor.elf_symbol_u32(other, "plugin_version")).startswith("24.11.")
    config = _config(tmp_path, "")
    conf = _site(tmp_path, f"required {other} hook=/bin/true\n")
    conf.write_text(conf.read_text().replace(f"PlugStackConfig={tmp_path}/plugstack.conf",
                                             f"PlugStackConfig={tmp_path}/empty.conf"))
    (tmp_path / "empty.conf").write_text("")
    check = _doctor(tmp_path, conf, config, monkeypatch)
    monkeypatch.setattr(check, "_entry", lambda: doctor.PlugstackEntry(other, True, {}, tmp_path / "p"))
    (result,) = check.check_plugin_version()
    assert not result.ok
    assert "was built for Slurm 24.11." in result.detail and "this Slurm is 22.05" in result.detail
    assert "slinfer-spank built for Slurm 22.05" in result.fix and "SLURM_ROOT=" in result.fix


def test_gateway_host_line_checks_the_feed_token_and_migrate_req(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Against a real GatewayHub behind a real gRPC server (in a thread of its own: doctor's calls block)."""
    import asyncio
    import threading

    import grpc

    from slinfer.controller import gatewayhub
    from slinfer.controller.gatewayhub import GatewayHub
    from slinfer.controller.keys import KeyStore
    from slinfer.controller.limits import KeyLimits, Limiter
    from slinfer.controller.registry import Registry
    from slinfer.controller.usage import UsageLedger

    loop = asyncio.new_event_loop()
    ready = threading.Event()
    port: list[int] = []
    server_box: list[grpc.aio.Server] = []

    async def serve() -> None:
        ledger = UsageLedger(tmp_path / "usage")
        hub = GatewayHub(Registry(), KeyStore(tmp_path / "keys.json"), Limiter(KeyLimits(), ledger.tokens_today),
                         ledger, "feed-token", lambda m: False, [], warmup_s=0.0)
        server = grpc.aio.server()
        gatewayhub.add_to_server(hub, server)  # pre-serialized pages
        port.append(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        server_box.append(server)
        ready.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(serve()), loop.run_forever()), daemon=True)
    thread.start()
    assert ready.wait(10)
    migrate = tmp_path / "tcp_migrate_req"
    monkeypatch.setattr(doctor, "MIGRATE_REQ", migrate)
    try:
        for token, migrate_value, expect in (("feed-token", "1", (True, True)), ("wrong", "0", (False, False))):
            migrate.write_text(f"{migrate_value}\n")
            config = _config(tmp_path, f'[controller]\naddress = "127.0.0.1:{port[0]}"\ntoken = "{token}"\n')
            check = _doctor(tmp_path, _site(tmp_path, ""), config, monkeypatch)
            check.gateway_host = True
            check.check_config()
            feed, knob = check.check_gateway()
            assert (feed.ok, knob.ok) == expect, (feed.line(), knob.line())
            if not feed.ok:
                assert "UNAUTHENTICATED" in feed.detail and "[controller].token" in feed.fix
                assert "sysctl" in knob.fix and "is 0" in knob.detail
        # Without --gateway-host the line is not run at all.
        check.gateway_host = False
        assert "gateway" not in _by_check(list(check.run({"plugin", "plugin-version", "hook", "agent", "controller",
                                                          "engines", "munge", "tls", "engine-hop", "containment"})))
    finally:
        asyncio.run_coroutine_threadsafe(server_box[0].stop(0), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the probe runs the interpreter as nobody")
def test_engine_python_names_what_another_user_could_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 27: the warm template runs [agent].python as root. A stand-in interpreter (prints its import path)
    in a root-owned folder is trusted; made world-writable, doctor fails naming it; warm start off is a NOTE."""
    top = Path(tempfile.mkdtemp(prefix="slinfer-doctor-py-"))
    try:
        top.chmod(0o755)
        python = top / "python"
        python.write_text(f"#!/bin/sh\necho '[\"{python}\"]'\n")
        python.chmod(0o755)
        conf = _site(tmp_path, "")
        config = _config(tmp_path, f'[agent]\npython = "{python}"\n')
        skip = {"plugin", "plugin-version", "hook", "agent", "controller", "engines", "munge", "tls", "engine-hop",
                "containment"}
        line = _by_check(list(_doctor(tmp_path, conf, config, monkeypatch).run(skip)))["engine-python"]
        assert line.ok and not line.note and "root's alone" in line.detail, line.line()
        python.chmod(0o757)
        line = _by_check(list(_doctor(tmp_path, conf, config, monkeypatch).run(skip)))["engine-python"]
        assert not line.ok and f"{python} is writable by its group or by everyone (mode 757)" in line.detail
        assert "agent.warm_start = false" in line.fix
        config = _config(tmp_path, f'[agent]\npython = "{python}"\nwarm_start = false\n')
        line = _by_check(list(_doctor(tmp_path, conf, config, monkeypatch).run(skip)))["engine-python"]
        assert line.ok and line.note, line.line()
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.mark.parametrize(("line_args", "ok", "note", "said"), [
    ("", True, True, "add pool_users=root,trusted"),
    (" pool_users=trusted,root", True, False, "only root,trusted may publish"),
    (" pool_users=root", False, False, "pool_users=root is not the config's"),
])
def test_pool_users_of_the_plugstack_and_the_config_are_one_list(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, line_args: str, ok: bool, note: bool, said: str) -> None:
    """Issue 27: sbatch refuses --inference-pool at submit from whom the plugstack's pool_users= does not name,
    the agent at the prolog from whom the config does not: doctor fails where the two lists differ."""
    conf = _site(tmp_path, f"required {tmp_path}/spank_slinfer.so hook=/x{line_args}\n")
    config = _config(tmp_path, '[controller]\nuser = "root"\n[agent]\npool_users = ["trusted"]\n')
    skip = {"plugin", "plugin-version", "hook", "agent", "controller", "engines", "munge", "tls", "engine-hop",
            "containment", "engine-python"}
    line = _by_check(list(_doctor(tmp_path, conf, config, monkeypatch).run(skip)))["pool"]
    assert (line.ok, line.note) == (ok, note), line.line()
    assert said in line.line(), line.line()
