"""TLS of the gRPC port and of the gateway-to-engine hop, from the config's PEM files.

Responsible for: turning `[controller].tls_*`, `[agent].tls_*` and `[gateway].engine_ca` into gRPC server and
channel credentials and an `ssl.SSLContext` (a file that cannot be read fails with its dotted key), opening
gRPC channels to the controller with them, and issuing a CA and certificates with `cryptography` (for
`slinfer dev-cluster`, the tests and the benches; a site brings its own).
Not responsible for: checking a certificate's dates or names for people (`slinfer doctor` does), or deciding
whether a plaintext port may run (the controller logs it, doctor fails it).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from slinfer.config import Config, ConfigError

# Certificates that dev-cluster issues: long enough for a bed that lives for weeks, short enough to be seen
# expiring by `slinfer doctor`'s 30-day warning well before a site would copy one into production.
DEV_VALIDITY_DAYS = 365


def read_pem(key: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from exc


def server_credentials(config: Config) -> grpc.ServerCredentials | None:
    """The gRPC port's credentials, or None when `[controller].tls_cert` is empty (plaintext)."""
    c = config.controller
    if not c.tls_cert:
        return None
    cert = read_pem("controller.tls_cert", c.tls_cert)
    key = read_pem("controller.tls_key", c.tls_key)
    ca = read_pem("controller.tls_ca", c.tls_ca) if c.tls_client_auth else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=c.tls_client_auth)


def client_uses_tls(config: Config) -> bool:
    return bool(config.controller.tls_ca or config.controller.tls_cert)


def channel_credentials(config: Config) -> grpc.ChannelCredentials | None:
    """What agents and the CLI present to the controller: the CA to verify it (the system's CAs when only
    `tls_cert` is set), and `[agent].tls_cert` for mutual TLS; None when the config has no TLS at all."""
    c, a = config.controller, config.agent
    if not client_uses_tls(config):
        return None
    ca = read_pem("controller.tls_ca", c.tls_ca) if c.tls_ca else None
    cert = read_pem("agent.tls_cert", a.tls_cert) if a.tls_cert else None
    key = read_pem("agent.tls_key", a.tls_key) if a.tls_key else None
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def aio_channel(address: str, config: Config) -> grpc.aio.Channel:
    creds = channel_credentials(config)
    return grpc.aio.secure_channel(address, creds) if creds else grpc.aio.insecure_channel(address)


# The CLI's replies may pass gRPC's default 4 MB: `slinfer status` at 5,000 nodes (40,000 engines and as many
# jobs) is 6.4 MB (bench/control_plane_scale.py); 256 MB leaves room for ten times that.
CLI_MAX_REPLY_BYTES = 256 << 20


def sync_channel(address: str, config: Config) -> grpc.Channel:
    creds = channel_credentials(config)
    options = [("grpc.max_receive_message_length", CLI_MAX_REPLY_BYTES)]
    return (grpc.secure_channel(address, creds, options=options) if creds
            else grpc.insecure_channel(address, options=options))


def engine_client_context(config: Config) -> ssl.SSLContext:
    """How the gateway (and the agent's health probe) verifies an https engine: against `[gateway].engine_ca`,
    else the system's CAs. Names are checked: an engine's certificate is issued for its node."""
    ca = config.gateway.engine_ca
    context = ssl.create_default_context(cafile=ca or None)
    return context


# ---- issuing (dev-cluster, tests, benches) --------------------------------------------------------------------
@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


class CertificateAuthority:
    """A CA kept as two PEM files in a folder; `issue` signs server or client certificates with it."""

    def __init__(self, folder: Path, name: str = "slinfer dev CA") -> None:
        self.folder = folder
        self.cert_path = folder / "ca.pem"
        key_path = folder / "ca.key"
        if self.cert_path.exists() and key_path.exists():
            self._key = serialization.load_pem_private_key(key_path.read_bytes(), None)
            self._cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
            return
        folder.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self._cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                      .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
                      .not_valid_before(now - datetime.timedelta(minutes=5))
                      .not_valid_after(now + datetime.timedelta(days=DEV_VALIDITY_DAYS))
                      .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                      .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                   content_commitment=False, key_encipherment=False,
                                                   data_encipherment=False, key_agreement=False,
                                                   encipher_only=False, decipher_only=False), critical=True)
                      .sign(self._key, hashes.SHA256()))
        _write_private(key_path, _key_pem(self._key))
        self.cert_path.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, stem: str, names: list[str], client: bool = False,
              not_before: datetime.datetime | None = None, days: int = DEV_VALIDITY_DAYS) -> Issued:
        """Writes STEM.pem and STEM.key (0600) for these DNS names and IP addresses, signed by this CA."""
        key = ec.generate_private_key(ec.SECP256R1())
        start = not_before or datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
        alt: list[x509.GeneralName] = []
        for name in names:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                alt.append(x509.DNSName(name))
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
                .issuer_name(self._cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=days))
                .add_extension(x509.SubjectAlternativeName(alt), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .sign(self._key, hashes.SHA256()))
        issued = Issued(self.folder / f"{stem}.pem", self.folder / f"{stem}.key")
        _write_private(issued.key, _key_pem(key))
        issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return issued


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write_private(path: Path, data: bytes) -> None:
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
