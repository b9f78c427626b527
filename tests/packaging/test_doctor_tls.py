"""`slinfer doctor`'s tls and engine-hop lines against real certificates (made with `cryptography`) and a real
TLS controller port: a good setup is OK, and each fault (plaintext, expired, not yet valid, about to expire,
another CA, another name, an unreadable file) fails with its fix; the plaintext engine hop is a NOTE."""

from __future__ import annotations

import asyncio
import datetime
import socket
from pathlib import Path

import grpc
import pytest

from slinfer import tls
from slinfer.cli import doctor
from slinfer.config import parse

NOW = datetime.datetime.now(datetime.UTC)


@pytest.fixture(scope="module")
def cas(tmp_path_factory: pytest.TempPathFactory) -> tuple[tls.CertificateAuthority, tls.CertificateAuthority]:
    folder = tmp_path_factory.mktemp("cas")
    return tls.CertificateAuthority(folder / "site"), tls.CertificateAuthority(folder / "other")


def _doctor(tmp: Path, body: str) -> doctor.Doctor:
    path = tmp / "slinfer.toml"
    path.write_text(body)
    check = doctor.Doctor(path, tmp / "slurm.conf", doctor.Runner(), is_root=True)
    check.check_config()
    return check


def _controller(cert: tls.Issued, ca: Path, address: str = "127.0.0.1:8790") -> str:
    return (f'[controller]\naddress = "{address}"\ntoken = "t"\ntls_cert = "{cert.cert}"\ntls_key = "{cert.key}"\n'
            f'tls_ca = "{ca}"\n')


def test_a_good_setup_is_ok(tmp_path: Path, cas) -> None:
    site, _ = cas
    cert = site.issue("good", ["127.0.0.1", "head01"])
    (line,) = _doctor(tmp_path, _controller(cert, site.cert_path)).check_tls()
    assert line.ok, line.line()
    assert line.detail.startswith("TLS; CA ") and "controller.tls_cert" in line.detail and "valid until" in line.detail


def test_a_plaintext_port_fails_and_says_keys_cross_in_the_clear(tmp_path: Path) -> None:
    (line,) = _doctor(tmp_path, '[controller]\ntoken = "t"\n').check_tls()
    assert not line.ok and "plaintext" in line.detail and "API key" in line.detail
    assert "tls_cert" in line.fix


@pytest.mark.parametrize(("start", "days", "wanted"), [
    (NOW - datetime.timedelta(days=40), 30, "expired on"),
    (NOW + datetime.timedelta(days=2), 30, "is not valid before"),
    (NOW - datetime.timedelta(days=1), 6, "expires in 4 day(s)"),
])
def test_dates_out_of_range_or_close_to_the_end_fail(tmp_path: Path, cas, start, days, wanted) -> None:
    site, _ = cas
    cert = site.issue(f"dated-{days}-{start:%s}", ["127.0.0.1"], not_before=start, days=days)
    (line,) = _doctor(tmp_path, _controller(cert, site.cert_path)).check_tls()
    assert not line.ok and wanted in line.detail, line.line()
    assert "renew" in line.fix or "clock" in line.fix


def test_a_certificate_of_another_ca_or_for_another_name_fails(tmp_path: Path, cas) -> None:
    site, other = cas
    foreign = other.issue("foreign", ["127.0.0.1"])
    (line,) = _doctor(tmp_path, _controller(foreign, site.cert_path)).check_tls()
    assert not line.ok and f"was not issued by {site.cert_path}" in line.detail
    misnamed = site.issue("misnamed", ["head02"])
    (line,) = _doctor(tmp_path, _controller(misnamed, site.cert_path, "head01:8790")).check_tls()
    assert not line.ok and "is for head02, not 'head01' of controller.address" in line.detail
    assert "subjectAltName" in line.fix


def test_an_unreadable_ca_fails_with_its_key(tmp_path: Path, cas) -> None:
    site, _ = cas
    cert = site.issue("ok", ["127.0.0.1"])
    (line,) = _doctor(tmp_path, _controller(cert, tmp_path / "absent.pem")).check_tls()
    assert not line.ok and line.detail.startswith("controller.tls_ca: cannot read")


def test_a_compute_node_without_the_controllers_files_is_ok(tmp_path: Path, cas) -> None:
    site, _ = cas
    absent = tls.Issued(tmp_path / "head-only.pem", tmp_path / "head-only.key")
    (line,) = _doctor(tmp_path, _controller(absent, site.cert_path)).check_tls()
    assert line.ok and "not on this node" in line.detail


def test_the_engine_hop_is_a_note_when_plaintext_and_ok_with_certificates(tmp_path: Path, cas) -> None:
    (line,) = _doctor(tmp_path, '[controller]\ntoken = "t"\n').check_engine_hop()
    assert line.note and line.line().startswith("NOTE engine-hop: the gateway-to-engine hop is PLAINTEXT HTTP")
    site, _ = cas
    node = site.issue("node", ["127.0.0.1"])
    (line,) = _doctor(tmp_path, f'[agent]\nengine_tls_cert = "{node.cert}"\nengine_tls_key = "{node.key}"\n'
                                f'[gateway]\nengine_ca = "{site.cert_path}"\n').check_engine_hop()
    assert line.ok and not line.note and f"verifies them against {site.cert_path}" in line.detail


async def test_the_controller_line_verifies_a_real_tls_port(tmp_path: Path, cas) -> None:
    site, other = cas
    cert = site.issue("served", ["127.0.0.1"])
    config = parse({"controller": {"token": "t", "tls_cert": str(cert.cert), "tls_key": str(cert.key),
                                   "tls_ca": str(site.cert_path)}})
    # A gRPC server with no services answers UNIMPLEMENTED, which doctor takes as "a controller answers":
    # only the TLS handshake is under test here.
    server = grpc.aio.server()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server.add_secure_port(f"127.0.0.1:{port}", tls.server_credentials(config))
    await server.start()
    try:
        body = _controller(cert, site.cert_path, f"127.0.0.1:{port}")
        check = _doctor(tmp_path, body)
        (line,) = await asyncio.to_thread(check.check_controller)
        assert line.ok and line.detail == f"127.0.0.1:{port} answers gRPC over TLS", line.line()
        (distrust,) = await asyncio.to_thread(_doctor(tmp_path, _controller(cert, other.cert_path,
                                                                            f"127.0.0.1:{port}")).check_controller)
        assert not distrust.ok and "UNAVAILABLE" in distrust.detail and "(over TLS)" in distrust.detail
        (plain,) = await asyncio.to_thread(_doctor(tmp_path, f'[controller]\naddress = "127.0.0.1:{port}"\n'
                                                             'token = "t"\n').check_controller)
        assert not plain.ok and "UNAVAILABLE" in plain.detail and "(in PLAINTEXT)" in plain.detail
    finally:
        await server.stop(None)
